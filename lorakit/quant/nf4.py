"""bitsandbytes NF4 bases (read and dequantize), with and without double quantization."""
import json

import torch

from .base import QuantFormat


class NF4(QuantFormat):
    """bitsandbytes NF4 (read and dequantize only): weight U8 (two 4-bit codes per byte, the first in the high
    nibble), weight.absmax per block (or uint8 with nested_absmax / nested_quant_map / offset: double quantization),
    weight.quant_map (the 16 NF4 levels), weight.quant_state.bitsandbytes__nf4 (JSON: blocksize, shape, ...)."""
    name = "nf4"
    writable = False

    @classmethod
    def configure(cls, q):
        return cls() if q.get("quant_method") in (None, "bitsandbytes") else None

    def find(self, ckpt):
        return {n[:-7]: {"weight": n, "state": k} for n in ckpt.where if n.endswith(".weight")
                for k in (n + ".quant_state.bitsandbytes__nf4", n + ".quant_state.bitsandbytes__fp4") if k in ckpt}

    def _state(self, ckpt, m):
        return json.loads(bytes(ckpt.get(m["state"]).numpy().tobytes()).decode())

    def shape(self, ckpt, m):
        return tuple(self._state(ckpt, m)["shape"])

    def dequantize(self, ckpt, m):
        state = self._state(ckpt, m)
        w = m["weight"]
        packed = ckpt.get(w).reshape(-1).to(torch.int32)
        codes = torch.stack([packed >> 4, packed & 15], 1).reshape(-1)
        absmax = ckpt.get(w + ".absmax")
        if w + ".nested_absmax" in ckpt:  # double quantization of the absmax values
            nested = ckpt.get(w + ".nested_absmax").float()
            nested_map = ckpt.get(w + ".nested_quant_map").float()
            block = int(state.get("nested_blocksize", 256))
            absmax = nested_map[absmax.long()] * nested.repeat_interleave(block)[: absmax.numel()]
            absmax = absmax + float(state.get("nested_offset", 0.0))
        shape = state["shape"]
        n = int(torch.tensor(shape).prod())
        values = ckpt.get(w + ".quant_map").float()[codes[:n].long()]
        return (values * absmax.float().repeat_interleave(int(state["blocksize"]))[:n]).reshape(shape)

    def members(self, ckpt, m):
        w = m["weight"]
        return [w, m["state"]] + [w + s for s in (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")
                                  if w + s in ckpt]
