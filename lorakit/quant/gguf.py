"""llama.cpp's GGUF block quantizations as a QuantFormat: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the k-quants Q2_K..Q6_K.

Each type is a table (ggml-common.h's block structs and dequantize_row_* in ggml-quants.c, as facts): the block's
size, where its fp16 super-scales sit, which bits of which bytes make each element's code and each sub-block's
integer scale (and min). Unpacking and packing both follow the table, so they cannot disagree. Values:
  symmetric types  W = d * sc * (q - Z0)            (Q8_0, Q4_0, Q5_0: sc = 1; Q3_K: sc = 6-bit - 32; Q6_K: int8)
  affine types     W = d * sc * q - dmin * m        (Q4_1, Q5_1: sc = 1, -dmin * m = the fp16 min; Q2_K, Q4_K, Q5_K)
so the Grid is S = d * sc per sub-block of 16 or 32 input columns and Z = Z0, or Z = dmin * m / S. Requantizing on the
stored grid rewrites only the codes' bits: the scales' bytes stay as they were. A sub-block whose scale is 0 holds a
constant that no code changes; it gets a vanishing scale so that the rounding sees that constant (its codes are kept).
Other GGML types (IQ*, TQ*, MXFP4) are read through the gguf package's dequantization when it is installed.
"""

import math
import threading
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

import torch

from ..errors import LorakitError, opt
from .base import Factored, Grid, QuantFormat, Stored
from .rounding import Uniform

DEAD = (
    2.0**-100
)  # the scale standing in for 0: values within 1e-28 of the constant, Z = M / DEAD still finite
ROWS = 512  # rows packed / unpacked at once: [ROWS, in] byte temporaries


@dataclass(frozen=True)
class BlockType:
    name: str
    block: int  # elements per block
    size: int  # bytes per block
    sub: int  # elements per sub-block (one scale)
    bits: int  # code bits
    code: tuple  # pieces of an element's code, low bits first: (byte(e), shift(e), width)
    d: int  # byte offset of the fp16 d
    affine: bool = False
    dmin: int = None  # byte offset of the fp16 dmin (k-quants) or m (Q4_1, Q5_1: the min itself)
    scale: tuple = ()  # pieces of sub-block k's integer scale: (byte(k), shift(k), width); () for sc = 1
    minimum: tuple = ()  # pieces of sub-block k's integer min (affine k-quants)
    scale_bits: int = 0
    scale_signed: bool = False  # Q6_K: int8 scales
    scale_offset: int = 0  # Q3_K: stored scale - 32
    zero: int = 0  # Z0 of the symmetric types
    signed_codes: bool = False  # Q8_0: int8 codes

    def codebook(self):
        if self.signed_codes:
            return Uniform(-128, 127, torch.int8)
        return Uniform(0, (1 << self.bits) - 1, torch.uint8)


def _piece(byte, shift, width):
    byte = np.asarray(byte, dtype=np.int64)
    return (byte, np.broadcast_to(np.asarray(shift, dtype=np.int64), byte.shape).copy(), width)


E32, E256, S16 = np.arange(32), np.arange(256), np.arange(16)
_half, _r = E256 // 128, E256 % 128
_chunk, _r64 = E256 // 64, E256 % 64


def _k4_scales():
    """get_scale_min_k4: 8 sub-blocks' 6-bit scale and min in 12 bytes at offset 4."""
    j = np.arange(8)
    lo = j < 4
    scale = (
        _piece(np.where(lo, 4 + j, 8 + j), 0, 4),  # low 4 bits (bits 0-3 of q[j] or of q[j + 4])
        _piece(np.where(lo, 4 + j, j), np.where(lo, 4, 6), 2),
    )  # j < 4: bits 4-5 of q[j]; else bits 6-7 of q[j-4]
    minimum = (
        _piece(np.where(lo, 8 + j, 8 + j), np.where(lo, 0, 4), 4),
        _piece(np.where(lo, 8 + j, 4 + j), np.where(lo, 4, 6), 2),
    )
    return scale, minimum


