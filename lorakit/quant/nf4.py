"""bitsandbytes NF4 bases (read and dequantize), with and without double quantization."""
import torch

from ..errors import LorakitError
from ..io.jsonio import parse_json
from .base import QuantFormat

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


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
        """The quant_state JSON, checked against the sizes of the stored tensors before anything is allocated from
        it (a claimed blocksize or shape must fit the bytes that are really there)."""
        if ckpt.entry(m["state"]).nbytes > 1 << 20:
            raise LorakitError("quant_state over 1 MB", path=ckpt.path, tensor=m["state"])
        state = parse_json(bytes(ckpt.get(m["state"]).numpy().tobytes()), ckpt.path, f"{m['state']}")
        w = m["weight"]

        def bad(why):
            return LorakitError(f"quant_state does not fit the stored tensors: {why}", path=ckpt.path,
                                tensor=m["state"])
        shape, block = state.get("shape"), state.get("blocksize")
        if not (isinstance(shape, list) and shape and all(isinstance(d, int) and d > 0 for d in shape)):
            raise bad(f"shape {shape!r}")
        if block not in BLOCKSIZES:
            raise bad(f"blocksize {block!r} (bitsandbytes uses {', '.join(map(str, BLOCKSIZES))})")
        n = 1
        for d in shape:
            n *= d
        for part in (".absmax", ".quant_map"):
            if w + part not in ckpt:
                raise bad(f"no {w + part}")
        if 2 * ckpt.entry(w).numel < n:
            raise bad(f"shape {shape} needs {n} codes, the weight holds {2 * ckpt.entry(w).numel}")
        if ckpt.entry(w + ".absmax").numel != -(-n // block):
            raise bad(f"{ckpt.entry(w + '.absmax').numel} absmax values for {-(-n // block)} blocks")
        if ckpt.entry(w + ".quant_map").numel != 16:
            raise bad("quant_map must hold the 16 levels")
        if w + ".nested_absmax" in ckpt:
            nested = state.get("nested_blocksize", 256)
            if nested not in BLOCKSIZES or w + ".nested_quant_map" not in ckpt or \
                    ckpt.entry(w + ".nested_absmax").numel * nested < ckpt.entry(w + ".absmax").numel:
                raise bad("the nested (double) quantization does not cover the absmax values")
        return state

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
