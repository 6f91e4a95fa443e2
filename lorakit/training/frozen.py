"""Frozen base layers kept as their quantized codes while an adapter trains on them (QLoRA and beyond).

A FrozenLinear holds a weight as codes (two 4-bit codes a byte where the codebook has at most 16 codes), a table
of the codes' values and per-group scales, and dequantizes it only while the forward or the backward pass uses it:
the base costs its stored size, not that of its full-precision weights. The arithmetic is the stored format's own
(lorakit.quant.base.Stored), so that training, `lorakit merge` and every other reader of the codes see the same
weight, bit for bit.

`quantize` turns a full-precision weight into codes on load (--quantize): NF4 as bitsandbytes and QLoRA make it
(blocks of 64, double-quantized absmax), INT8 and FP8 E4M3 per output row, NVFP4 as compressed-tensors'
(llm-compressor's) recipe, FP8 in 128 x 128 blocks.
"""

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import LorakitError
from ..options import QUANTIZE
from ..quant.base import Factored, Grid, Stored
from ..quant.mxfp4 import CODEBOOK as E2M1
from ..quant.nf4 import NF4_LEVELS
from ..quant.rounding import FP8, FP8_MAX, Table, Uniform
from . import native

# QLoRA's blocks: 64 weights share an absmax; 256 absmax values share a scale
NF4_BLOCK, ABSMAX_BLOCK = 64, 256
NVFP4_GROUP, FP8_BLOCK = 16, 128
NATIVE_DTYPES = (torch.float32, torch.bfloat16)  # what the C kernel writes


def dynamic_map():
    """bitsandbytes' signed 8-bit dynamic map (create_dynamic_map(signed=True)): the codes of double-quantized
    absmax values. Per exponent i of 7, the midpoints of an even split of [0.1, 1] into 2^i steps, times 10^(i-6),
    with both signs; then 0 and 1; sorted. Products in fp32, as bitsandbytes takes them."""
    data = []
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        data += ((10 ** (i - 6)) * means).tolist() + (-(10 ** (i - 6)) * means).tolist()
    return torch.tensor(sorted(data + [0.0, 1.0]), dtype=torch.float32)


def _nearest_blockwise(x, block, code):
    """x (1-D fp32) in blocks: (indices of the nearest code of x / absmax, absmax), bitsandbytes' arithmetic
    (x times the reciprocal of the block's absmax, clamped to [-1, 1], ties to the lower code)."""
    pad = -x.numel() % block  # a last, short block padded with zeros (they do not change its absmax)
    blocks = torch.cat([x, x.new_zeros(pad)]).reshape(-1, block) if pad else x.reshape(-1, block)
    absmax = blocks.abs().amax(1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1).reshape(-1)
    bounds = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, bounds, out_int32=True)[: x.numel()], absmax


