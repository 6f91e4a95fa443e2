"""Quantized base checkpoints: detection, dequantization, grids and packing (formats.md, "Quantized base
checkpoints"). Each format finds its modules in a checkpoint, dequantizes one to W [out, in] in fp32, describes its
grid (per-element scale S, zero point Z, codebook C: W = S * (c - Z)), fits a fresh grid, and packs codes back into
tensors of exactly the stored names, shapes and dtypes."""
import json
import os
from dataclasses import dataclass

import torch

from .errors import LorakitError
from .rounding import fp8_codebook, int_codebook

FP8_MAX = 448.0


@dataclass
class Grid:
    S: torch.Tensor  # [out, in] fp32 scale of each element
    Z: torch.Tensor  # [out, in] fp32 zero point (in code units)
    C: torch.Tensor  # sorted codebook of code values
    params: dict  # the compact tensors (stored shape and dtype) that define S and Z


@dataclass
class QuantModule:
    name: str  # module name: the full-precision weight would be `name.weight`
    members: dict  # role -> tensor name in the checkpoint
    fmt: object


def _expand_rows(s, out, inn):
    return s.float().reshape(-1, 1).expand(out, inn) if s.numel() == out else s.float().reshape(1, 1).expand(out, inn)


def _round_to(t, like):
    return t.to(like.dtype).reshape(like.shape)


class FP8Channel:
    """FP8 E4M3 with a per-tensor or per-output-channel `weight_scale` (compressed-tensors, FBGEMM): W = w * s."""
    name = "fp8"
    writable = True

    def find(self, ckpt):
        return {n[:-7]: {"weight": n, "weight_scale": n[:-7] + ".weight_scale"} for n in ckpt.where
                if n.endswith(".weight") and ckpt.entry(n).dtype == "F8_E4M3" and n[:-7] + ".weight_scale" in ckpt}

    def shape(self, ckpt, m):
        return tuple(ckpt.entry(m["weight"]).shape)

    def dequantize(self, ckpt, m):
        w, s = ckpt.get(m["weight"]), ckpt.get(m["weight_scale"])
        return w.float() * _expand_rows(s, *w.shape)

    def grid(self, ckpt, m):
        w, s = ckpt.entry(m["weight"]), ckpt.get(m["weight_scale"])
        return Grid(_expand_rows(s, *w.shape), torch.zeros(w.shape), fp8_codebook(), {"weight_scale": s.clone()})

    def fit(self, ckpt, m, W):
        s = ckpt.get(m["weight_scale"])
        amax = W.abs().amax(1) if s.numel() == W.shape[0] and W.shape[0] > 1 else W.abs().amax()
        s_new = _round_to((amax / FP8_MAX).clamp(min=1e-12), s)
        return Grid(_expand_rows(s_new, *W.shape), torch.zeros(W.shape), fp8_codebook(), {"weight_scale": s_new})

    def encode(self, ckpt, m, codes, grid):
        return {m["weight"]: codes.to(torch.float8_e4m3fn), m["weight_scale"]: grid.params["weight_scale"]}


class FP8Block:
    """DeepSeek-V3 block FP8: weight_scale_inv [ceil(out/b), ceil(in/b)], W[i, j] = w[i, j] * s[i // b, j // b]."""
    name = "fp8-block"
    writable = True

    def __init__(self, block=(128, 128)):
        self.block = tuple(block)

    def find(self, ckpt):
        return {n[:-7]: {"weight": n, "weight_scale_inv": n[:-7] + ".weight_scale_inv"} for n in ckpt.where
                if n.endswith(".weight") and ckpt.entry(n).dtype == "F8_E4M3" and n[:-7] + ".weight_scale_inv" in ckpt}

    shape = FP8Channel.shape

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
        s = _round_to((amax / FP8_MAX).clamp(min=1e-12), ckpt.get(m["weight_scale_inv"]))
        return Grid(self._expand(s, out, inn), torch.zeros(W.shape), fp8_codebook(), {"weight_scale_inv": s})

    def encode(self, ckpt, m, codes, grid):
        return {m["weight"]: codes.to(torch.float8_e4m3fn), m["weight_scale_inv"]: grid.params["weight_scale_inv"]}


