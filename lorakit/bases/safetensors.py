"""Safetensors bases: one .safetensors file or a Hugging Face folder (single or sharded, full precision or
quantized: FP8, INT8, GPTQ, AWQ, NF4, found from the config and the tensor names)."""

import json
import os
import re
import shutil
from functools import cached_property

from ..errors import LorakitError
from ..io import INDEX, Checkpoint, ShardWriter, read_config, spec_nbytes, tokenizer_files
from ..io.dtypes import dtype_name
from ..io.gguf import named_gguf
from ..naming.embeddings import HEAD
from ..io.jsonio import read_json
from .base import Base
from .view import WeightView

MODELOPT_CONFIG = "hf_quant_config.json"  # NVIDIA ModelOpt's quantization config, beside config.json
# what a quantized folder says about its quantization besides config.json (GPTQ's config, ModelOpt's, llm-compressor's
# recipe): left out of a dequantized output, where it would be stale (llm-compressor reads a folder's recipe.yaml)
QUANTIZATION_FILES = ("quantize_config.json", MODELOPT_CONFIG, "recipe.yaml")
# fused Mixture-of-Experts tensors stored 3-D on disk (gpt-oss, Llama 4)
FUSED_EXPERTS = re.compile(r".+\.experts\.(gate_up_proj|down_proj)")


class SafetensorsBase(Base):
    kind = "safetensors"
    experts = FUSED_EXPERTS

    @staticmethod
    def claims(path):
        return True  # the last kind asked: a file or folder of safetensors (Checkpoint says what is wrong)

    def __init__(self, path):
        self.path = os.fspath(path)
        self.folder = self.path if os.path.isdir(self.path) else os.path.dirname(self.path)
        self.config = read_config(self.folder)  # config.json read here, once

    @cached_property
    def ckpt(self):
        """The stored tensors: every shard header parsed once, when first needed (a folder holding only config.json
        still gives a GGUF writer its head counts)."""
        return Checkpoint(self.path)

    @cached_property
    def view(self):
        from ..quant import detect, quantization_config

        older = modelopt = None
        if not (self.config or {}).get("quantization_config"):
            older = read_config(self.folder, "quantize_config.json")
            modelopt = read_config(self.folder, MODELOPT_CONFIG)
        q = quantization_config(self.config, older, os.path.join(self.folder or ".", "config.json"), modelopt)
        handler, modules = detect(self.ckpt, q, self.path)
        return WeightView(self.path, self.ckpt, handler, modules)

    @cached_property
    def fused_slices(self):
        """Other tools' names for rows of fused tensors, and `<experts tensor>.<e>` for expert e of a fused MoE
        tensor (gpt-oss and Llama 4 keep their experts so on disk; the target_parameters reader names them so)."""
        return {**super().fused_slices, **self.expert_slices(lambda tensor, e: [f"{tensor}.{e}"])}

    @cached_property
    def single_file_header(self):
        """The parsed header when the base is one file (what the adapter detectors look at), else None."""
        return self.ckpt.shards[self.ckpt.files[0]].header if os.path.isfile(self.path) else None

    def full_precision(self, path):
        from .gguf import GGUFBase

        if GGUFBase.claims(path):
            raise LorakitError(
                "--full-precision-base must name its tensors as the base does: a safetensors checkpoint for a "
                "safetensors base",
                path=path,
            )
        return Checkpoint(path)

    def output_files(self, output):
        if named_gguf(output):  # llama.cpp could not load it, no reader would take it
            raise LorakitError(
                "the base is safetensors, so the output is safetensors: -o names a .gguf file (for a GGUF, merge "
                "into a GGUF base)",
                path=output,
            )
        return super().output_files(output)

    def writer(self, job, outputs, untie_embed, shard_size):
        return SafetensorsWriter(job, self.path, untie_embed, shard_size, outputs[0])

    def report(self, writer):
        return {"shard_count": len(writer.shards) if writer.folder else 1}


