"""NVFP4 bases: FP4 E2M1 codes (two a byte, the low nibble first; 0, 0.5, 1, 1.5, 2, 3, 4, 6, bit 3 the sign) with an
FP8 E4M3 scale per 16 consecutive inputs of a row and one FP32 scale per tensor, in the two layouts checkpoints come
in:
- compressed-tensors `nvfp4-pack-quantized` (llm-compressor's NVFP4 / NVFP4A16): `weight_packed` U8 [out, in / 2],
  `weight_scale` F8_E4M3 [out, in / 16], `weight_global_scale` F32 [1]: W = code x (weight_scale / global_scale).
  Facts: compressed-tensors compressors/nvfp4 (unpack_fp4_from_uint8, dequantize), checked bit for bit in the tests.
- NVIDIA ModelOpt (`hf_quant_config.json` or config.json `quant_method: modelopt`, `quant_algo: NVFP4`): `weight` U8
  [out, in / 2], `weight_scale` F8_E4M3 [out, in / 16] (rows / columns may be padded past those), `weight_scale_2`
  F32 scalar: W = code x (weight_scale x weight_scale_2). Facts: ModelOpt's unified HF export and its NVFP4QTensor
  dequantization, checked on a file ModelOpt 0.47 exported on the CPU.

A merge keeps the per-tensor scale: fused partners (q / k / v, gate / up, an expert's gate and up) must share it for
the engines that fuse them, as llm-compressor and ModelOpt make them. A refitted block's E4M3 scale is the nearest to
its largest magnitude over 6, as compressed-tensors rounds it (so a value up to 6% past the grid's end is clipped, as
in the producer's own quantization), up to E4M3's 448; beyond that the block saturates, as the report's error says.
"""

import torch

from ..errors import LorakitError
from . import ct_config
from .base import malformed, Grid, QuantFormat, check_dtype
from .mxfp4 import CODEBOOK, nibbles, packed_nibbles

GROUP = 16
E4M3_MAX, E4M3_MIN = 448.0, 2.0**-9  # the largest and the smallest positive E4M3 value
LAYOUTS = {  # layout -> (codes, per-tensor scale), the block scale is weight_scale in both
    "compressed-tensors": ("weight_packed", "weight_global_scale"),
    "modelopt": ("weight", "weight_scale_2"),
}


class NVFP4(QuantFormat):
    name = "nvfp4"

    def __init__(self, layout):
        self.layout = layout
        self.codes_role, self.tensor_role = LAYOUTS[layout]

    @classmethod
    def configure(cls, q):
        if q.get("quant_method") == "modelopt":
            if str(q.get("quant_algo", "")).upper() != "NVFP4":
                return None
            if q.get("group_size", GROUP) != GROUP:
                raise LorakitError(
                    f"ModelOpt NVFP4 with groups of {q.get('group_size')!r} is not supported (16)"
                )
            return cls("modelopt")
        args = ct_config.weights_for(q, cls.name)
        if not args:
            return None
        sizes = {w.get("group_size") for w in args}
        if sizes != {GROUP}:
            raise LorakitError(f"NVFP4 with groups of {sorted(map(str, sizes))[0]} is not supported (16)")
        return cls("compressed-tensors")

    def find(self, ckpt):
        found = {}
        suffix = "." + self.codes_role
        for n in ckpt.where:
            stem = n.removesuffix(suffix)
            roles = (self.codes_role, "weight_scale", self.tensor_role)
            if stem != n and ckpt.entry(n).dtype == "U8" and all(f"{stem}.{r}" in ckpt for r in roles[1:]):
                found[stem] = {r: f"{stem}.{r}" for r in roles}
        return found

    def shape(self, ckpt, m):
        check_dtype(ckpt, m, self.codes_role, ("U8",))
        check_dtype(ckpt, m, "weight_scale", ("F8_E4M3",))
        check_dtype(ckpt, m, self.tensor_role, ("F32",))
        packed = tuple(ckpt.entry(m[self.codes_role]).shape)
        scale = tuple(ckpt.entry(m["weight_scale"]).shape)
        if len(packed) != 2 or packed[1] * 2 % GROUP:
            raise malformed(
                ckpt,
                m[self.codes_role],
                f"{self.codes_role} has shape {list(packed)}: expected [out, in / 2] with in a multiple of 16",
            )
        out, inn = packed[0], packed[1] * 2
        padded = (
            self.layout == "modelopt" and len(scale) == 2 and scale[0] >= out and scale[1] >= inn // GROUP
        )
        if scale != (out, inn // GROUP) and not padded:
            raise malformed(
                ckpt,
                m["weight_scale"],
                f"weight_scale has shape {list(scale)}: expected [{out}, {inn // GROUP}] (one E4M3 scale per "
                "16 inputs of a row)",
            )
        if ckpt.entry(m[self.tensor_role]).numel != 1:
            raise malformed(
                ckpt,
                m[self.tensor_role],
                f"{self.tensor_role} has {ckpt.entry(m[self.tensor_role]).numel} values: expected one",
            )
        return out, inn

    def _tensor_scale(self, ckpt, m):
        """The per-tensor scale, refused unless finite and positive (W would be NaN / Inf or zero everywhere)."""
        s = float(ckpt.get(m[self.tensor_role]).reshape(()))
        if not (0 < s < float("inf")):
            raise malformed(
                ckpt,
                m[self.tensor_role],
                f"{self.tensor_role} is {s}: expected a finite positive number",
            )
        return torch.tensor(s, dtype=torch.float32)

    def codes(self, ckpt, m):
        return nibbles(ckpt.get(m[self.codes_role]))

    def _grid(self, ckpt, m, stored):
        """The grid of block scales `stored` (the stored tensor's shape, padding included)."""
        out, inn = self.shape(ckpt, m)
        blocks = stored[:out, : inn // GROUP].float()
        tensor = self._tensor_scale(ckpt, m)
        S = blocks / tensor if self.layout == "compressed-tensors" else blocks * tensor
        return Grid(S.T.contiguous(), torch.arange(inn) // GROUP, CODEBOOK, params={"weight_scale": stored})

    def grid(self, ckpt, m):
        return self._grid(ckpt, m, ckpt.get(m["weight_scale"]))

    def fit(self, ckpt, m, lo, hi):
        """Each block's E4M3 scale its largest magnitude over 6, to the nearest E4M3 value as compressed-tensors
        rounds it (rounding up would cost a block whose range grew by a hair an E4M3 step, 12.5%: its codes all
        re-rounded onto a coarser grid); the tensor's scale kept."""
        out, inn = self.shape(ckpt, m)
        tensor = self._tensor_scale(ckpt, m)
        wanted = torch.maximum(-lo, hi).T / 6.0  # [out, blocks]: the scale's value
        wanted = wanted * tensor if self.layout == "compressed-tensors" else wanted / tensor
        old = ckpt.get(m["weight_scale"])
        stored = old.clone()
        stored[:out, : inn // GROUP] = wanted.clamp(E4M3_MIN, E4M3_MAX).to(torch.float8_e4m3fn)
        return self._grid(ckpt, m, stored)

    def encode(self, ckpt, m, codes, grid):
        old = ckpt.get(m[self.codes_role])
        return {
            m[self.codes_role]: packed_nibbles(codes, old),
            m["weight_scale"]: grid.params["weight_scale"],
        }
