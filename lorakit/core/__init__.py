"""The pure core: the adapter model and its linear algebra. Tensors and numbers in, tensors out; no file IO, and no
import of lorakit.io, lorakit.formats, lorakit.quant or lorakit.engine (a test checks)."""

from .adapter import KINDS, Adapter, Module, default_kind, fp32, require_floating

__all__ = ["KINDS", "Adapter", "Module", "default_kind", "fp32", "require_floating"]