def nf4_stored(W):
    """W [out, in] as QLoRA's NF4: codes per blocks of 64 of the row-major weight (blocks may span rows), their
    absmax double-quantized (the mean taken out, 8-bit dynamic codes per 256 with an fp32 scale each), dequantized as
    bitsandbytes does. The grid's column groups are segments of gcd(in, 64) columns, each inside one block."""
    out, inn = W.shape
    levels = torch.tensor(NF4_LEVELS)
    codes, absmax = _nearest_blockwise(W.float().reshape(-1), NF4_BLOCK, levels)
    offset = absmax.mean()
    code = dynamic_map()
    q, absmax2 = _nearest_blockwise(absmax - offset, ABSMAX_BLOCK, code)
    scale = code[q.long()] * absmax2.repeat_interleave(ABSMAX_BLOCK)[: q.numel()] + offset
    segment = math.gcd(inn, NF4_BLOCK)
    block = torch.arange(out * inn // segment) * segment // NF4_BLOCK
    grid = Grid(
        scale[block].reshape(out, inn // segment).T.contiguous(), torch.arange(inn) // segment, Table(levels)
    )
    return Stored(grid, codes.to(torch.uint8).reshape(out, inn))


def per_row_stored(W, kind):
    """INT8 (symmetric, -127..127, absmax / 127 a row: LLM.int8's weights) or FP8 E4M3 (absmax / 448 a row)."""
    W = W.float()
    absmax = W.abs().amax(1).clamp(min=1e-12)
    if kind == "int8":
        S = absmax / 127
        codes = torch.round(W / S[:, None]).clamp_(-127, 127).to(torch.int8)
        book = Uniform(-127, 127, torch.int8)
    else:
        S = absmax / FP8_MAX
        codes, book = FP8().round(W / S[:, None])[0], FP8()
    return Stored(Grid(S[None, :].contiguous(), torch.zeros(W.shape[1], dtype=torch.int64), book), codes)


def nvfp4_stored(W):
    """W [out, in] as compressed-tensors' NVFP4 recipe (llm-compressor's NVFP4 / NVFP4A16): a global scale
    448 x 6 / max |W|, per 16 inputs of a row an E4M3 scale global x max / 6 (nearest, 0 -> 0.125), the nearest E2M1
    code of W / (scale / global)."""
    out, inn = W.shape
    if inn % NVFP4_GROUP:
        raise LorakitError(f"NVFP4 groups of {NVFP4_GROUP} do not tile rows of {inn}")
    W = W.float()
    amax = W.abs().amax().clamp(min=torch.finfo(torch.float32).tiny)
    global_scale = torch.nan_to_num(FP8_MAX * 6.0 / amax, nan=1.0, posinf=1.0)
    block = W.reshape(out, -1, NVFP4_GROUP).abs().amax(-1)  # [out, groups]
    scale = (global_scale * (block / 6.0)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    scale = torch.where(scale == 0, torch.tensor(0.125), scale)
    S = (scale / global_scale).T.contiguous()  # as compressed-tensors dequantizes: scale / global, in fp32
    grid = Grid(S, torch.arange(inn) // NVFP4_GROUP, E2M1)
    U = W / S.T.repeat_interleave(NVFP4_GROUP, 1)
    negative = torch.signbit(U)
    codes = E2M1.round(U)[0]
    codes = torch.where(
        (codes & 7) == 0, negative.to(torch.uint8) << 3, codes
    )  # a zero keeps W's sign, as theirs
    return Stored(grid, codes)


def fp8_block_stored(W, block=FP8_BLOCK):
    """W [out, in] in FP8 E4M3 with an fp32 scale max / 448 per 128 x 128 block (DeepSeek-V3's and FP8_BLOCK's)."""
    out, inn = W.shape
    W = W.float()
    padded = torch.nn.functional.pad(W, (0, -inn % block, 0, -out % block))
    blocks = (
        padded.reshape(padded.shape[0] // block, block, -1, block).abs().amax((1, 3))
    )  # [out / b, in / b]
    scale = (blocks / FP8_MAX).clamp(min=1e-12)
    S = scale.T.repeat_interleave(block, 1)[:, :out].contiguous()  # [in blocks, out]
    g = torch.arange(inn) // block
    codes = FP8().round(W / S[g].T)[0]
    return Stored(Grid(S, g, FP8()), codes)


def quantize(W, kind):
    """A full-precision weight [out, in] as the Stored codes of `kind` (nf4, int8, fp8, nvfp4, fp8-block)."""
    if kind == "nf4":
        return nf4_stored(W)
    if kind in ("int8", "fp8"):
        return per_row_stored(W, kind)
    if kind == "nvfp4":
        return nvfp4_stored(W)
    if kind == "fp8-block":
        return fp8_block_stored(W)
    raise LorakitError(f"--quantize is one of {', '.join(QUANTIZE)}, not '{kind}'")


def code_table(book, storage):
    """[256] fp32: the value of each code byte (a codebook's codes are one byte each)."""
    if isinstance(book, Table):
        return torch.cat([book.levels, torch.zeros(256 - len(book.levels))])
    return book.values(torch.arange(256, dtype=torch.uint8).view(storage))


def _code_bytes(codes):
    """Codes [out, in] of one byte each, row-major, as uint8."""
    if codes.element_size() != 1:
        raise LorakitError(f"codes of {codes.dtype} are not one byte each")
    return codes.contiguous().view(torch.uint8)


def _fits_nibbles(book):
    if isinstance(book, Table):
        return len(book.levels) <= 16
    return isinstance(book, Uniform) and 0 <= book.lo and book.hi < 16


def _by_row(T, out):
    """A grid tensor [groups, out] as [out, groups], compact; None stays None."""
    return None if T is None else _compact(T.T.contiguous().reshape(out, -1))


def _compact(T):
    """T in fp32, or in fp16 where that holds every value exactly (GGUF's d, m and Q8_0-style scales are stored in
    fp16): the same numbers in half the memory; [1, 1] when all are one value."""
    T = T.float()
    if bool((T == T.reshape(-1)[0]).all()):  # one value (GGUF's fixed zero points): kept once, broadcast
        T = T[:1, :1].clone()
    half = T.half()
    return half if torch.equal(half.float(), T) else T


class FrozenLinear(nn.Module):
    """y = x W^T + b with W dequantized from its codes for each use, never kept (nor saved for backward)."""

    def __init__(self, stored, bias=None, dtype=torch.float32):
        super().__init__()
        grid = stored.grid
        codes = _code_bytes(stored.codes)
        out, inn = codes.shape
        self.out_features, self.in_features, self.dtype = out, inn, dtype
        self.nibbles = _fits_nibbles(grid.codebook) and inn % 2 == 0
        if self.nibbles:  # two codes a byte, the first in the high nibble
            pairs = codes.reshape(out, inn // 2, 2)
            codes = pairs[..., 0] << 4 | pairs[..., 1]
        groups = grid.S.shape[0]
        contiguous = inn % groups == 0 and torch.equal(grid.g, torch.arange(inn) // (inn // groups))
        self.group_size = inn // groups if contiguous else None
        self.register_buffer("codes", codes.contiguous())
        table = code_table(grid.codebook, stored.codes.dtype).float()
        # the C kernel's 16 values, where it applies
        kernel = native.eligible(self.nibbles, self.group_size, inn)
        self.register_buffer("lut", table[:16].clone() if kernel else None, persistent=False)
        if self.nibbles:  # a byte's two values at once: one 8-byte lookup a byte (3x faster than unpacking)
            byte = torch.arange(256)
            table = (
                torch.stack([table[byte >> 4], table[byte & 15]], 1).contiguous().view(torch.float64)[:, 0]
            )
        self.register_buffer("table", table)
        factors = stored.factors or {}
        for role, T in (
            ("S", grid.S),
            ("M", stored.M),
        ):  # factored: a block's fp16 scale, its sub-blocks' ints
            f = factors.get(role)
            self.register_buffer(role, None if f else _by_row(T, out))
            self.register_buffer(f"{role}_outer", _compact(f.outer) if f else None)
            self.register_buffer(f"{role}_inner", f.inner.to(torch.int8).contiguous() if f else None)
        self.per = {role: f.per for role, f in factors.items()}
        self.register_buffer("Z", _by_row(grid.Z, out))
        self.register_buffer("g", None if contiguous else grid.g.clone())
        self.register_buffer("bias", None if bias is None else bias.to(dtype))
        self.workspace = None  # a Workspace shared by the model's layers on the CPU (share_workspace)

    @property
    def weight_shape(self):
        return (self.out_features, self.in_features)

    def stored_bytes(self):
        """What this layer keeps in memory (codes, table, scales, zeros, bias)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def dequantize(self, dtype=None, workspace=None):
        """W [out, in] in `dtype` (the layer's compute dtype). With a `workspace` (CPU), W and its temporaries are
        that workspace's buffers, valid until its next use."""
        S, M = self._grid_tensor("S"), self._grid_tensor("M")
        dtype = dtype or self.dtype
        if self.codes.is_cuda:
            W = compiled_dequantize()(
                self.codes, self.table, S, self.Z, M, self.g, self.group_size, self.nibbles
            )
            return W.to(dtype)
        if workspace is not None and self.lut is not None and dtype in NATIVE_DTYPES and native.kernel():
            W = workspace.take("weight", self.weight_shape, dtype)
            return native.dequantize4(self.codes, self.lut, S, self.Z, M, self.group_size, W)
        return dequantize_codes(
            self.codes, self.table, S, self.Z, M, self.g, self.group_size, self.nibbles, workspace, dtype
        )

    def _grid_tensor(self, role):
        """S or M [out, groups]: as held, or rebuilt from its factors (the format's own fp32 product)."""
        if role not in self.per:
            return getattr(self, role)
        outer, inner = getattr(self, f"{role}_outer"), getattr(self, f"{role}_inner")
        return Factored(outer, inner, self.per[role]).value()

    def forward(self, x):
        y = FrozenMatmul.apply(x.to(self.dtype), self)
        return y + self.bias if self.bias is not None else y


class Workspace:
    """Buffers reused by every layer's dequantized weight on the CPU, one use at a time: the largest transients of a
    step are allocated once instead of at each use, where they fragmented the heap (glibc keeps freed blocks of up to
    32 MiB in the heap; at 501M parameters the peak grew by 1.2 GiB of holes)."""

    def __init__(self):
        self.buffers = {}

    def take(self, role, shape, dtype):
        numel = math.prod(shape)
        buffer = self.buffers.get((role, dtype))
        if buffer is None or buffer.numel() < numel:
            buffer = self.buffers[(role, dtype)] = torch.empty(numel, dtype=dtype)
        return buffer[:numel].view(shape)


def share_workspace(model):
    """One Workspace for every FrozenLinear of `model` on the CPU, used by one forward or backward at a time (CUDA's
    caching allocator reuses blocks itself)."""
    layers = [m for m in model.modules() if isinstance(m, FrozenLinear) and not m.codes.is_cuda]
    shared = Workspace()
    for layer in layers:
        layer.workspace = shared


def dequantize_codes(codes, table, S, Z, M, g, group_size, nibbles, workspace=None, dtype=torch.float32):
    """W [out, in] = (table[codes] - Z) * S - M in fp32, rounded once to `dtype` (`nibbles`: table[byte] is the pair
    of values of a byte's two codes, as one float64), a group of columns at a time (broadcast, never expanded,
    where groups are runs of `group_size` columns; else column j's group is g[j]). Tensors only, so that one
    compiled graph serves every layer of a shape; in `workspace`'s buffers when given (a product written straight
    into bf16 is slower on the CPU than the fp32 product and a conversion)."""
    out, n = codes.shape[0], codes.numel()
    if workspace is None:
        W = torch.index_select(table, 0, codes.reshape(-1).int())
    else:
        index = workspace.take("index", (n,), torch.int32).copy_(codes.reshape(-1))
        W = torch.index_select(table, 0, index, out=workspace.take("values", (n,), table.dtype))
    if nibbles:  # two codes a byte, the first in the high nibble: the table holds each byte's pair of values
        W = W.view(torch.float32)
    inn = W.numel() // out
    if group_size is not None:
        W = W.view(out, -1, group_size)

        def per_group(T):
            return T.float()[:, :, None]
    else:
        W = W.view(out, inn)

        def per_group(T):
            return T.float() if T.numel() == 1 else T.float().index_select(1, g)

    if Z is not None:
        W.sub_(per_group(Z))
    W.mul_(per_group(S))
    if M is not None:
        W.sub_(per_group(M))
    W = W.reshape(out, inn)
    if workspace is None or dtype == W.dtype:
        return W.to(dtype)
    return workspace.take("weight", W.shape, dtype).copy_(W)


@functools.cache
def compiled_dequantize():
    """dequantize_codes as one fused kernel (torch.compile) for CUDA: codes to W without fp32 temporaries in
    memory. A fused multiply-add may round S * (v - Z) - M differently in the last fp32 bit than the eager
    arithmetic the merge uses, far below the bf16 compute precision."""
    return torch.compile(dequantize_codes, dynamic=False)


class FrozenMatmul(torch.autograd.Function):
    """x W^T for a frozen W that is dequantized again in backward (dL/dx = dL/dy W) rather than saved: memory for
    the base stays that of its codes."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return F.linear(x, layer.dequantize(x.dtype, layer.workspace))

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad @ ctx.layer.dequantize(grad.dtype, ctx.layer.workspace), None