class Int8Channel:
    """INT8 per output channel: compressed-tensors (weight I8, weight_scale [out, 1]: W = q * s) and bitsandbytes
    (weight I8, weight.SCB [out]: W = q * SCB / 127)."""
    name = "int8"
    writable = True

    def find(self, ckpt):
        found = {}
        for n in ckpt.where:
            if n.endswith(".weight") and ckpt.entry(n).dtype == "I8":
                if n + ".SCB" in ckpt:
                    found[n[:-7]] = {"weight": n, "SCB": n + ".SCB"}
                elif n[:-7] + ".weight_scale" in ckpt:
                    found[n[:-7]] = {"weight": n, "weight_scale": n[:-7] + ".weight_scale"}
        return found

    shape = FP8Channel.shape

    def _scale(self, ckpt, m):
        return ckpt.get(m["SCB"]).float() / 127 if "SCB" in m else ckpt.get(m["weight_scale"]).float()

    def dequantize(self, ckpt, m):
        q = ckpt.get(m["weight"])
        return q.float() * _expand_rows(self._scale(ckpt, m), *q.shape)

    def _codebook(self, m):
        return int_codebook(-127, 127) if "SCB" in m else int_codebook(-128, 127)

    def grid(self, ckpt, m):
        shape = ckpt.entry(m["weight"]).shape
        key = "SCB" if "SCB" in m else "weight_scale"
        return Grid(_expand_rows(self._scale(ckpt, m), *shape), torch.zeros(shape), self._codebook(m),
                    {key: ckpt.get(m[key]).clone()})

    def fit(self, ckpt, m, W):
        amax = W.abs().amax(1).clamp(min=1e-12)
        if "SCB" in m:
            scb = _round_to(amax, ckpt.get(m["SCB"]))
            return Grid(_expand_rows(scb.float() / 127, *W.shape), torch.zeros(W.shape), self._codebook(m),
                        {"SCB": scb})
        s = _round_to(amax / 127, ckpt.get(m["weight_scale"]))
        return Grid(_expand_rows(s, *W.shape), torch.zeros(W.shape), self._codebook(m), {"weight_scale": s})

    def encode(self, ckpt, m, codes, grid):
        key = "SCB" if "SCB" in m else "weight_scale"
        return {m["weight"]: codes.to(torch.int8), m[key]: grid.params[key]}


