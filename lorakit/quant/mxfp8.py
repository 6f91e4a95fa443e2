"""MXFP8 bases (compressed-tensors `mxfp8-quantized`, llm-compressor's MXFP8 / MXFP8A16): `weight` F8_E4M3 [out, in]
and `weight_scale` U8 [out, in / 32], an E8M0 power of two per 32 consecutive inputs of a row: W = w x 2^(s - 127).
Facts: compressed-tensors compressors/mxfp8 and mx_utils, checked bit for bit in the tests."""

import torch

from ..errors import LorakitError
from . import ct_config
from .base import malformed, Grid, QuantFormat, check_dtype
from .fp8 import CODEBOOK
from .rounding import FP8_MAX

GROUP = 32
BIAS = 127


class MXFP8(QuantFormat):
    name = "mxfp8"

    @classmethod
    def configure(cls, q):
        args = ct_config.weights_for(q, cls.name)
        if not args:
            return None
        if {w.get("group_size") for w in args} != {GROUP}:
            raise LorakitError("MXFP8 with groups other than 32 is not supported")
        return cls()

    def find(self, ckpt):
        return {
            n[:-7]: {"weight": n, "weight_scale": n[:-7] + ".weight_scale"}
            for n in ckpt.where
            if n.endswith(".weight") and ckpt.entry(n).dtype == "F8_E4M3" and n[:-7] + ".weight_scale" in ckpt
        }

    def shape(self, ckpt, m):
        check_dtype(ckpt, m, "weight_scale", ("U8",))
        shape = tuple(ckpt.entry(m["weight"]).shape)
        scale = tuple(ckpt.entry(m["weight_scale"]).shape)
        if len(shape) != 2 or shape[1] % GROUP or scale != (shape[0], shape[1] // GROUP):
            raise malformed(
                ckpt,
                m["weight_scale"],
                f"weight_scale has shape {list(scale)}: expected [out, in / 32] for weight {list(shape)} (in a "
                "multiple of 32)",
            )
        return shape

    def codes(self, ckpt, m):
        return ckpt.get(m["weight"])

    def _grid(self, s):
        S = torch.ldexp(torch.ones(s.shape), s.to(torch.int32) - BIAS)  # [out, groups]
        return Grid(
            S.T.contiguous(), torch.arange(s.shape[1] * GROUP) // GROUP, CODEBOOK, params={"scale": s}
        )

    def grid(self, ckpt, m):
        self.shape(ckpt, m)
        return self._grid(ckpt.get(m["weight_scale"]))

    def fit(self, ckpt, m, lo, hi):
        """The smallest power of two that puts each block's largest magnitude within E4M3's 448 (no clipping)."""
        amax = torch.maximum(-lo, hi).T.clamp(min=2.0**-126)  # [out, groups]
        exponent = torch.ceil(torch.log2(amax / FP8_MAX)).clamp(-BIAS, 254 - BIAS)
        return self._grid((exponent + BIAS).to(torch.uint8))

    def encode(self, ckpt, m, codes, grid):
        return {m["weight"]: codes, m["weight_scale"]: grid.params["scale"]}
