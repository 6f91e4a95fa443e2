"""FP8 E4M3 bases: per-tensor / per-channel `weight_scale` (compressed-tensors, FBGEMM) and DeepSeek-V3 128 x 128
blocks (`weight_scale_inv`)."""
import torch

from .base import Grid, QuantFormat, check_scale, expand_rows, round_to
from .rounding import fp8_codebook

FP8_MAX = 448.0


class FP8Channel(QuantFormat):
    """FP8 E4M3 with a per-tensor or per-output-channel `weight_scale` (compressed-tensors, FBGEMM): W = w * s."""
    name = "fp8"

    @classmethod
    def configure(cls, q):
        method = q.get("quant_method")
        claimed = method in (None, "compressed-tensors", "fbgemm_fp8") or (method == "fp8" and
                                                                          not q.get("weight_block_size"))
        return cls() if claimed else None

    def shape(self, ckpt, m):
        shape = tuple(ckpt.entry(m["weight"]).shape)
        check_scale(ckpt, m, "weight_scale", shape[0])
        return shape

    def find(self, ckpt):
        return {n[:-7]: {"weight": n, "weight_scale": n[:-7] + ".weight_scale"} for n in ckpt.where
                if n.endswith(".weight") and ckpt.entry(n).dtype == "F8_E4M3" and n[:-7] + ".weight_scale" in ckpt}

    def dequantize(self, ckpt, m):
        w, s = ckpt.get(m["weight"]), ckpt.get(m["weight_scale"])
        return w.float() * expand_rows(s, *w.shape)

    def grid(self, ckpt, m):
        w, s = ckpt.entry(m["weight"]), ckpt.get(m["weight_scale"])
        return Grid(expand_rows(s, *w.shape), torch.zeros(w.shape), fp8_codebook(), {"weight_scale": s.clone()})

    def fit(self, ckpt, m, W):
        s = ckpt.get(m["weight_scale"])
        amax = W.abs().amax(1) if s.numel() == W.shape[0] and W.shape[0] > 1 else W.abs().amax()
        s_new = round_to((amax / FP8_MAX).clamp(min=1e-12), s)
        return Grid(expand_rows(s_new, *W.shape), torch.zeros(W.shape), fp8_codebook(), {"weight_scale": s_new})

    def encode(self, ckpt, m, codes, grid):
        return {m["weight"]: codes.to(torch.float8_e4m3fn), m["weight_scale"]: grid.params["weight_scale"]}


class FP8Block(QuantFormat):
    """DeepSeek-V3 block FP8: weight_scale_inv [ceil(out/b), ceil(in/b)], W[i, j] = w[i, j] * s[i // b, j // b]."""
    name = "fp8-block"

    def __init__(self, block=(128, 128)):
        self.block = tuple(block)

    @classmethod
    def configure(cls, q):
        method = q.get("quant_method")
        if method == "fp8" and q.get("weight_block_size"):
            return cls(q["weight_block_size"])
        return cls() if method is None else None

    def find(self, ckpt):
        return {n[:-7]: {"weight": n, "weight_scale_inv": n[:-7] + ".weight_scale_inv"} for n in ckpt.where
                if n.endswith(".weight") and ckpt.entry(n).dtype == "F8_E4M3" and n[:-7] + ".weight_scale_inv" in ckpt}


    def _expand(self, s, out, inn):
        bo, bi = self.block
        return s.float().repeat_interleave(bo, 0).repeat_interleave(bi, 1)[:out, :inn]

    def dequantize(self, ckpt, m):
        w = ckpt.get(m["weight"])
        return w.float() * self._expand(ckpt.get(m["weight_scale_inv"]), *w.shape)

    def grid(self, ckpt, m):
        w, s = ckpt.entry(m["weight"]), ckpt.get(m["weight_scale_inv"])
        return Grid(self._expand(s, *w.shape), torch.zeros(w.shape), fp8_codebook(), {"weight_scale_inv": s.clone()})

    def fit(self, ckpt, m, W):
        bo, bi = self.block
        out, inn = W.shape
        padded = torch.zeros(-(-out // bo) * bo, -(-inn // bi) * bi)
        padded[:out, :inn] = W.abs()
        amax = padded.reshape(padded.shape[0] // bo, bo, padded.shape[1] // bi, bi).amax((1, 3))
        s = round_to((amax / FP8_MAX).clamp(min=1e-12), ckpt.get(m["weight_scale_inv"]))
        return Grid(self._expand(s, out, inn), torch.zeros(W.shape), fp8_codebook(), {"weight_scale_inv": s})

    def encode(self, ckpt, m, codes, grid):
        return {m["weight"]: codes.to(torch.float8_e4m3fn), m["weight_scale_inv"]: grid.params["weight_scale_inv"]}