def unpack(packed, bits, dim, order=None):
    """int32 words -> codes, `32 // bits` per word along `dim`, lowest bits first (then reordered by `order`)."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    p = packed.to(torch.int32).unsqueeze(-1) if dim == packed.ndim - 1 else packed.to(torch.int32).unsqueeze(dim + 1)
    shape = [1] * p.ndim
    shape[-1 if dim == packed.ndim - 1 else dim + 1] = per
    vals = (p >> shifts.reshape(shape)) & ((1 << bits) - 1)
    if order is not None:  # vals[..., i] holds element order[i] of its word
        vals = vals[..., torch.argsort(torch.tensor(order))]
    if dim == packed.ndim - 1:
        return vals.reshape(*packed.shape[:-1], packed.shape[-1] * per)
    return vals.reshape(*packed.shape[:dim], packed.shape[dim] * per, *packed.shape[dim + 1:])


def pack(codes, bits, dim, order=None):
    """The inverse of unpack."""
    per = 32 // bits
    c = codes.to(torch.int64)
    if dim == c.ndim - 1:
        c = c.reshape(*c.shape[:-1], c.shape[-1] // per, per)
        if order is not None:
            c = c[..., torch.tensor(order)]
        slots = c
    else:
        c = c.reshape(*c.shape[:dim], c.shape[dim] // per, per, *c.shape[dim + 1:])
        slots = c.movedim(dim + 1, -1)
    word = torch.zeros(slots.shape[:-1], dtype=torch.int64)
    for i in range(per):
        word |= slots[..., i] << (bits * i)
    word = torch.where(word >= 2 ** 31, word - 2 ** 32, word).to(torch.int32)
    return word if dim == codes.ndim - 1 else word


class GPTQ:
    """GPTQ: qweight I32 [in * bits / 32, out] packed along in, qzeros [groups, out * bits / 32] packed along out,
    scales [groups, out], optional g_idx [in]. W^T[k, n] = scales[g[k], n] * (q[k, n] - z[g[k], n]); v1 files
    ("gptq") store z - 1."""
    name = "gptq"
    writable = True

    def __init__(self, bits=4, group_size=128, sym=True, v1=True):
        if bits not in (2, 4, 8):
            raise LorakitError(f"GPTQ with {bits} bits is not supported (2, 4 or 8)")
        self.bits, self.group_size, self.sym, self.v1 = bits, group_size, sym, v1

    def find(self, ckpt):
        found = {}
        for n in ckpt.where:
            if n.endswith(".qweight") and n[:-8] + ".qzeros" in ckpt and n[:-8] + ".scales" in ckpt:
                m = {"qweight": n, "qzeros": n[:-8] + ".qzeros", "scales": n[:-8] + ".scales"}
                if n[:-8] + ".g_idx" in ckpt:
                    m["g_idx"] = n[:-8] + ".g_idx"
                found[n[:-8]] = m
        return found

    def shape(self, ckpt, m):
        packed = ckpt.entry(m["qweight"]).shape
        out, inn = packed[1], packed[0] * 32 // self.bits
        scales, zeros = ckpt.entry(m["scales"]).shape, ckpt.entry(m["qzeros"]).shape
        per = 32 // self.bits
        if len(scales) != 2 or scales[1] != out or tuple(zeros) != (scales[0], out // per):
            raise LorakitError(f"GPTQ tensors do not fit together: qweight {list(packed)}, qzeros {list(zeros)}, "
                               f"scales {list(scales)} ({self.bits} bits)", path=ckpt.path, tensor=m["qweight"])
        if "g_idx" in m and tuple(ckpt.entry(m["g_idx"]).shape) != (inn,):
            raise LorakitError(f"g_idx has shape {list(ckpt.entry(m['g_idx']).shape)}, expected [{inn}]",
                               path=ckpt.path, tensor=m["g_idx"])
        return (out, inn)

    def _groups(self, ckpt, m, inn):
        if "g_idx" in m:
            return ckpt.get(m["g_idx"]).long()
        g = self.group_size if self.group_size and self.group_size > 0 else inn
        return torch.arange(inn) // g

    def _parts(self, ckpt, m):
        q = unpack(ckpt.get(m["qweight"]), self.bits, 0)  # [in, out]
        z = unpack(ckpt.get(m["qzeros"]), self.bits, 1).float() + (1 if self.v1 else 0)  # [groups, out]
        s = ckpt.get(m["scales"]).float()
        return q, z, s, self._groups(ckpt, m, q.shape[0])

    def dequantize(self, ckpt, m):
        q, z, s, g = self._parts(ckpt, m)
        return (s[g] * (q.float() - z[g])).T.contiguous()

    def grid(self, ckpt, m):
        _, z, s, g = self._parts(ckpt, m)
        return Grid(s[g].T.contiguous(), z[g].T.contiguous(), int_codebook(0, 2 ** self.bits - 1),
                    {"scales": ckpt.get(m["scales"]).clone(), "zeros": z, "g": g})

    def fit(self, ckpt, m, W):
        g = self._groups(ckpt, m, W.shape[1])
        n_groups = int(g.max()) + 1
        maxq = 2 ** self.bits - 1
        lo = torch.full((n_groups, W.shape[0]), float("inf")).scatter_reduce(0, g[:, None].expand(-1, W.shape[0]),
                                                                             W.T, "amin")
        hi = torch.full((n_groups, W.shape[0]), -float("inf")).scatter_reduce(0, g[:, None].expand(-1, W.shape[0]),
                                                                              W.T, "amax")
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        if self.sym:
            amax = torch.maximum(-lo, hi)
            scale, zero = (2 * amax / maxq).clamp(min=1e-8), torch.full_like(amax, (maxq + 1) / 2)
        else:
            scale = ((hi - lo) / maxq).clamp(min=1e-8)
            zero = torch.round(-lo / scale).clamp(0, maxq)
        scales = _round_to(scale, ckpt.get(m["scales"]))
        return Grid(scales.float()[g].T.contiguous(), zero[g].T.contiguous(), int_codebook(0, maxq),
                    {"scales": scales, "zeros": zero, "g": g})

    def encode(self, ckpt, m, codes, grid):
        zeros = grid.params["zeros"] - (1 if self.v1 else 0)
        return {m["qweight"]: pack(codes.T.contiguous(), self.bits, 0), m["qzeros"]: pack(zeros, self.bits, 1),
                m["scales"]: grid.params["scales"]}


AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


class AWQ:
    """AWQ GEMM int4: qweight I32 [in, out / 8] and qzeros [in / g, out / 8] packed along out in the order
    [0, 2, 4, 6, 1, 3, 5, 7]; scales [in / g, out]. W^T = (iw - iz) * scales."""
    name = "awq"
    writable = True

    def __init__(self, group_size=128, bits=4):
        if bits != 4:
            raise LorakitError(f"AWQ with {bits} bits is not supported (GEMM int4)")
        self.group_size = group_size

    find = GPTQ.find

    def shape(self, ckpt, m):
        packed = ckpt.entry(m["qweight"]).shape
        out, inn = packed[1] * 8, packed[0]
        scales, zeros = ckpt.entry(m["scales"]).shape, ckpt.entry(m["qzeros"]).shape
        if tuple(scales) != (inn // self.group_size, out) or tuple(zeros) != (inn // self.group_size, out // 8):
            raise LorakitError(f"AWQ tensors do not fit together: qweight {list(packed)}, qzeros {list(zeros)}, "
                               f"scales {list(scales)} (group size {self.group_size})", path=ckpt.path,
                               tensor=m["qweight"])
        return (out, inn)

    def _parts(self, ckpt, m):
        q = unpack(ckpt.get(m["qweight"]), 4, 1, AWQ_ORDER)  # [in, out]
        z = unpack(ckpt.get(m["qzeros"]), 4, 1, AWQ_ORDER).float()  # [groups, out]
        s = ckpt.get(m["scales"]).float()
        g = torch.arange(q.shape[0]) // self.group_size
        return q, z, s, g

    dequantize = GPTQ.dequantize

    def grid(self, ckpt, m):
        _, z, s, g = self._parts(ckpt, m)
        return Grid(s[g].T.contiguous(), z[g].T.contiguous(), int_codebook(0, 15),
                    {"scales": ckpt.get(m["scales"]).clone(), "zeros": z, "g": g})

    def fit(self, ckpt, m, W):
        g = torch.arange(W.shape[1]) // self.group_size
        Wg = W.T.reshape(-1, self.group_size, W.shape[0])
        lo, hi = Wg.amin(1).clamp(max=0), Wg.amax(1).clamp(min=0)
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        zero = torch.round(-lo / scale).clamp(0, 15)
        scales = _round_to(scale, ckpt.get(m["scales"]))
        return Grid(scales.float()[g].T.contiguous(), zero[g].T.contiguous(), int_codebook(0, 15),
                    {"scales": scales, "zeros": zero, "g": g})

    def encode(self, ckpt, m, codes, grid):
        return {m["qweight"]: pack(codes.T.contiguous(), 4, 1, AWQ_ORDER),
                m["qzeros"]: pack(grid.params["zeros"], 4, 1, AWQ_ORDER), m["scales"]: grid.params["scales"]}


class NF4:
    """bitsandbytes NF4 (read and dequantize only): weight U8 (two 4-bit codes per byte, the first in the high
    nibble), weight.absmax per block (or uint8 with nested_absmax / nested_quant_map / offset: double quantization),
    weight.quant_map (the 16 NF4 levels), weight.quant_state.bitsandbytes__nf4 (JSON: blocksize, shape, ...)."""
    name = "nf4"
    writable = False

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

    def members_of(self, ckpt, m):
        w = m["weight"]
        return [w, m["state"]] + [w + s for s in (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")
                                  if w + s in ckpt]


QUANT_NAMES = (".qweight", ".qzeros", ".scales", ".g_idx", ".weight_scale", ".weight_scale_inv", ".SCB", ".absmax",
               ".quant_map", ".nested_absmax", ".quant_state")


def _quantization_config(base):
    """config.json's quantization_config, else quantize_config.json (older GPTQ files), else None."""
    from .checkpoint import read_config
    folder = base if os.path.isdir(base) else os.path.dirname(base)
    qconfig = (read_config(folder) or {}).get("quantization_config")
    if qconfig is None:
        older = read_config(folder, "quantize_config.json")
        qconfig = {"quant_method": "gptq", **older} if older is not None else None
    return qconfig


