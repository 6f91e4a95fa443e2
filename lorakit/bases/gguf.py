"""GGUF bases (llama.cpp): a file or its splits, every block-quantized tensor a module, llama.cpp's tensor names
and Q/K row order. The output mirrors the base file by file (a split base gives the same splits), each file with the
base's version, alignment and KV section byte for byte."""

import os
import re
from functools import cached_property

from ..errors import LorakitError, listed, opt
from ..io import spec_nbytes
from ..io.gguf import SPLIT, GGUFCheckpoint, GGUFHeader, GGUFShardWriter, is_gguf, tensor_nbytes
from .base import Base
from .view import WeightView

EXPERTS = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight")
EXPERT_NAMES = {"gate": ("gate_proj", "w1"), "up": ("up_proj", "w3"), "down": ("down_proj", "w2")}


# llama.cpp architecture -> Hugging Face model_type, where they are not the same name up to '-' / '_'
GGUF_MODEL_TYPES = {"qwen3moe": "qwen3_moe", "qwen2moe": "qwen2_moe", "deepseek2": "deepseek_v3"}


class GGUFBase(Base):
    kind = "gguf"
    experts = EXPERTS

    @staticmethod
    def claims(path):
        return is_gguf(path)

    def __init__(self, path):
        from ..quant.gguf import GGUFBlocks

        self.path = os.fspath(path)
        self.ckpt = GGUFCheckpoint(self.path)
        self.kv, self.config = self.ckpt.kv, None  # a GGUF's own KVs are its config
        if self.kv.get("general.type") == "adapter":
            raise LorakitError(
                "BASE is a llama.cpp LoRA adapter (general.type = adapter), not a model: did you swap BASE "
                "and ADAPTER? (lorakit merge BASE ADAPTER[:WEIGHT]... -o OUT)",
                path=self.path,
            )
        handler = GGUFBlocks()
        self.view = WeightView(self.path, self.ckpt, handler, handler.find(self.ckpt))

    @property
    def model_type(self):
        """The Hugging Face model type of llama.cpp's architecture (Mixtral is llama.cpp's llama with experts)."""
        arch = self.kv.get("general.architecture")
        if arch == "llama" and self.kv.get("llama.expert_count"):
            return "mixtral"
        return GGUF_MODEL_TYPES.get(arch, arch.replace("-", "_") if isinstance(arch, str) else None)

    @property
    def tied_embeddings(self):
        return False  # llama.cpp uses token_embd as the head when output.weight is absent (see notes)

    @cached_property
    def fused_slices(self):
        """Hugging Face's per-expert modules (qwen2_moe family `mlp.experts.E.{gate,up,down}_proj`, Mixtral
        `block_sparse_moe.experts.E.{w1,w3,w2}`) as row slices of llama.cpp's `blk.N.ffn_{gate,up,down}_exps`."""

        def aliases(tensor, e):
            m = EXPERTS.fullmatch(tensor)
            (qwen, mixtral), layer = EXPERT_NAMES[m[2]], m[1]
            return (
                f"model.layers.{layer}.mlp.experts.{e}.{qwen}",
                f"model.layers.{layer}.block_sparse_moe.experts.{e}.{mixtral}",
            )

        return self.expert_slices(aliases)

    def hf_config(self):
        """config.json as llama.cpp's KVs say it (the head tied where the GGUF stores none)."""
        from ..naming import llama_cpp

        if "token_embd.weight" not in self.view:
            raise LorakitError("the GGUF has no token_embd.weight", path=self.path)
        embed = self.view.shape("token_embd.weight")
        return llama_cpp.hf_config(self.kv, embed[0], tied="output.weight" not in self.view)

    def config_path(self):
        return self.path

    def stored_name(self, hf_name):
        from ..naming import llama_cpp

        return llama_cpp.tensor_name(hf_name) or ""

    def hf_row_order(self, hf_name, rows):
        from ..naming import llama_cpp

        return llama_cpp.row_order(self.stored_name(hf_name), self.kv, rows)

    def codes_readable(self, key):
        from ..quant.gguf import TYPES

        return self.view.ckpt.entry(key).dtype in TYPES

    def to_base_names(self, adapter):
        from ..naming.llama_cpp import gguf_modules

        return gguf_modules(adapter, self.kv, self.path)

    def expert_module(self, name, e):
        """Hugging Face's per-expert module (what the merge and the adapter readers name it), not llama.cpp's."""
        from ..naming.llama_cpp import expert_module

        return (
            expert_module(name.removesuffix(".weight"), e) if self._expert_shape(name) is not None else None
        )

    def from_base_names(self, adapter):
        from ..naming.llama_cpp import gguf_modules

        return gguf_modules(adapter, self.kv, self.path, to_gguf=False)

    def full_precision(self, path):
        """The F16 / F32 / BF16 GGUF it was quantized from: llama.cpp's names and row order."""
        if not is_gguf(path):
            raise LorakitError(
                "--full-precision-base must name its tensors as the base does: a GGUF base takes the F16 / F32 / "
                "BF16 GGUF it was quantized from",
                path=path,
            )
        return GGUFCheckpoint(path)

    def uncodec_modules(self, plans, target_dtype):
        """Merged tensors whose GGML type has no codec here (IQ*, TQ*, ...): written in --dtype, as llama.cpp's
        export-lora writes F16; an error naming the tensor and its type without it."""
        from ..quant.gguf import TYPES, no_codec

        keys = sorted(
            k
            for k, p in plans.items()
            if p.touched and k in self.view.quantized and self.ckpt.entry(k).dtype not in TYPES
        )
        if keys and target_dtype is None:
            raise no_codec(self.path, keys[0], self.ckpt.entry(keys[0]).dtype, len(keys))
        return set(keys)

    def output_files(self, output):
        if os.fspath(output).endswith(".safetensors"):
            raise LorakitError(
                "the base is GGUF, so the output is GGUF: -o names a .safetensors file", path=output
            )
        return output_files(output, len(self.ckpt.files))

    def writer(self, job, outputs, untie_embed, shard_size):
        if shard_size is not None:
            raise LorakitError(
                f"{opt('shard_size')} re-shards safetensors folders; a GGUF output keeps the base's splits",
                path=self.path,
            )
        if job.vocab_size is not None:  # the vocabulary lives in the GGUF's tokenizer KVs too
            raise LorakitError(
                "the adapter adds tokens (a larger embedding): a GGUF base's vocabulary is not grown here; merge "
                "into the Hugging Face checkpoint, then convert it with llama.cpp's convert_hf_to_gguf.py",
                path=self.path,
            )
        return GGUFWriter(job, outputs)

    def notes(self, plans, job, options):
        for key, row in job.survival.items():  # each survival row says the tensor's GGML type
            row["type"] = self.ckpt.entry(f"{key}.weight").dtype
        notes = []
        if job.dequantized:
            shown = [f"{k} ({self.ckpt.entry(k).dtype})" for k in sorted(job.dequantized)]
            notes.append(
                f"{len(shown)} merged tensor(s) of GGML types without a codec written in {options.dtype} "
                f"({opt('dtype')}), as llama.cpp's export-lora does: {listed(shown)}"
            )
        elif job.target_dtype is not None:
            notes.append(
                f"{opt('dtype')} {options.dtype} applies to merged tensors of GGML types without a codec: there are "
                "none, every tensor kept its type"
            )
        embed = plans.get("token_embd.weight")
        if embed and embed.touched and "output.weight" not in self.view:
            notes.append(
                "the base has no output.weight: llama.cpp uses token_embd as the output head, so the merged "
                "embedding is the head too (as in a model with tied embeddings)"
            )
        return notes

    def report(self, writer):
        return {"shard_count": len(writer.shards), "files": writer.outputs}


