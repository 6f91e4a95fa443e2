"""bitsandbytes NF4 bases (read and dequantize), with and without double quantization."""

import math

import torch

from ..errors import LorakitError
from ..io.jsonio import parse_json
from .base import Grid, QuantFormat, round_to
from .rounding import Table

# bitsandbytes' NF4 levels (QLoRA, Dettmers et al. 2023): quantiles of N(0, 1) scaled to [-1, 1]
NF4_LEVELS = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


class NF4(QuantFormat):
    """bitsandbytes NF4: weight U8 (two 4-bit codes per byte, the first in the high
    nibble), weight.absmax per block (or uint8 with nested_absmax / nested_quant_map / offset: double quantization),
    weight.quant_map (the 16 NF4 levels), weight.quant_state.bitsandbytes__nf4 (JSON: blocksize, shape, ...)."""

    name = "nf4"

    @classmethod
    def configure(cls, q):
        return cls() if q.get("quant_method") in (None, "bitsandbytes") else None

    def find(self, ckpt):
        return {
            n[:-7]: {"weight": n, "state": k}
            for n in ckpt.where
            if n.endswith(".weight")
            for k in (n + ".quant_state.bitsandbytes__nf4", n + ".quant_state.bitsandbytes__fp4")
            if k in ckpt
        }

    def _state(self, ckpt, m):
        """The quant_state JSON, checked against the sizes of the stored tensors before anything is allocated from
        it (a claimed blocksize or shape must fit the bytes that are really there)."""
        if ckpt.entry(m["state"]).nbytes > 1 << 20:
            raise LorakitError("quant_state over 1 MB", path=ckpt.path, tensor=m["state"])
        state = parse_json(bytes(ckpt.get(m["state"]).numpy().tobytes()), ckpt.path, f"{m['state']}")
        w = m["weight"]

        def bad(why):
            return LorakitError(
                f"quant_state does not fit the stored tensors: {why}", path=ckpt.path, tensor=m["state"]
            )

        shape, block = state.get("shape"), state.get("blocksize")
        if not (isinstance(shape, list) and shape and all(isinstance(d, int) and d > 0 for d in shape)):
            raise bad(f"shape {shape!r}")
        if block not in BLOCKSIZES:
            raise bad(f"blocksize {block!r} (bitsandbytes uses {', '.join(map(str, BLOCKSIZES))})")
        n = math.prod(shape)
        for part in (".absmax", ".quant_map"):
            if w + part not in ckpt:
                raise bad(f"no {w + part}")
        # as bitsandbytes stores them (another dtype reads as other numbers; the codes' own storage varies)
        nested = w + ".nested_absmax" in ckpt
        dtypes = {".absmax": "U8" if nested else "F32", ".quant_map": "F32"}
        dtypes.update({".nested_absmax": "F32", ".nested_quant_map": "F32"} if nested else {})
        for part, dtype in dtypes.items():
            if w + part in ckpt and ckpt.entry(w + part).dtype != dtype:
                raise bad(f"{w + part} is {ckpt.entry(w + part).dtype}, expected {dtype}")
        if 2 * ckpt.entry(w).numel < n:
            raise bad(f"shape {shape} needs {n} codes, the weight holds {2 * ckpt.entry(w).numel}")
        if ckpt.entry(w + ".absmax").numel != -(-n // block):
            raise bad(f"{ckpt.entry(w + '.absmax').numel} absmax values for {-(-n // block)} blocks")
        if ckpt.entry(w + ".quant_map").numel != 16:
            raise bad("quant_map must hold the 16 levels")
        if w + ".nested_absmax" in ckpt:
            nested = state.get("nested_blocksize", 256)
            if (
                nested not in BLOCKSIZES
                or w + ".nested_quant_map" not in ckpt
                or ckpt.entry(w + ".nested_absmax").numel * nested < ckpt.entry(w + ".absmax").numel
            ):
                raise bad("the nested (double) quantization does not cover the absmax values")
        return state

    def shape(self, ckpt, m):
        return tuple(self._state(ckpt, m)["shape"])

    def _absmax(self, ckpt, m, state):
        """The absmax of every block in fp32 (double quantization undone)."""
        w = m["weight"]
        absmax = ckpt.get(w + ".absmax")
        if w + ".nested_absmax" in ckpt:  # double quantization of the absmax values
            nested = ckpt.get(w + ".nested_absmax").float()
            nested_map = ckpt.get(w + ".nested_quant_map").float()
            block = int(state.get("nested_blocksize", 256))
            absmax = nested_map[absmax.long()] * nested.repeat_interleave(block)[: absmax.numel()]
            absmax = absmax + float(state.get("nested_offset", 0.0))
        return absmax.float()

    def _indices(self, ckpt, m, n):
        """The n stored 4-bit indices, flat (two per byte, the first in the high nibble)."""
        packed = ckpt.get(m["weight"]).reshape(-1)
        return torch.stack([packed >> 4, packed & 15], 1).reshape(-1)[:n]

    def dequantize(self, ckpt, m):
        """Blocks run over the flattened weight, so rows need not be whole blocks (unlike the grid of a write)."""
        state = self._state(ckpt, m)
        shape = state["shape"]
        n = int(torch.tensor(shape).prod())
        values = ckpt.get(m["weight"] + ".quant_map").float()[self._indices(ckpt, m, n).long()]
        return (values * self._absmax(ckpt, m, state).repeat_interleave(int(state["blocksize"]))[:n]).reshape(
            shape
        )

    def _layout(self, ckpt, m):
        """(state, out, in, blocksize, segment) for writing a 2-D weight. bitsandbytes' blocks run over the flattened
        weight and may span rows; a row cut into segments of gcd(in, blocksize) columns has each segment inside one
        block, so the segments are the grid's column groups and a block's absmax is every one of its segments'."""
        state = self._state(ckpt, m)
        if len(state["shape"]) != 2:
            raise LorakitError(
                f"NF4 weight of shape {state['shape']} is not 2-D: merge to full precision with --dtype",
                path=ckpt.path,
                tensor=m["weight"],
            )
        out, inn = state["shape"]
        bs = int(state["blocksize"])
        return state, out, inn, bs, math.gcd(inn, bs)

    def _block_of_segment(self, out, inn, bs, seg):
        """[out * in / seg]: the block of each segment, in row-major order."""
        return torch.arange(out * inn // seg) * seg // bs

    def _grid(self, ckpt, m, absmax, stored):
        """The grid of block absmax values `absmax` (fp32, one a block; `stored`: as the file keeps them)."""
        _, out, inn, bs, seg = self._layout(ckpt, m)
        S = absmax[self._block_of_segment(out, inn, bs, seg)].reshape(out, inn // seg).T.contiguous()
        return Grid(
            S,
            torch.arange(inn) // seg,
            Table(ckpt.get(m["weight"] + ".quant_map")),
            params={"absmax": stored},
        )

    def codes(self, ckpt, m):
        _, out, inn, _, _ = self._layout(ckpt, m)
        return self._indices(ckpt, m, out * inn).reshape(out, inn)

    def grid(self, ckpt, m):
        state = self._layout(ckpt, m)[0]
        return self._grid(ckpt, m, self._absmax(ckpt, m, state), ckpt.get(m["weight"] + ".absmax"))

    def fit(self, ckpt, m, lo, hi):
        state, out, inn, bs, seg = self._layout(ckpt, m)
        if m["weight"] + ".nested_absmax" in ckpt:
            raise LorakitError(
                "fresh scales for double-quantized NF4 (--strategy rescale/original) are not supported: "
                "use feedback, same-grid or stochastic, or --dtype",
                path=ckpt.path,
                tensor=m["weight"],
            )
        segments = torch.maximum(-lo, hi).T.reshape(-1)  # [out * in / seg], row-major
        blocks = ckpt.entry(m["weight"] + ".absmax").numel
        absmax = torch.zeros(blocks).scatter_reduce_(
            0, self._block_of_segment(out, inn, bs, seg), segments, "amax"
        )
        stored = round_to(absmax.clamp(min=1e-12), ckpt.get(m["weight"] + ".absmax"))
        return self._grid(ckpt, m, stored.float().reshape(-1), stored)

    def encode(self, ckpt, m, codes, grid):
        w = m["weight"]
        flat = codes.reshape(-1)
        if flat.numel() % 2:
            flat = torch.cat([flat, flat.new_zeros(1)])
        pairs = flat.reshape(-1, 2)
        packed = (pairs[:, 0] << 4 | pairs[:, 1]).to(torch.uint8)
        return {w: packed.reshape(ckpt.entry(w).shape), w + ".absmax": grid.params["absmax"]}

    def members(self, ckpt, m):
        w = m["weight"]
        return [w, m["state"]] + [
            w + s for s in (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map") if w + s in ckpt
        ]
