"""Base checkpoints, opened once: `open_base(path) -> Base` is the one place that knows containers. Every command and
the merge engine use the Base it returns (its records, config, names and writer), never a container kind.

A new container kind is one file here with a Base subclass (`claims(path)`, `__init__(path)` and what differs from
lorakit.bases.base.Base), plus its row in KINDS, whose order is the detection order.
"""

import os

from ..errors import missing
from .base import Base, Slice, TensorRecord

__all__ = ["Base", "Slice", "TensorRecord", "KINDS", "open_base"]


def _kinds():
    from .gguf import GGUFBase
    from .pipeline import PipelineBase
    from .safetensors import SafetensorsBase

    return (PipelineBase, GGUFBase, SafetensorsBase)


KINDS = ("diffusers-pipeline", "gguf", "safetensors")  # detection order; the classes are imported when used


def open_base(path):
    """The Base at `path` (an opened Base is returned as it is): a diffusers pipeline folder, a GGUF file (or its
    first split), or a .safetensors file or Hugging Face folder, quantized or not. Headers and configs are parsed
    here, once."""
    if isinstance(path, Base):
        return path
    path = os.fspath(path)
    if not os.path.exists(path):
        raise missing(path)
    for kind in _kinds():
        if kind.claims(path):
            return kind(path)
    raise AssertionError("SafetensorsBase claims every path")