K4_SCALE, K4_MIN = _k4_scales()
_k = S16
Q3K_SCALE = (
    _piece(96 + np.where(_k < 8, _k, _k - 8), np.where(_k < 8, 0, 4), 4),
    _piece(104 + _k % 4, 2 * (_k // 4), 2),
)

TYPES = {
    t.name: t
    for t in (
        BlockType("Q8_0", 32, 34, 32, 8, (_piece(2 + E32, 0, 8),), d=0, signed_codes=True),
        BlockType("Q4_0", 32, 18, 32, 4, (_piece(2 + E32 % 16, 4 * (E32 // 16), 4),), d=0, zero=8),
        BlockType(
            "Q4_1", 32, 20, 32, 4, (_piece(4 + E32 % 16, 4 * (E32 // 16), 4),), d=0, affine=True, dmin=2
        ),
        BlockType(
            "Q5_0",
            32,
            22,
            32,
            5,
            (_piece(6 + E32 % 16, 4 * (E32 // 16), 4), _piece(2 + E32 // 8, E32 % 8, 1)),
            d=0,
            zero=16,
        ),
        BlockType(
            "Q5_1",
            32,
            24,
            32,
            5,
            (_piece(8 + E32 % 16, 4 * (E32 // 16), 4), _piece(4 + E32 // 8, E32 % 8, 1)),
            d=0,
            affine=True,
            dmin=2,
        ),
        BlockType(
            "Q2_K",
            256,
            84,
            16,
            2,
            (_piece(16 + _half * 32 + E256 % 32, 2 * (_r // 32), 2),),
            d=80,
            affine=True,
            dmin=82,
            scale=(_piece(S16, 0, 4),),
            minimum=(_piece(S16, 4, 4),),
            scale_bits=4,
        ),
        BlockType(
            "Q3_K",
            256,
            110,
            16,
            3,
            (
                _piece(32 + _half * 32 + E256 % 32, 2 * (_r // 32), 2),
                _piece(E256 % 32, 4 * _half + _r // 32, 1),
            ),
            d=108,
            scale=Q3K_SCALE,
            scale_bits=6,
            scale_offset=32,
            zero=4,
        ),
        BlockType(
            "Q4_K",
            256,
            144,
            32,
            4,
            (_piece(16 + _chunk * 32 + _r64 % 32, 4 * (_r64 // 32), 4),),
            d=0,
            affine=True,
            dmin=2,
            scale=K4_SCALE,
            minimum=K4_MIN,
            scale_bits=6,
        ),
        BlockType(
            "Q5_K",
            256,
            176,
            32,
            5,
            (
                _piece(48 + _chunk * 32 + _r64 % 32, 4 * (_r64 // 32), 4),
                _piece(16 + _r64 % 32, 2 * _chunk + _r64 // 32, 1),
            ),
            d=0,
            affine=True,
            dmin=2,
            scale=K4_SCALE,
            minimum=K4_MIN,
            scale_bits=6,
        ),
        BlockType(
            "Q6_K",
            256,
            210,
            16,
            6,
            (
                _piece(_half * 64 + E256 % 32 + 32 * ((_r // 32) % 2), 4 * (_r // 64), 4),
                _piece(128 + _half * 32 + E256 % 32, 2 * (_r // 32), 2),
            ),
            d=208,
            scale=(_piece(192 + S16, 0, 8),),
            scale_bits=8,
            scale_signed=True,
            zero=32,
        ),
    )
}


def _byte_run(pieces):
    """(first, count) when `pieces` are whole consecutive bytes (Q8_0's codes): a slice of each block, else None."""
    if len(pieces) != 1 or pieces[0][2] != 8 or pieces[0][1].any():
        return None
    byte = pieces[0][0]
    first = int(byte[0])
    return (first, len(byte)) if (byte == np.arange(first, first + len(byte))).all() else None


def _gather(raw, pieces):
    """Unsigned integers assembled from bit pieces of each block's bytes: raw [rows, blocks, size] uint8 ->
    [rows, blocks, n] uint8 (every code and scale here fits a byte)."""
    run = _byte_run(pieces)
    if run is not None:  # a slice: 10x faster than the general gather
        return raw[:, :, run[0] : run[0] + run[1]]
    out, at = None, 0
    for byte, shift, width in pieces:
        v = (raw[:, :, torch.from_numpy(byte)] >> torch.from_numpy(shift).to(torch.uint8)) & (
            (1 << width) - 1
        )
        out = v if out is None else out.bitwise_or_(v << at)
        at += width
    return out


def _scatter(raw, pieces, values):
    """raw with the bits of `pieces` replaced by `values` [rows, blocks, n] uint8 (the other bits kept). The pieces
    of one byte never overlap, so adding them is OR-ing them."""
    acc = raw.clone()
    run = _byte_run(pieces)
    if run is not None:
        acc[:, :, run[0] : run[0] + run[1]] = values
        return acc
    at = 0
    for byte, shift, width in pieces:
        index, sh = torch.from_numpy(byte), torch.from_numpy(shift).to(torch.uint8)
        mask = torch.zeros(raw.shape[-1], dtype=torch.uint8).index_add_(0, index, ((1 << width) - 1) << sh)
        acc.bitwise_and_(~mask)
        acc.index_add_(2, index, ((values >> at) & ((1 << width) - 1)) << sh)
        at += width
    return acc


def _f16(raw, offset):
    """An fp16 field of every block as fp32 [rows, blocks]."""
    return raw[:, :, offset : offset + 2].contiguous().view(torch.float16)[..., 0].float()


def _put_f16(raw, offset, values):
    raw[:, :, offset : offset + 2] = values.to(torch.float16).unsqueeze(-1).view(torch.uint8)


class GGUFBlocks(QuantFormat):
    """Every 2-D tensor of a GGUF checkpoint stored in a block type; one module per tensor ({"weight": name})."""

    name = "gguf"
    _read = threading.local()  # per worker thread: the bytes of the module it works on (_blocks)

    @classmethod
    def configure(cls, qconfig):
        return None  # found by its container (lorakit.io.gguf), not by a quantization_config

    def find(self, ckpt):
        from ..io.gguf import PLAIN

        return {
            n[: -len(".weight")]: {"weight": n}
            for n in ckpt.where
            if n.endswith(".weight")
            and ckpt.entry(n).dtype not in PLAIN
            and len(ckpt.entry(n).shape) in (2, 3)
        }

    def _type(self, ckpt, m):
        kind = ckpt.entry(m["weight"]).dtype
        if kind not in TYPES:
            raise no_codec(ckpt.path, m["weight"], kind)
        return TYPES[kind]

    @contextmanager
    def held(self, ckpt, m):
        """A requantized module's bytes are read four to six times (codes, grid, each fit; a read costs more than a
        fit's arithmetic): while it is requantized, its worker thread keeps them, read once."""
        self._read.held = (ckpt, m["weight"], [])
        try:
            yield
        finally:
            self._read.held = None

    def _blocks(self, ckpt, m, copy=False):
        """(type, the tensor's bytes [rows, blocks, block size]); `copy` for a caller that writes into them (a grid:
        encode spends it)."""
        t, (out, inn) = self._type(ckpt, m), self.shape(ckpt, m)
        held = getattr(self._read, "held", None)
        if held is None or held[0] is not ckpt or held[1] != m["weight"]:
            return t, ckpt.get(m["weight"]).reshape(out, inn // t.block, t.size)
        if not held[2]:
            held[2].append(ckpt.get(m["weight"]).reshape(out, inn // t.block, t.size))
        return t, held[2][0].clone() if copy else held[2][0]

    def codes(self, ckpt, m):
        t, raw = self._blocks(ckpt, m)
        out = torch.empty(raw.shape[0], raw.shape[1] * t.block, dtype=t.codebook().storage)
        for r0 in range(0, raw.shape[0], ROWS):
            c = _gather(raw[r0 : r0 + ROWS], t.code).reshape(-1, out.shape[1])
            out[r0 : r0 + ROWS] = c.view(torch.int8) if t.signed_codes else c
        return out

    def _parts(self, t, raw):
        """The value is S * q - M with S = d * sc and M = dmin * m per sub-block: {"S": (d, sc), "M": (dmin, m)}
        with d, dmin fp32 per block [rows, blocks] (from fp16) and sc, m integers per sub-block [rows, blocks, per]
        (None where the type has none); "M" None for symmetric types. Q4_1 / Q5_1 store the min itself: M = -dmin."""
        parts, sc, m = {}, None, None
        if t.scale:
            sc = _gather(raw, t.scale)
            sc = (sc.view(torch.int8) if t.scale_signed else sc).to(torch.int32) - t.scale_offset
        parts["S"] = (_f16(raw, t.d), sc)
        if t.affine:
            m = _gather(raw, t.minimum).to(torch.int32) if t.minimum else None
            parts["M"] = (_f16(raw, t.dmin) if m is not None else -_f16(raw, t.dmin), m)
        return parts

    def _fields(self, t, raw, parts=None):
        """(d * sc, dmin * m or None) per sub-block [rows, sub-blocks] in fp32 (symmetric types: S * (q - Z0)), from
        `parts` (_parts) when the caller has them."""
        per, rows = t.block // t.sub, raw.shape[0]

        def product(outer, inner):
            if inner is not None:
                return Factored(outer, inner.reshape(rows, -1), per).value()
            return outer.reshape(rows, -1) if per == 1 else outer.repeat_interleave(per, 1)

        parts = parts or self._parts(t, raw)
        return product(*parts["S"]), (product(*parts["M"]) if "M" in parts else None)

    def _grid(self, t, raw, inn):
        S, M = self._fields(t, raw)
        dead = S == 0
        S = torch.where(dead, torch.full((), DEAD), S)
        if M is not None:
            Z = M / S
        else:
            Z = torch.full_like(S, float(t.zero)) if t.zero else None
        g = torch.arange(inn) // t.sub
        return Grid(
            S.T.contiguous(),
            g,
            t.codebook(),
            Z=Z.T.contiguous() if Z is not None else None,
            params={"raw": raw, "type": t},
        )

    def grid(self, ckpt, m):
        t, raw = self._blocks(ckpt, m, copy=True)
        return self._grid(t, raw, raw.shape[1] * t.block)

    def shape(self, ckpt, m):
        """[rows, in]: a 3-D tensor (MoE experts, [E, n_ff, n_embd]) as its E x n_ff rows of blocks."""
        shape = tuple(ckpt.entry(m["weight"]).shape)
        return (math.prod(shape[:-1]), shape[-1])

    def stored(self, ckpt, m):
        """ggml's own arithmetic: d * sc as fp32, times (q - zero), less dmin * m (scale 0 kept as stored)."""
        t, raw = self._blocks(ckpt, m)
        parts = self._parts(t, raw)
        S, M = self._fields(t, raw, parts)
        Z = torch.full((S.shape[1], S.shape[0]), float(t.zero)) if t.zero else None
        grid = Grid(S.T.contiguous(), torch.arange(raw.shape[1] * t.block) // t.sub, t.codebook(), Z=Z)
        rows, per = raw.shape[0], t.block // t.sub
        factors = {
            role: Factored(outer, inner.reshape(rows, -1), per)
            for role, (outer, inner) in parts.items()
            if inner is not None
        }
        return Stored(grid, self.codes(ckpt, m), M.T.contiguous() if M is not None else None, factors or None)

    def dequantize(self, ckpt, m):
        """W [out, in] fp32 (stored); types without a codec here through the gguf package."""
        entry = ckpt.entry(m["weight"])
        if entry.dtype not in TYPES:
            return _dequantize_other(ckpt, m["weight"], entry)
        return self.stored(ckpt, m).dequantize()

    def encode(self, ckpt, m, codes, grid):
        """The stored grid's bytes (or a fitted grid's) with the codes' bits replaced, in place: the grid is spent;
        sub-blocks of scale 0 keep their stored codes."""
        t, raw = grid.params["type"], grid.params["raw"]
        out, nb = raw.shape[0], raw.shape[1]
        dead = grid.S.T == DEAD  # [out, sub-blocks]: expanded to elements only where some exist
        if bool(dead.any()):
            codes = torch.where(dead.repeat_interleave(t.sub, 1), self.codes(ckpt, m), codes)
        c = (codes.view(torch.uint8) if t.signed_codes else codes).reshape(out, nb, t.block)
        for r0 in range(
            0, out, ROWS
        ):  # in place (the grid's bytes were read for this merge), ROWS rows at a time
            raw[r0 : r0 + ROWS] = _scatter(raw[r0 : r0 + ROWS], t.code, c[r0 : r0 + ROWS])
        return {m["weight"]: raw.reshape(-1)}

    def fit(self, ckpt, m, lo, hi):
        """Fresh block scales from each sub-block's range lo..hi [sub-blocks, out]: the sub-block scale (and min)
        that cover it, then the super-block d (and dmin) that cover every sub-block, integer scales rounded up so
        that the range stays inside the grid."""
        t, raw = self._blocks(ckpt, m)
        return self._fit(t, raw, lo, hi)

    def fit_rows(self, ckpt, m, lo, hi, idx):
        """Each row's blocks are fitted apart: the rows `idx` alone (auto's sample: 128 rows, not all)."""
        t, raw = self._blocks(ckpt, m)
        return self._fit(t, raw[idx], lo[:, idx], hi[:, idx])

    def _fit(self, t, raw, lo, hi):
        lo, hi = lo.T.reshape(raw.shape[0], raw.shape[1], -1), hi.T.reshape(raw.shape[0], raw.shape[1], -1)
        qmax = (1 << t.bits) - 1
        if t.affine:
            M = (-lo).clamp(min=0)  # W = S q - M, M >= 0 (ggml's k-quant mins are never negative)
            if not t.minimum:
                M = -lo  # Q4_1 / Q5_1: any min
            s = ((hi + M) / qmax).clamp(min=0)
        else:  # a negative scale puts the code range's longer side (-Z0) on the positive values, as ggml does
            # (Q8_0's d stays positive, as ggml writes it)
            low, high = (-128, 127) if t.signed_codes else (-t.zero, qmax - t.zero)
            positive = torch.maximum(hi / high, lo / low).clamp(min=0)
            negative = torch.maximum(hi / -low, lo / -high).clamp(min=0)
            s = positive if t.signed_codes else torch.where(negative < positive, -negative, positive)
        new = raw.clone()
        if (
            not t.scale
        ):  # one scale per block: d rounded up and the min down in fp16, so the range stays covered
            if t.affine:
                _put_f16(new, t.dmin, _fp16_toward(-M[..., 0], up=False))
                s = ((hi - _f16(new, t.dmin)[..., None]) / qmax).clamp(min=0)
            _put_f16(new, t.d, _fp16_outward(s[..., 0]))
            return self._grid(t, new, raw.shape[1] * t.block)
        top = (1 << (t.scale_bits - 1)) - 1 if t.scale_signed or t.scale_offset else (1 << t.scale_bits) - 1
        if t.affine:  # the mins first: their rounding up widens what the scales must cover
            dmin = _fp16_toward(M.amax(-1) / top, up=True).float()
            m_int = _ceil_ratio(M, dmin, top)
            s = ((hi + dmin[..., None] * m_int) / qmax).clamp(min=0)
            new = _scatter(new, t.minimum, m_int.to(torch.uint8))
            _put_f16(new, t.dmin, dmin)
        d = _fp16_toward(s.abs().amax(-1) / top, up=True).float()
        sc = (_ceil_ratio(s.abs(), d, top) * s.sign()).to(torch.int32) + t.scale_offset
        new = _scatter(
            new, t.scale, sc.to(torch.int8).view(torch.uint8) if t.scale_signed else sc.to(torch.uint8)
        )
        _put_f16(new, t.d, d)
        return self._grid(t, new, raw.shape[1] * t.block)


def no_codec(path, tensor, kind, count=1):
    """The error for a merged tensor whose GGML type has no codec here."""
    return LorakitError(
        f"GGML type {kind} cannot be requantized on its grid (lorakit writes {', '.join(TYPES)}): pass "
        f"{opt('dtype')} f16 to write the merged tensors of such types in F16, as llama.cpp's "
        f"export-lora does ({count} tensor(s))",
        path=path,
        tensor=tensor,
    )


def _fp16_toward(x, up):
    """x in fp16, rounded up (or down) rather than to nearest."""
    h = x.to(torch.float16)
    step = torch.nextafter(h, torch.full_like(h, float("inf") if up else -float("inf")))
    return torch.where(h.float() < x if up else h.float() > x, step, h)


def _fp16_outward(x):
    """x in fp16, rounded away from zero (a scale's magnitude up, so that the range stays covered)."""
    return _fp16_toward(x.abs(), up=True) * torch.where(x < 0, -1.0, 1.0)


def _ceil_ratio(x, unit, top):
    """ceil(x / unit) in 0..top per sub-block (0 where the unit is 0); a hair below an integer counts as it."""
    u = unit[..., None]
    q = torch.where(u > 0, torch.ceil(x / torch.where(u > 0, u, torch.ones(())) - 1e-6), torch.zeros(()))
    return q.clamp_(0, top)


def _dequantize_other(ckpt, name, entry):
    try:
        from gguf.constants import GGMLQuantizationType
        from gguf.quants import dequantize
    except ImportError:
        raise LorakitError(
            f"reading GGML type {entry.dtype} needs the gguf package: pip install gguf",
            path=ckpt.path,
            tensor=name,
        ) from None
    raw = ckpt.get(name).numpy()
    try:
        values = dequantize(raw.reshape(entry.shape[0], -1), GGMLQuantizationType[entry.dtype])
    except NotImplementedError:
        raise LorakitError(
            f"GGML type {entry.dtype} cannot be dequantized", path=ckpt.path, tensor=name
        ) from None
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(entry.shape)
