"""compressed-tensors `pack-quantized` bases (llm-compressor's W4A16, W4A16_ASYM, W8A16...: the usual int4 / int8
checkpoint for vLLM).

Per module: `weight_packed` I32 [out, ceil(in x bits / 32)] (element j of a row at bits (j x bits) mod 32 of word
j x bits / 32, stored as q + 2^(bits-1)), `weight_scale` [out, groups] (one group: per channel), `weight_shape` I64
[2] (the unpadded [out, in]), `weight_zero_point` asymmetric only (I32 packed along out: [ceil(out x bits / 32),
groups]; older files I8 [out, groups]), `weight_g_idx` [in] from GPTQ's activation ordering in older files.
W = (q - zp) x scale. Facts: compressed-tensors compressors/pack_quantized (pack_to_int32 / unpack_from_int32),
checked bit for bit against its decompression in the tests.
"""

import torch

from ..errors import LorakitError
from . import ct_config
from .base import (
    FLOAT_SCALES,
    malformed,
    Grid,
    QuantFormat,
    check_dtype,
    check_dtypes,
    check_shape,
    round_up_to,
)
from .gptq_awq import pack, unpack
from .rounding import Uniform

BITS = (2, 4, 8)  # whole codes a word: 3, 5, 6 and 7 bits cross words
ROLES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")
# as compressed-tensors writes them (weight_packed's I32 is checked with its shape)
DTYPES = {
    "weight_shape": ("I64", "I32"),
    "weight_scale": FLOAT_SCALES,
    "weight_zero_point": ("I32", "I8"),
    "weight_g_idx": ("I32", "I64"),
}


