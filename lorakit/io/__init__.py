"""Bytes only: safetensors headers and tensor files, the streaming writer, atomic outputs, the dtype table and base
checkpoints (shards, index, config.json). Torch is imported only where tensors are made."""

from .atomic import atomic_output, check_output
from .staging import Staging, copy_file, input_identity, parse_part, work_folder
from .checkpoint import INDEX, Checkpoint, base_model_name, read_config, shard_files, tokenizer_files
from .safetensors import (
    BufferPool,
    DirectFile,
    Entry,
    Header,
    ShardWriter,
    TensorFile,
    build_header,
    check_readable_file,
    read_header,
    spec_nbytes,
    tensor_bytes,
    write_safetensors,
)

__all__ = [
    "Staging",
    "copy_file",
    "input_identity",
    "parse_part",
    "work_folder",
    "atomic_output",
    "check_output",
    "INDEX",
    "Checkpoint",
    "base_model_name",
    "read_config",
    "tokenizer_files",
    "shard_files",
    "BufferPool",
    "DirectFile",
    "Entry",
    "Header",
    "ShardWriter",
    "TensorFile",
    "build_header",
    "check_readable_file",
    "read_header",
    "spec_nbytes",
    "tensor_bytes",
    "write_safetensors",
]
