"""FP8 E4M3 bases: per-tensor / per-channel `weight_scale` (compressed-tensors, FBGEMM) and DeepSeek-V3 128 x 128
blocks (`weight_scale_inv`)."""

import torch

from ..errors import LorakitError
from . import ct_config
from .base import (
    FLOAT_SCALES,
    malformed,
    Grid,
    QuantFormat,
    check_dtype,
    check_scale,
    one_group,
    per_row,
    round_to,
)
from .rounding import FP8, FP8_MAX

CODEBOOK = FP8()


class FP8Channel(QuantFormat):
    """FP8 E4M3 with a per-tensor or per-output-channel `weight_scale` (compressed-tensors, FBGEMM): W = w * s."""

    name = "fp8"

    @classmethod
    def configure(cls, q):
        method = q.get("quant_method")
        claimed = method in (None, "compressed-tensors", "fbgemm_fp8") or (
            method == "fp8" and not q.get("weight_block_size")
        )
        return cls() if claimed else None

    def shape(self, ckpt, m):
        shape = tuple(ckpt.entry(m["weight"]).shape)
        check_scale(ckpt, m, "weight_scale", shape[0])
        return shape

    def find(self, ckpt):
        return {
            n[:-7]: {"weight": n, "weight_scale": n[:-7] + ".weight_scale"}
            for n in ckpt.where
            if n.endswith(".weight") and ckpt.entry(n).dtype == "F8_E4M3" and n[:-7] + ".weight_scale" in ckpt
        }

    def codes(self, ckpt, m):
        return ckpt.get(m["weight"])

    def grid(self, ckpt, m):
        out, inn = ckpt.entry(m["weight"]).shape
        s = ckpt.get(m["weight_scale"])
        return Grid(per_row(s, out), one_group(inn), CODEBOOK, params={"weight_scale": s})

    def fit(self, ckpt, m, lo, hi):
        s = ckpt.get(m["weight_scale"])
        amax = torch.maximum(-lo, hi).amax(0)  # [out]
        amax = amax if s.numel() == amax.numel() and amax.numel() > 1 else amax.amax()
        s_new = round_to((amax / FP8_MAX).clamp(min=1e-12), s)
        return Grid(
            per_row(s_new, lo.shape[1]),
            one_group(ckpt.entry(m["weight"]).shape[1]),
            CODEBOOK,
            params={"weight_scale": s_new},
        )

    def encode(self, ckpt, m, codes, grid):
        return {m["weight"]: codes, m["weight_scale"]: grid.params["weight_scale"]}


class FP8Block(QuantFormat):
    """Block FP8: a scale per block of rows x columns, [ceil(out/b0), ceil(in/b1)]: W[i, j] = w[i, j] * s[i // b0,
    j // b1]. DeepSeek-V3 names it `weight_scale_inv` (config quant_method fp8, weight_block_size), compressed-tensors
    `weight_scale` (llm-compressor's FP8_BLOCK: strategy block, block_structure)."""

    name = "fp8-block"

    def __init__(self, block=(128, 128), role="weight_scale_inv"):
        self.block, self.role = tuple(block), role

    @classmethod
    def configure(cls, q):
        method = q.get("quant_method")
        if method == "fp8" and q.get("weight_block_size"):
            return cls(q["weight_block_size"])
        blocks = {tuple(w.get("block_structure") or ()) for w in ct_config.weights_for(q, "fp8")}
        blocks.discard(())
        if len(blocks) > 1:
            raise LorakitError(
                f"FP8 blocks of several shapes ({sorted(blocks)}) in one checkpoint are not supported"
            )
        if blocks:
            return cls(next(iter(blocks)), "weight_scale")
        return cls() if method is None else None

    def find(self, ckpt):
        return {
            n[:-7]: {"weight": n, self.role: f"{n[:-7]}.{self.role}"}
            for n in ckpt.where
            if n.endswith(".weight") and ckpt.entry(n).dtype == "F8_E4M3" and f"{n[:-7]}.{self.role}" in ckpt
        }

    def shape(self, ckpt, m):
        check_dtype(ckpt, m, self.role, FLOAT_SCALES)
        shape = tuple(ckpt.entry(m["weight"]).shape)
        blocks = tuple(-(-n // b) for n, b in zip(shape, self.block))
        if len(shape) != 2 or tuple(ckpt.entry(m[self.role]).shape) != blocks:
            raise malformed(
                ckpt,
                m[self.role],
                f"{self.role} has shape {list(ckpt.entry(m[self.role]).shape)}: expected {list(blocks)} (one scale "
                f"per {self.block[0]} x {self.block[1]} block of weight {list(shape)})",
            )
        return shape

    def codes(self, ckpt, m):
        return ckpt.get(m["weight"])

    def _grid(self, s, out, inn):
        """Column groups of `bi` columns; each row takes its row block's scale."""
        bo, bi = self.block
        return Grid(
            s.float().T.repeat_interleave(bo, 1)[:, :out].contiguous(),
            torch.arange(inn) // bi,
            CODEBOOK,
            params={self.role: s},
        )

    def grid(self, ckpt, m):
        out, inn = self.shape(ckpt, m)
        return self._grid(ckpt.get(m[self.role]), out, inn)

    def fit(self, ckpt, m, lo, hi):
        bo, _ = self.block
        out, inn = self.shape(ckpt, m)
        amax = torch.maximum(-lo, hi)  # [in blocks, out]
        padded = torch.zeros(amax.shape[0], -(-out // bo) * bo)
        padded[:, :out] = amax
        block_amax = padded.reshape(amax.shape[0], -1, bo).amax(-1).T  # [out blocks, in blocks]
        s = round_to((block_amax / FP8_MAX).clamp(min=1e-12), ckpt.get(m[self.role]))
        return self._grid(s, out, inn)

    def encode(self, ckpt, m, codes, grid):
        return {m["weight"]: codes, m[self.role]: grid.params[self.role]}