class CTPacked(QuantFormat):
    name = "ct-int"

    def __init__(self, bits, args=()):
        self.bits = set(bits)
        # what the config says of the groups this reader reads (None: left to compressed-tensors' default)
        self.strategies = {w.get("strategy") for w in args} - {None}
        self.sizes = {w.get("group_size") for w in args} - {None}
        self.symmetric = {w.get("symmetric") for w in args} - {None}

    @classmethod
    def configure(cls, q):
        args = ct_config.weights_for(q, cls.name)
        if not args:
            return None
        bits = {int(w.get("num_bits", 8)) for w in args}
        if not bits <= set(BITS):
            raise LorakitError(
                f"compressed-tensors pack-quantized with {sorted(bits - set(BITS))[0]} bits is not supported "
                "(2, 4 or 8)"
            )
        return cls(bits, args)

    def find(self, ckpt):
        found = {}
        for n in ckpt.where:
            stem = n.removesuffix(".weight_packed")
            if stem != n:
                found[stem] = {r: f"{stem}.{r}" for r in ROLES if f"{stem}.{r}" in ckpt}
        return found

    def _layout(self, ckpt, m):
        """(out, in, bits, groups), every member checked against the others."""
        for role in ("weight_scale", "weight_shape"):
            if role not in m:
                raise malformed(ckpt, m["weight_packed"], f"{role} is missing")
        check_dtypes(ckpt, m, DTYPES)
        check_shape(ckpt, m, "weight_shape", (2,), "the unpadded [out, in]")
        out, inn = (int(v) for v in ckpt.get(m["weight_shape"]))
        check_dtype(ckpt, m, "weight_packed", ("I32",))
        packed = tuple(ckpt.entry(m["weight_packed"]).shape)
        bits = next((b for b in sorted(self.bits) if packed == (out, -(-inn * b // 32))), None)
        if out < 1 or inn < 1 or bits is None:
            widths = " or ".join(str(-(-inn * b // 32)) for b in sorted(self.bits))
            raise malformed(
                ckpt,
                m["weight_packed"],
                f"weight_packed has shape {list(packed)}: weight_shape [{out}, {inn}] at "
                f"{'/'.join(map(str, sorted(self.bits)))} bits packs to [{out}, {widths}]",
            )
        scale = tuple(ckpt.entry(m["weight_scale"]).shape)
        groups = scale[1] if len(scale) == 2 else 0
        if len(scale) != 2 or scale[0] != out or groups < 1 or ("weight_g_idx" not in m and inn % groups):
            raise malformed(
                ckpt,
                m["weight_scale"],
                f"weight_scale has shape {list(scale)}: expected [{out}, groups] with groups dividing {inn}",
            )
        if "weight_zero_point" in m:
            plain = ckpt.entry(m["weight_zero_point"]).dtype == "I8"
            expected = (out, groups) if plain else (-(-out * bits // 32), groups)
            check_shape(
                ckpt, m, "weight_zero_point", expected, f"zero points of {bits} bits packed along out"
            )
        if "weight_g_idx" in m:
            check_shape(ckpt, m, "weight_g_idx", (inn,), "the group of each input column")
        self._agrees(ckpt, m, inn, groups)
        return out, inn, bits, groups

    def _agrees(self, ckpt, m, inn, groups):
        """The tensors as the config describes them: one scale a row for the channel and tensor strategies, in /
        group_size groups for group, zero points exactly where it says asymmetric (an engine reads the config)."""
        said = ", ".join(sorted(self.strategies))
        if self.strategies and self.strategies <= {"channel", "tensor"} and groups != 1:
            raise malformed(
                ckpt, m["weight_scale"], f"weight_scale has {groups} groups a row: strategy {said} has 1"
            )
        if self.strategies == {"group"} and self.sizes and all(-(-inn // g) != groups for g in self.sizes):
            sizes = " or ".join(map(str, sorted(self.sizes)))
            raise malformed(
                ckpt,
                m["weight_scale"],
                f"weight_scale has {groups} groups a row: group_size {sizes} makes {-(-inn // min(self.sizes))}",
            )
        if self.symmetric == {True} and "weight_zero_point" in m:
            raise malformed(
                ckpt, m["weight_zero_point"], "weight_zero_point is stored, but the config says symmetric"
            )
        if self.symmetric == {False} and "weight_zero_point" not in m:
            raise malformed(
                ckpt, m["weight_packed"], "weight_zero_point is missing: the config says asymmetric"
            )

    def shape(self, ckpt, m):
        return self._layout(ckpt, m)[:2]

    def codes(self, ckpt, m):
        out, inn, bits, _ = self._layout(ckpt, m)
        return unpack(ckpt.get(m["weight_packed"]), bits, 1)[:, :inn].contiguous()

    def _codebook(self, bits):
        return Uniform(0, 2**bits - 1, torch.uint8)

    def _groups(self, ckpt, m, inn, groups):
        if "weight_g_idx" not in m:
            return torch.arange(inn) // (inn // groups)
        g = ckpt.get(m["weight_g_idx"]).long()
        if bool(((g < 0) | (g >= groups)).any()):
            raise malformed(
                ckpt,
                m["weight_g_idx"],
                f"weight_g_idx holds groups outside 0..{groups - 1} (weight_scale has {groups})",
            )
        return g

    def grid(self, ckpt, m):
        out, inn, bits, groups = self._layout(ckpt, m)
        scale = ckpt.get(m["weight_scale"])
        if "weight_zero_point" in m:
            zp = ckpt.get(m["weight_zero_point"])
            Z = (
                zp.float() + 2 ** (bits - 1) if zp.dtype == torch.int8 else unpack(zp, bits, 0)[:out].float()
            ).T
        else:
            Z = torch.full((groups, out), float(2 ** (bits - 1)))
        return Grid(
            scale.float().T.contiguous(),
            self._groups(ckpt, m, inn, groups),
            self._codebook(bits),
            Z=Z.contiguous(),
            params={"weight_scale": scale, "zeros": Z},
        )

    def fit(self, ckpt, m, lo, hi):
        """compressed-tensors' min/max fit without its clipping: symmetric grids take the scale that holds both
        ends (2^(b-1) - 1 codes above zero, 2^(b-1) below), asymmetric ones the range over 2^b - 1 steps; scales
        rounded up into their stored dtype."""
        out, inn, bits, groups = self._layout(ckpt, m)
        half, maxq = 2 ** (bits - 1), 2**bits - 1
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        if "weight_zero_point" in m:
            scale = ((hi - lo) / maxq).clamp(min=1e-8)
            Z = torch.round(-lo / scale).clamp(0, maxq)
        else:
            scale = torch.maximum(hi / (half - 1), -lo / half).clamp(min=1e-8)
            Z = torch.full_like(scale, float(half))
        stored = round_up_to(scale.T.contiguous(), ckpt.get(m["weight_scale"]))
        return Grid(
            stored.float().T.contiguous(),
            self._groups(ckpt, m, inn, groups),
            self._codebook(bits),
            Z=Z,
            params={"weight_scale": stored, "zeros": Z},
        )

    def encode(self, ckpt, m, codes, grid):
        out, inn, bits, _ = self._layout(ckpt, m)
        encoded = {
            m["weight_packed"]: pack(padded(codes, 32 // bits, 1), bits, 1),
            m["weight_scale"]: grid.params["weight_scale"],
        }
        if "weight_zero_point" in m:
            zp = grid.params["zeros"].T.contiguous()  # [out, groups], stored codes
            if ckpt.entry(m["weight_zero_point"]).dtype == "I8":
                encoded[m["weight_zero_point"]] = (zp - 2 ** (bits - 1)).to(torch.int8)
            else:
                encoded[m["weight_zero_point"]] = pack(padded(zp.to(torch.uint8), 32 // bits, 0), bits, 0)
        return encoded


def padded(codes, per, dim):
    """Codes padded with zeros along `dim` to whole words of `per`, as compressed-tensors pads."""
    extra = -codes.shape[dim] % per
    if not extra:
        return codes.contiguous()
    shape = list(codes.shape)
    shape[dim] = extra
    return torch.cat([codes, torch.zeros(shape, dtype=codes.dtype)], dim)