def output_files(output, count):
    """The output path of each of a base's `count` files: OUT itself, or `<prefix>-0000i-of-0000N.gguf` with the prefix
    of OUT (OUT may be named like the first split already)."""
    output = os.fspath(output)
    if count == 1:
        return [output]
    if not output.endswith(".gguf"):
        raise LorakitError(
            f"the base is a GGUF split in {count} files, and so is the output: -o names its first "
            "file (<prefix>.gguf or <prefix>-00001-of-...gguf)",
            path=output,
        )
    m = SPLIT.fullmatch(os.path.basename(output))
    prefix = os.path.join(os.path.dirname(output), m[1]) if m else output[: -len(".gguf")]
    return [f"{prefix}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]


class GGUFWriter:
    """`shards` are the output files (their names: splits lie side by side) with the tensors of the base file each
    mirrors."""

    folder = False

    def __init__(self, job, outputs):
        self.job, ckpt, self.outputs = job, job.ckpt, [os.fspath(o) for o in outputs]
        self.headers = [ckpt.shards[f].header for f in ckpt.files]
        self.shards = [
            (os.path.basename(out), [job.spec_of(n) for n in header.entries])
            for out, header in zip(outputs, self.headers)
        ]
        self.total = sum(spec_nbytes(spec) for _, specs in self.shards for spec in specs)

    def source_file(self, index):
        return None  # a GGUF's splits are written whole: their KV sections say which split each is

    def open_shard(self, path, index, specs):
        return GGUFShardWriter(path, self.headers[index], specs)

    def finish(self, tmp, paths, weight_map, total):
        """Each file read back before its rename: a header that parses, every tensor where its info says."""
        for out, specs in self.shards:
            written = GGUFHeader(paths[out])
            sizes = [tensor_nbytes(e.dtype, e.shape) for e in written.entries.values()]
            if list(written.entries) != [s[0] for s in specs] or sizes != [spec_nbytes(s) for s in specs]:
                raise LorakitError(
                    "the written GGUF does not read back as planned (nothing was published)", path=paths[out]
                )
