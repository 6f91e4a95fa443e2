"""MXFP4 (OCP microscaling FP4), as gpt-oss ships its experts: `<tensor>_blocks` U8 [E, rows, cols / 32, 16] (two
FP4 E2M1 codes a byte, the low nibble first) and `<tensor>_scales` U8 [E, rows, cols / 32] (E8M0: 2^(s - 127) per 32
codes). Facts: transformers integrations/mxfp4.py (convert_moe_packed_tensors), checked in the tests.

The blocks run along the rows' last axis, so the module is the E x rows rows of [E, rows, cols] ([out, in] per
expert: 2I x H for gate_up_proj), while the full-precision tensor transformers makes of it, and gpt-oss' bf16
checkpoints store, is the transpose of each expert, [E, cols, rows]: that is this module's full shape, so that an
MXFP4 base has the names and shapes of its bf16 copy and an adapter for one fits the other.
"""

import torch

from ..errors import LorakitError
from .base import Grid, QuantFormat
from .rounding import Table

BLOCK = 32
BIAS = 127  # E8M0: scale = 2^(s - 127)
E2M1 = 2  # the largest FP4 E2M1 value is 6 = 1.5 * 2^2
VALUES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
CODEBOOK = Table(torch.tensor(VALUES))


class MXFP4(QuantFormat):
    name = "mxfp4"
    transposed_experts = True  # an expert's full-precision slice is the transpose of its rows of blocks

    @classmethod
    def configure(cls, q):
        return cls() if q.get("quant_method") in (None, "mxfp4") else None

    def find(self, ckpt):
        found = {}
        for name in ckpt.where:
            stem = name.removesuffix("_blocks")
            if stem == name or f"{stem}_scales" not in ckpt or ckpt.entry(name).dtype != "U8":
                continue
            found[stem] = {"blocks": name, "scales": f"{stem}_scales"}
        return found

    def weight_name(self, module):
        return module  # gpt-oss' fused expert tensors have no `.weight`

    def experts_shape(self, ckpt, m):
        """[E, rows, cols]: the stored codes' layout, each expert's rows in turn."""
        blocks, scales = ckpt.entry(m["blocks"]).shape, ckpt.entry(m["scales"]).shape
        if (
            len(blocks) != 4
            or blocks[-1] != BLOCK // 2
            or tuple(scales) != tuple(blocks[:-1])
            or scales[0] < 1
        ):
            raise LorakitError(
                f"MXFP4 blocks {list(blocks)} and scales {list(scales)} are not [E, rows, cols/32, 16] and "
                "[E, rows, cols/32]",
                path=ckpt.path,
                tensor=m["blocks"],
            )
        return (blocks[0], blocks[1], blocks[2] * BLOCK)

    def shape(self, ckpt, m):
        E, rows, cols = self.experts_shape(ckpt, m)
        return (E * rows, cols)

    def full_shape(self, ckpt, m):
        E, rows, cols = self.experts_shape(ckpt, m)
        return (E, cols, rows)

    def to_full(self, ckpt, m, W):
        """The module's rows [E x rows, cols] as the full-precision tensor [E, cols, rows]."""
        E, rows, cols = self.experts_shape(ckpt, m)
        return W.reshape(E, rows, cols).transpose(1, 2).contiguous()

    def codes(self, ckpt, m):
        return nibbles(ckpt.get(m["blocks"])).reshape(self.shape(ckpt, m))

    def grid(self, ckpt, m):
        s = ckpt.get(m["scales"])
        return self._grid(s)

    def _grid(self, s):
        E, rows, groups = s.shape
        exponent = s.reshape(E * rows, groups).T.to(torch.int32) - BIAS
        S = torch.ldexp(torch.ones(exponent.shape), exponent)
        return Grid(S.contiguous(), torch.arange(groups * BLOCK) // BLOCK, CODEBOOK, params={"scales": s})

    def fit(self, ckpt, m, lo, hi):
        """The smallest power of two that puts each block's largest magnitude within 6 (no clipping)."""
        amax = torch.maximum(-lo, hi).clamp(min=2.0**-126)  # [groups, out]
        exponent = torch.ceil(torch.log2(amax / 6.0)).clamp(-BIAS, 254 - BIAS)
        stored = ckpt.entry(m["scales"]).shape
        s = (exponent + BIAS).to(torch.uint8).T.reshape(stored)
        return self._grid(s)

    def encode(self, ckpt, m, codes, grid):
        return {m["blocks"]: packed_nibbles(codes, ckpt.get(m["blocks"])), m["scales"]: grid.params["scales"]}


def nibbles(packed):
    """FP4 codes of bytes holding two each, the low nibble the first element: [..., n] -> [..., 2n]."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(*packed.shape[:-1], -1)


def packed_nibbles(codes, old, chunk=1 << 22):
    """Codes (any shape, elements in order) packed two a byte into the shape of the stored bytes `old`. A zero
    keeps the sign it was stored with: a merge adds +0 where there is no delta, which would turn a stored -0 into +0
    and change the bytes of blocks the adapter never touched. Chunked, so that the temporaries stay small."""
    flat, before = codes.reshape(-1), old.reshape(-1)
    packed = torch.empty(before.shape, dtype=torch.uint8)
    for i in range(0, before.numel(), chunk):
        c = flat[2 * i : 2 * (i + chunk)].to(torch.uint8)
        b = nibbles(before[i : i + chunk])
        c = torch.where((c & 7) == 0, torch.where((b & 7) == 0, b, 0), c).to(torch.uint8)
        packed[i : i + chunk] = c[0::2] | (c[1::2] << 4)
    return packed.reshape(old.shape)
