"""Lazy read access to a base checkpoint: one .safetensors file or a Hugging Face folder (single or sharded)."""

import os

from ..errors import LorakitError, missing
from .jsonio import read_json
from .safetensors import TensorFile, read_header

INDEX = "model.safetensors.index.json"


def read_config(folder, name="config.json"):
    """A model folder's config.json (or another JSON file in it) as a dict; None where the folder has none."""
    if folder is None or (folder and not os.path.isdir(folder)):
        return None
    path = os.path.join(folder or ".", name)
    if not os.path.isfile(path):
        return None
    return read_json(path)


def base_model_name(path):
    """The name an adapter records for its base: config.json's _name_or_path, else the folder's name."""
    return (read_config(path) or {}).get("_name_or_path") or os.path.basename(
        os.path.normpath(os.fspath(path))
    )


def shard_files(path):
    """The safetensors files of a checkpoint path, in a stable order, and the index (or None)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise missing(path)
    if os.path.isfile(path):
        _refuse_lone_shard(path)
        return [path], None
    index_path = os.path.join(path, INDEX)
    if os.path.isfile(index_path):
        index = read_json(index_path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise LorakitError("'weight_map' must map tensor names to shard file names", path=index_path)
        files = []
        for f in sorted(set(weight_map.values())):
            full = os.path.join(path, f)
            # a file name of the folder: never ../../etc/passwd, an absolute path or a sub-folder; a link in the
            # folder is followed (the Hugging Face cache links every file of a snapshot to its blob)
            if os.path.basename(f) != f or f in ("", ".", ".."):
                raise LorakitError(f"shard '{f}' is not a file of the model folder", path=index_path)
            if not os.path.isfile(full):
                raise LorakitError(
                    f"shard '{f}' named by the index is missing from the folder", path=index_path
                )
            files.append(full)
        return files, index
    names = os.listdir(path)
    files = sorted(f for f in names if f.endswith(".safetensors"))
    if not files:
        pickles = sorted(f for f in names if f.endswith((".bin", ".pt", ".pth", ".ckpt")))
        if pickles:
            raise LorakitError(
                f"folder holds PyTorch pickles ({', '.join(pickles[:3])}), no .safetensors files: lorakit reads "
                "safetensors checkpoints (transformers: save_pretrained(..., safe_serialization=True))",
                path=path,
            )
        raise LorakitError("folder holds no .safetensors files", path=path)
    return [os.path.join(path, f) for f in files], None


def _refuse_lone_shard(path):
    """One shard of a sharded checkpoint is not a model: say to pass its folder."""
    index = os.path.join(os.path.dirname(path) or ".", INDEX)
    if not os.path.isfile(index):
        return
    try:
        files = set(read_json(index).get("weight_map", {}).values())
    except (LorakitError, AttributeError, TypeError):
        return
    if os.path.basename(path) in files and len(files) > 1:
        raise LorakitError(
            f"this is one of the {len(files)} shards of a sharded checkpoint: pass its folder "
            f"({os.path.dirname(path) or '.'})",
            path=path,
        )


class Checkpoint:
    """Tensor name -> lazy tensor across all shards. Reads headers only until a tensor is asked for."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self.files, self.index = shard_files(self.path)
        self.shards = {}  # file -> TensorFile
        self.where = {}  # tensor name -> file
        for file in self.files:
            header = read_header(file, any_dtype=True)  # untouched tensors are copied whatever they hold
            self.shards[file] = TensorFile(file, header)
            for name in header.entries:
                if name in self.where:
                    raise LorakitError(f"tensor also stored in {self.where[name]}", path=file, tensor=name)
                self.where[name] = file
        if self.index is not None:
            missing = [n for n in self.index["weight_map"] if n not in self.where]
            if missing:
                raise LorakitError(
                    f"index lists {len(missing)} tensor(s) that no shard holds, e.g. '{missing[0]}'",
                    path=os.path.join(self.path, INDEX),
                )

    def __contains__(self, name):
        return name in self.where

    def entry(self, name):
        return self.shards[self.where[name]].header.entries[name]

    def get(self, name):
        return self.shards[self.where[name]].get(name)

    def shapes(self):
        return {n: self.entry(n).shape for n in self.where}


# the files of a Hugging Face tokenizer: PEFT users save theirs beside an adapter that adds tokens
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)


def tokenizer_files(adapter):
    """The tokenizer files in an adapter's folder (beside a file adapter); refused when there are none."""
    folder = adapter if os.path.isdir(adapter) else os.path.dirname(os.fspath(adapter))
    found = [os.path.join(folder, f) for f in TOKENIZER_FILES if os.path.isfile(os.path.join(folder, f))]
    if not found:
        raise LorakitError(
            "the adapter adds tokens but its folder has no tokenizer files (tokenizer.json, tokenizer_config.json): "
            "save the tokenizer beside it (tokenizer.save_pretrained(ADAPTER_DIR))",
            path=adapter,
        )
    return found