class SafetensorsWriter:
    """Output as the base's layout: one .safetensors file, or a Hugging Face folder (shards, index, the folder's other
    files, config.json updated for a new dtype, untied embeddings or a dropped quantization)."""

    def __init__(self, job, base, untie_embed, shard_size=None, output=None):
        self.job, self.base, self.untie_embed = job, base, untie_embed
        self.folder = os.path.isdir(base) or shard_size is not None
        self.resharded = shard_size is not None
        self.shards = self._layout(shard_size)
        if not self.folder:  # one file: named as the output
            self.shards = [(os.path.basename(os.fspath(output)), self.shards[0][1])]
        self.total = sum(spec_nbytes(spec) for _, specs in self.shards for spec in specs)
        if self.folder and os.fspath(output).endswith(".safetensors"):
            raise LorakitError(
                "the base is a folder, so the output is a folder (shards, index, config.json, tokenizer): -o "
                "names a .safetensors file; give a folder name",
                path=output,
            )

    def _layout(self, shard_size):
        ckpt, order = self.job.ckpt, []
        for file in ckpt.files:
            names = list(ckpt.shards[file].header.entries)
            if self.untie_embed is not None and self.untie_embed in names:
                names.insert(names.index(self.untie_embed) + 1, HEAD)
            order.append((os.path.basename(file), self.job.output_names(names)))
        if shard_size is None:
            return [(f, [self.job.spec_of(n) for n in names]) for f, names in order]
        shards, current, size = [], [], 0
        for _, names in order:
            for spec in map(self.job.spec_of, names):
                nbytes = spec_nbytes(spec)
                if current and size + nbytes > shard_size:
                    shards.append(current)
                    current, size = [], 0
                current.append(spec)
                size += nbytes
        shards.append(current)
        if len(shards) == 1:
            return [("model.safetensors", shards[0])]
        return [(f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors", s) for i, s in enumerate(shards)]

    def source_file(self, index):
        """The base file output file `index` is a byte-identical copy of when nothing in it changes (the same
        tensors in the same order), else None."""
        if self.resharded:
            return None
        file = self.job.ckpt.files[index]
        names = [spec[0] for spec in self.shards[index][1]]
        return file if names == list(self.job.ckpt.shards[file].header.entries) else None

    def open_shard(self, path, index, specs):
        file = self.job.ckpt.files[index] if not self.resharded else None
        meta = (self.job.ckpt.shards[file].header.metadata if file else None) or {"format": "pt"}
        return ShardWriter(path, specs, meta, direct=True)

    def finish(self, tmp, paths, weight_map, total):
        """Into the output folder `tmp` (its shards at `paths`, {file name: path}): the base folder's other files,
        the index and, where needed, config.json (a dequantized output loses its quantization_config and
        QUANTIZATION_FILES)."""
        if not self.folder:
            return
        drop_quantization, target_dtype = self.job.dequantize_out, self.job.target_dtype
        if os.path.isdir(self.base):
            for entry in os.listdir(self.base):
                src = os.path.join(self.base, entry)
                if entry.endswith(".safetensors") or entry == INDEX or entry.startswith("."):
                    continue
                if drop_quantization and entry in QUANTIZATION_FILES:
                    continue
                if os.path.isdir(src):
                    shutil.copytree(src, os.path.join(tmp, entry))
                else:
                    shutil.copy2(src, os.path.join(tmp, entry))
        if len(self.shards) > 1 or self.job.ckpt.index is not None:
            with open(os.path.join(tmp, INDEX), "w") as f:
                json.dump(
                    {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                    f,
                    indent=2,
                )
                f.write("\n")
        for path in tokenizer_files(self.job.tokenizer_from) if self.job.tokenizer_from else []:
            shutil.copy2(path, os.path.join(tmp, os.path.basename(path)))  # the added tokens' tokenizer
        config_path = os.path.join(tmp, "config.json")
        vocab = self.job.vocab_size
        if os.path.isfile(config_path) and (target_dtype is not None or self.untie_embed or vocab):
            config = read_json(config_path, "config.json")
            if vocab:
                with_vocab_size(config, vocab)
            if drop_quantization:
                config.pop("quantization_config", None)
            if target_dtype is not None:
                key = "dtype" if "dtype" in config and "torch_dtype" not in config else "torch_dtype"
                config[key] = dtype_name(target_dtype)
            if self.untie_embed:
                config["tie_word_embeddings"] = False
            with open(config_path, "w") as f:
                json.dump(config, f, indent=2)
                f.write("\n")


def with_vocab_size(config, rows):
    """config.json's vocab_size (and a text_config's, a multimodal model's) set to the embedding's rows."""
    config["vocab_size"] = rows
    if isinstance(config.get("text_config"), dict):
        config["text_config"]["vocab_size"] = rows
