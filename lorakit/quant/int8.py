"""INT8 per-output-channel bases: compressed-tensors (`weight_scale`) and bitsandbytes LLM.int8 (`SCB`)."""

import torch

from .base import Grid, QuantFormat, check_scale, one_group, per_row, round_to
from .rounding import Uniform


class Int8Channel(QuantFormat):
    """INT8 per output channel: compressed-tensors (weight I8, weight_scale [out, 1]: W = q * s) and bitsandbytes
    (weight I8, weight.SCB [out]: W = q * SCB / 127)."""

    name = "int8"

    @classmethod
    def configure(cls, q):
        method = q.get("quant_method")
        claimed = method in (None, "compressed-tensors", "fbgemm_fp8", "bitsandbytes") or (
            method == "fp8" and not q.get("weight_block_size")
        )
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

    def _codebook(self, m):
        return Uniform(-127, 127, torch.int8) if "SCB" in m else Uniform(-128, 127, torch.int8)

    def _grid(self, m, key, stored, out, inn):
        scale = stored.float() / 127 if key == "SCB" else stored
        return Grid(per_row(scale, out), one_group(inn), self._codebook(m), params={key: stored})

    def codes(self, ckpt, m):
        return ckpt.get(m["weight"])

    def grid(self, ckpt, m):
        key = "SCB" if "SCB" in m else "weight_scale"
        return self._grid(m, key, ckpt.get(m[key]), *ckpt.entry(m["weight"]).shape)

    def fit(self, ckpt, m, lo, hi):
        key = "SCB" if "SCB" in m else "weight_scale"
        amax = torch.maximum(-lo, hi).amax(0).clamp(min=1e-12)  # [out]
        stored = round_to(amax if key == "SCB" else amax / 127, ckpt.get(m[key]))
        return self._grid(m, key, stored, *ckpt.entry(m["weight"]).shape)

    def encode(self, ckpt, m, codes, grid):
        key = "SCB" if "SCB" in m else "weight_scale"
        return {m["weight"]: codes, m[key]: grid.params[key]}
