"""Packed-integer bases: GPTQ (2/4/8 bits, groups, sym/asym, v1/v2 zero points, desc_act g_idx) and AWQ GEMM int4.
Both store int32 words of `32 // bits` codes; they share the module layout (qweight, qzeros, scales)."""

import torch

from ..errors import LorakitError
from .base import FLOAT_SCALES, Grid, QuantFormat, check_dtypes, round_to
from .rounding import Uniform


CHUNK = 1 << 20  # elements per step of (un)packing: bounded temporaries whatever the module size


def unpack(packed, bits, dim, order=None):
    """int32 words [a, b] -> uint8 codes, `32 // bits` per word along `dim` (0 or 1), lowest bits first (then
    reordered by `order`). Chunked along dim 0 into one preallocated result, so the temporaries stay small."""
    per = 32 // bits
    shape = (packed.shape[0] * per, packed.shape[1]) if dim == 0 else (packed.shape[0], packed.shape[1] * per)
    result = torch.empty(shape, dtype=torch.uint8)
    rows = max(1, CHUNK // max(1, packed[0].numel() * per))
    step = per if dim == 0 else 1  # result rows per packed row
    for i in range(0, packed.shape[0], rows):
        chunk = _unpack(packed[i : i + rows], bits, dim, order)
        result[i * step : i * step + chunk.shape[0]] = chunk
    return result


def _unpack(packed, bits, dim, order):
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    p = (
        packed.to(torch.int32).unsqueeze(-1)
        if dim == packed.ndim - 1
        else packed.to(torch.int32).unsqueeze(dim + 1)
    )
    shape = [1] * p.ndim
    shape[-1 if dim == packed.ndim - 1 else dim + 1] = per
    vals = ((p >> shifts.reshape(shape)) & ((1 << bits) - 1)).to(torch.uint8)
    if order is not None:  # vals[..., i] holds element order[i] of its word
        vals = vals[..., torch.argsort(torch.tensor(order))]
    if dim == packed.ndim - 1:
        return vals.reshape(*packed.shape[:-1], packed.shape[-1] * per)
    return vals.reshape(*packed.shape[:dim], packed.shape[dim] * per, *packed.shape[dim + 1 :])


def pack(codes, bits, dim, order=None):
    """The inverse of unpack: integer codes -> int32 words. Chunked along dim 0 like unpack, into one result."""
    per = 32 // bits
    step = per if dim == 0 else 1  # whole words along dim 0
    rows = max(step, CHUNK // max(1, codes[0].numel()) // step * step)
    shape = (codes.shape[0] // per, codes.shape[1]) if dim == 0 else (codes.shape[0], codes.shape[1] // per)
    result = torch.empty(shape, dtype=torch.int32)
    for i in range(0, codes.shape[0], rows):
        result[i // step : (i + rows) // step] = _pack(codes[i : i + rows], bits, dim, order)
    return result


def _pack(codes, bits, dim, order):
    per = 32 // bits
    c = codes.to(torch.int64)
    if dim == c.ndim - 1:
        c = c.reshape(*c.shape[:-1], c.shape[-1] // per, per)
        slots = c[..., torch.tensor(order)] if order is not None else c
    else:
        slots = c.reshape(*c.shape[:dim], c.shape[dim] // per, per, *c.shape[dim + 1 :]).movedim(dim + 1, -1)
    word = torch.zeros(slots.shape[:-1], dtype=torch.int64)
    for i in range(per):
        word |= slots[..., i] << (bits * i)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


# GPTQ's and AWQ's tensors as AutoGPTQ / AutoAWQ write them: int32 words of codes and zeros, floating scales (another
# dtype would be read as other numbers)
PACKED_DTYPES = {"qweight": ("I32",), "qzeros": ("I32",), "scales": FLOAT_SCALES, "g_idx": ("I32", "I64")}


class PackedInt(QuantFormat):
    """What GPTQ and AWQ share: the module layout (qweight, qzeros, scales, g_idx) and the grid
    W^T[k, n] = scales[g[k], n] * (q[k, n] - z[g[k], n]) with integer codes 0 .. 2^bits - 1."""

    def find(self, ckpt):
        found = {}
        for n in ckpt.where:
            if n.endswith(".qweight") and n[:-8] + ".qzeros" in ckpt and n[:-8] + ".scales" in ckpt:
                m = {"qweight": n, "qzeros": n[:-8] + ".qzeros", "scales": n[:-8] + ".scales"}
                if n[:-8] + ".g_idx" in ckpt:
                    m["g_idx"] = n[:-8] + ".g_idx"
                found[n[:-8]] = m
        return found

    def _codebook(self):
        return Uniform(0, 2**self.bits - 1, torch.uint8)

    def grid(self, ckpt, m):
        zeros = self._zeros(ckpt, m)
        scales = ckpt.get(m["scales"])
        return Grid(
            scales.float(),
            self._groups(ckpt, m, self.shape(ckpt, m)[1]),
            self._codebook(),
            Z=zeros,
            params={"scales": scales, "zeros": zeros},
        )

    def fit(self, ckpt, m, lo, hi):
        """GPTQ's and AWQ's own min/max fit per (group, row), scales rounded to their stored dtype."""
        maxq = 2**self.bits - 1
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        if getattr(self, "sym", False):
            amax = torch.maximum(-lo, hi)
            scale, zero = (2 * amax / maxq).clamp(min=1e-8), torch.full_like(amax, (maxq + 1) / 2)
        else:
            scale = ((hi - lo) / maxq).clamp(min=1e-8)
            zero = torch.round(-lo / scale).clamp(0, maxq)
        scales = round_to(scale, ckpt.get(m["scales"]))
        return Grid(
            scales.float(),
            self._groups(ckpt, m, self.shape(ckpt, m)[1]),
            self._codebook(),
            Z=zero,
            params={"scales": scales, "zeros": zero},
        )


class GPTQ(PackedInt):
    """GPTQ: qweight I32 [in * bits / 32, out] packed along in, qzeros [groups, out * bits / 32] packed along out,
    scales [groups, out], optional g_idx [in]. W^T[k, n] = scales[g[k], n] * (q[k, n] - z[g[k], n]); v1 files
    ("gptq") store z - 1."""

    name = "gptq"

    def __init__(self, bits=4, group_size=128, sym=True, v1=True):
        if bits not in (2, 4, 8):
            raise LorakitError(f"GPTQ with {bits} bits is not supported (2, 4 or 8)")
        if (
            isinstance(group_size, bool)
            or not isinstance(group_size, int)
            or not (group_size > 0 or group_size == -1)
        ):
            raise LorakitError(
                f"GPTQ group_size {group_size!r}: expected a positive integer, or -1 (one group a row)"
            )
        self.bits, self.group_size, self.sym, self.v1 = bits, group_size, sym, v1

    @classmethod
    def configure(cls, q):
        method = q.get("quant_method")
        if method == "gptq" or (method is None and q.get("bits")):
            return cls(
                q.get("bits", 4),
                q.get("group_size", 128),
                q.get("sym", True),
                q.get("checkpoint_format", "gptq") != "gptq_v2",
            )
        return None

    def shape(self, ckpt, m):
        check_dtypes(ckpt, m, PACKED_DTYPES)
        packed = ckpt.entry(m["qweight"]).shape
        out, inn = packed[1], packed[0] * 32 // self.bits
        scales, zeros = ckpt.entry(m["scales"]).shape, ckpt.entry(m["qzeros"]).shape
        per = 32 // self.bits
        if len(scales) != 2 or scales[1] != out or tuple(zeros) != (scales[0], out // per):
            raise LorakitError(
                f"GPTQ tensors do not fit together: qweight {list(packed)}, qzeros {list(zeros)}, "
                f"scales {list(scales)} ({self.bits} bits)",
                path=ckpt.path,
                tensor=m["qweight"],
            )
        if "g_idx" in m and tuple(ckpt.entry(m["g_idx"]).shape) != (inn,):
            raise LorakitError(
                f"g_idx has shape {list(ckpt.entry(m['g_idx']).shape)}, expected [{inn}]",
                path=ckpt.path,
                tensor=m["g_idx"],
            )
        groups = -(-inn // self.group_size) if self.group_size > 0 else 1
        if "g_idx" not in m and scales[0] != groups:
            raise LorakitError(
                f"scales has {scales[0]} groups: group_size {self.group_size} of {inn} inputs makes {groups}",
                path=ckpt.path,
                tensor=m["scales"],
            )
        return (out, inn)

    def _groups(self, ckpt, m, inn):
        if "g_idx" in m:
            g, groups = ckpt.get(m["g_idx"]).long(), ckpt.entry(m["scales"]).shape[0]
            if bool(((g < 0) | (g >= groups)).any()):
                raise LorakitError(
                    f"g_idx holds groups outside 0..{groups - 1} (scales has {groups})",
                    path=ckpt.path,
                    tensor=m["g_idx"],
                )
            return g
        g = self.group_size if self.group_size > 0 else inn
        return torch.arange(inn) // g

    def codes(self, ckpt, m):
        return unpack(ckpt.get(m["qweight"]), self.bits, 0).T  # [out, in], stored as GPTQ's [in, out]

    def _zeros(self, ckpt, m):
        return unpack(ckpt.get(m["qzeros"]), self.bits, 1).float() + (1 if self.v1 else 0)  # [groups, out]

    def encode(self, ckpt, m, codes, grid):
        zeros = grid.params["zeros"] - (1 if self.v1 else 0)
        return {
            m["qweight"]: pack(codes.T, self.bits, 0),
            m["qzeros"]: pack(zeros, self.bits, 1),
            m["scales"]: grid.params["scales"],
        }


AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


class AWQ(PackedInt):
    """AWQ GEMM int4: qweight I32 [in, out / 8] and qzeros [in / g, out / 8] packed along out in the order
    [0, 2, 4, 6, 1, 3, 5, 7]; scales [in / g, out]. W^T = (iw - iz) * scales."""

    name = "awq"

    def __init__(self, group_size=128, bits=4):
        if bits != 4:
            raise LorakitError(f"AWQ with {bits} bits is not supported (GEMM int4)")
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise LorakitError(f"AWQ group_size {group_size!r}: expected a positive integer")
        self.group_size = group_size

    @classmethod
    def configure(cls, q):
        if q.get("quant_method") != "awq":
            return None
        if str(q.get("version", "gemm")).lower() != "gemm":
            raise LorakitError(f"AWQ version {q.get('version')} is not supported (GEMM only)")
        return cls(q.get("group_size", 128), q.get("bits", 4))

    def shape(self, ckpt, m):
        check_dtypes(ckpt, m, PACKED_DTYPES)
        packed = ckpt.entry(m["qweight"]).shape
        out, inn = packed[1] * 8, packed[0]
        scales, zeros = ckpt.entry(m["scales"]).shape, ckpt.entry(m["qzeros"]).shape
        if tuple(scales) != (inn // self.group_size, out) or tuple(zeros) != (
            inn // self.group_size,
            out // 8,
        ):
            raise LorakitError(
                f"AWQ tensors do not fit together: qweight {list(packed)}, qzeros {list(zeros)}, "
                f"scales {list(scales)} (group size {self.group_size})",
                path=ckpt.path,
                tensor=m["qweight"],
            )
        return (out, inn)

    bits = 4

    def codes(self, ckpt, m):
        return unpack(ckpt.get(m["qweight"]), 4, 1, AWQ_ORDER).T  # [out, in], stored as AWQ's [in, out]

    def _zeros(self, ckpt, m):
        return unpack(ckpt.get(m["qzeros"]), 4, 1, AWQ_ORDER).float()  # [groups, out]

    def _groups(self, ckpt, m, inn):
        return torch.arange(inn) // self.group_size

    def encode(self, ckpt, m, codes, grid):
        return {
            m["qweight"]: pack(codes.T, 4, 1, AWQ_ORDER),
            m["qzeros"]: pack(grid.params["zeros"], 4, 1, AWQ_ORDER),
            m["scales"]: grid.params["scales"],
        }