def detect(ckpt, base):
    """(format handler, {module: members}) of a quantized checkpoint, (None, {}) for a full-precision one.
    Unknown quantized layouts are refused rather than treated as weights."""
    q = _quantization_config(base)
    method = (q or {}).get("quant_method")
    handlers = []
    if method == "gptq" or (method is None and any(n.endswith(".qweight") for n in ckpt.where) and
                            (q or {}).get("bits")):
        q = q or {}
        handlers = [GPTQ(q.get("bits", 4), q.get("group_size", 128), q.get("sym", True),
                         q.get("checkpoint_format", "gptq") != "gptq_v2")]
    elif method == "awq":
        if str(q.get("version", "gemm")).lower() != "gemm":
            raise LorakitError(f"AWQ version {q.get('version')} is not supported (GEMM only)", path=base)
        handlers = [AWQ(q.get("group_size", 128), q.get("bits", 4))]
    elif method == "fp8" and q.get("weight_block_size"):
        handlers = [FP8Block(q["weight_block_size"])]
    elif method in ("compressed-tensors", "fbgemm_fp8", "fp8"):
        handlers = [FP8Channel(), Int8Channel()]
    elif method == "bitsandbytes" or method is None:
        handlers = [NF4(), Int8Channel()] if method == "bitsandbytes" else [FP8Channel(), FP8Block(), Int8Channel(),
                                                                            NF4()]
    elif method is not None:
        raise LorakitError(f"quantization method '{method}' is not supported", path=base)
    for h in handlers:
        found = h.find(ckpt)
        if found:
            return h, found
    if any(n.endswith(QUANT_NAMES) for n in ckpt.where):
        example = next(n for n in ckpt.where if n.endswith(QUANT_NAMES))
        raise LorakitError(f"unknown quantized layout (e.g. tensor '{example}'): refusing to treat packed values as "
                           "weights", path=base)
    return None, {}


