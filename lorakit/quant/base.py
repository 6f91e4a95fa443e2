"""The interface every quantized base format implements, and the grid it describes.

A format finds its modules in a checkpoint, gives each module's full-precision shape, dequantizes it to W [out, in]
in fp32, describes its grid (per-element scale S, zero point Z, codebook C: W = S * (c - Z)), fits a fresh grid, and
encodes codes back into tensors of exactly the stored names, shapes and dtypes. `ckpt` is a Checkpoint (or anything
with `where`, `entry`, `get` and `__contains__`); `m` is one module's {role: tensor name}.
"""
from dataclasses import dataclass

import torch

from ..errors import LorakitError


@dataclass
class Grid:
    S: torch.Tensor  # [out, in] fp32 scale of each element
    Z: torch.Tensor  # [out, in] fp32 zero point (in code units)
    C: torch.Tensor  # sorted codebook of code values
    params: dict  # the compact tensors (stored shape and dtype) that define S and Z


class QuantFormat:
    """Base class of the registered formats (lorakit.quant.FORMATS)."""
    name = None
    writable = True  # merge can write this format back (else: --dtype only)

    @classmethod
    def configure(cls, qconfig):
        """An instance for this checkpoint's quantization config ({} when it has none), or None when the config
        says another format. Raises LorakitError for variants of this format that are not supported."""
        raise NotImplementedError

    def find(self, ckpt):
        """{module name: {role: tensor name}} of the modules stored in this format."""
        raise NotImplementedError

    def members(self, ckpt, m):
        """Every stored tensor that makes up module `m` (hidden behind its `.weight` in a WeightView)."""
        return list(m.values())

    def shape(self, ckpt, m):
        return tuple(ckpt.entry(m["weight"]).shape)

    def dequantize(self, ckpt, m):
        raise NotImplementedError

    def grid(self, ckpt, m):
        raise NotImplementedError

    def fit(self, ckpt, m, W):
        raise NotImplementedError

    def encode(self, ckpt, m, codes, grid):
        raise NotImplementedError


def check_scale(ckpt, m, role, out):
    """A per-tensor or per-output-channel scale: one value, or one per row."""
    n = 1
    for d in ckpt.entry(m[role]).shape:
        n *= d
    if n not in (1, out):
        raise LorakitError(f"scale has shape {list(ckpt.entry(m[role]).shape)}: expected one value or {out} (one per "
                           "output row)", path=ckpt.path, tensor=m[role])


def expand_rows(s, out, inn):
    """A per-tensor or per-output-channel scale as an [out, in] fp32 view."""
    return s.float().reshape(-1, 1).expand(out, inn) if s.numel() == out else s.float().reshape(1, 1).expand(out, inn)


def round_to(t, like):
    """t in the dtype and shape of the stored tensor `like`."""
    return t.to(like.dtype).reshape(like.shape)
