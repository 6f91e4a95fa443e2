"""INT8 per-output-channel bases: compressed-tensors (`weight_scale`) and bitsandbytes LLM.int8 (`SCB`)."""
import torch

from .base import Grid, QuantFormat, check_scale, expand_rows, round_to
from .rounding import int_codebook


class Int8Channel(QuantFormat):
    """INT8 per output channel: compressed-tensors (weight I8, weight_scale [out, 1]: W = q * s) and bitsandbytes
    (weight I8, weight.SCB [out]: W = q * SCB / 127)."""
    name = "int8"

    @classmethod
    def configure(cls, q):
        method = q.get("quant_method")
        claimed = method in (None, "compressed-tensors", "fbgemm_fp8", "bitsandbytes") or (
            method == "fp8" and not q.get("weight_block_size"))
        return cls() if claimed else None

    def find(self, ckpt):
        found = {}
        for n in ckpt.where:
            if n.endswith(".weight") and ckpt.entry(n).dtype == "I8":
                if n + ".SCB" in ckpt:
                    found[n[:-7]] = {"weight": n, "SCB": n + ".SCB"}
                elif n[:-7] + ".weight_scale" in ckpt:
                    found[n[:-7]] = {"weight": n, "weight_scale": n[:-7] + ".weight_scale"}
        return found


    def shape(self, ckpt, m):
        shape = tuple(ckpt.entry(m["weight"]).shape)
        check_scale(ckpt, m, "SCB" if "SCB" in m else "weight_scale", shape[0])
        return shape

    def _scale(self, ckpt, m):
        return ckpt.get(m["SCB"]).float() / 127 if "SCB" in m else ckpt.get(m["weight_scale"]).float()

    def dequantize(self, ckpt, m):
        q = ckpt.get(m["weight"])
        return q.float() * expand_rows(self._scale(ckpt, m), *q.shape)

    def _codebook(self, m):
        return int_codebook(-127, 127) if "SCB" in m else int_codebook(-128, 127)

    def grid(self, ckpt, m):
        shape = ckpt.entry(m["weight"]).shape
        key = "SCB" if "SCB" in m else "weight_scale"
        return Grid(expand_rows(self._scale(ckpt, m), *shape), torch.zeros(shape), self._codebook(m),
                    {key: ckpt.get(m[key]).clone()})

    def fit(self, ckpt, m, W):
        amax = W.abs().amax(1).clamp(min=1e-12)
        if "SCB" in m:
            scb = round_to(amax, ckpt.get(m["SCB"]))
            return Grid(expand_rows(scb.float() / 127, *W.shape), torch.zeros(W.shape), self._codebook(m),
                        {"SCB": scb})
        s = round_to(amax / 127, ckpt.get(m["weight_scale"]))
        return Grid(expand_rows(s, *W.shape), torch.zeros(W.shape), self._codebook(m), {"weight_scale": s})

    def encode(self, ckpt, m, codes, grid):
        key = "SCB" if "SCB" in m else "weight_scale"
        return {m["weight"]: codes.to(torch.int8), m[key]: grid.params[key]}