def member_names(handler, ckpt, members):
    return handler.members_of(ckpt, members) if hasattr(handler, "members_of") else list(members.values())


class WeightView:
    """A checkpoint as full-precision weights: quantized modules appear as `<module>.weight`, dequantized on read
    (so extract and inspect work on quantized bases); every other tensor as stored."""

    def __init__(self, path):
        from .checkpoint import Checkpoint
        self.path = os.fspath(path)
        self.ckpt = Checkpoint(self.path)
        self.handler, mods = detect(self.ckpt, self.path)
        self.quantized = {f"{m}.weight": members for m, members in mods.items()}
        # packed tensor -> the weight it makes up (hidden from the names: the weight stands for them)
        self.member_of = {t: n for n, members in self.quantized.items()
                          for t in member_names(self.handler, self.ckpt, members)}
        self.names = sorted([n for n in self.ckpt.where if n not in self.member_of] + list(self.quantized))

    def __contains__(self, name):
        return name in self.quantized or (name in self.ckpt and name in self.names)

    def shape(self, name):
        if name in self.quantized:
            return tuple(self.handler.shape(self.ckpt, self.quantized[name]))
        return tuple(self.ckpt.entry(name).shape)

    def nbytes(self, name):
        if name in self.quantized:
            return sum(self.ckpt.entry(t).nbytes for t in member_names(self.handler, self.ckpt, self.quantized[name]))
        return self.ckpt.entry(name).nbytes

    def raw(self, name):
        """Stored bytes (None for a dequantized weight: compare values instead)."""
        return None if name in self.quantized else self.ckpt.shards[self.ckpt.where[name]].raw(name)

    def get(self, name):
        if name in self.quantized:
            return self.handler.dequantize(self.ckpt, self.quantized[name])
        return self.ckpt.get(name)

    def shapes(self):
        return {n: self.shape(n) for n in self.names}


class _Tensors:
    """A dict of tensors with the little of the Checkpoint interface the handlers use."""

    def __init__(self, tensors):
        from .dtypes import st_dtype
        from .io import Entry
        self.tensors, self.path = tensors, "<memory>"
        self.where = dict.fromkeys(tensors, "<memory>")
        self._entries = {k: Entry(k, st_dtype(v.dtype), tuple(v.shape), 0, v.numel() * v.element_size())
                         for k, v in tensors.items()}

    def __contains__(self, name):
        return name in self.tensors

    def get(self, name):
        return self.tensors[name]

    def entry(self, name):
        return self._entries[name]


def quantize(W, fmt, group_size=128, bits=4):
    """Quantize a weight [out, in] into a format's stored tensors (names relative to the module: 'weight',
    'weight_scale', 'qweight', ...): for building quantized checkpoints (benchmarks, examples). Nearest rounding."""
    from .rounding import nearest
    out, inn = W.shape
    if fmt == "fp8":
        handler, t = FP8Channel(), {"weight": torch.zeros(out, inn).to(torch.float8_e4m3fn),
                                    "weight_scale": torch.zeros(out, 1, dtype=torch.bfloat16)}
        members = {"weight": "weight", "weight_scale": "weight_scale"}
    elif fmt == "int8":
        handler, t = Int8Channel(), {"weight": torch.zeros(out, inn, dtype=torch.int8),
                                     "weight_scale": torch.zeros(out, 1, dtype=torch.bfloat16)}
        members = {"weight": "weight", "weight_scale": "weight_scale"}
    elif fmt in ("gptq", "awq"):
        groups, per = inn // group_size, 32 // bits
        handler = GPTQ(bits, group_size, sym=True) if fmt == "gptq" else AWQ(group_size, bits)
        t = {"qweight": torch.zeros(inn // per, out, dtype=torch.int32) if fmt == "gptq" else
             torch.zeros(inn, out // per, dtype=torch.int32),
             "qzeros": torch.zeros(groups, out // per, dtype=torch.int32), "scales": torch.zeros(groups, out,
                                                                                                 dtype=torch.float16)}
        members = {"qweight": "qweight", "qzeros": "qzeros", "scales": "scales"}
    else:
        raise LorakitError(f"cannot quantize to '{fmt}' (fp8, int8, gptq, awq)")
    ckpt = _Tensors(t)
    grid = handler.fit(ckpt, members, W.float())
    codes = nearest(W.float() / grid.S + grid.Z, grid.C)
    return handler.encode(ckpt, members, codes, grid)


def quantization_config(fmt, group_size=128, bits=4):
    """The config.json `quantization_config` that goes with `quantize`'s tensors."""
    return {"fp8": {"quant_method": "compressed-tensors", "format": "float-quantized"},
            "int8": {"quant_method": "compressed-tensors", "format": "int-quantized"},
            "gptq": {"quant_method": "gptq", "bits": bits, "group_size": group_size, "sym": True, "desc_act": False,
                     "checkpoint_format": "gptq"},
            "awq": {"quant_method": "awq", "bits": bits, "group_size": group_size, "version": "gemm",
                    "zero_point": True}}[fmt]
