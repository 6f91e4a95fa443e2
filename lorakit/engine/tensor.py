"""The per-tensor merge: read -> add the deltas in fp32 -> round once to the output dtype. Quantized modules go
through lorakit.quant.requant (dequantize, add, back onto the grid)."""

import torch

from ..core.linalg import count_non_finite
from ..errors import LorakitError

BLOCK_ELEMENTS = 1 << 19  # fp32 row blocks of ~2 MB stay in cache: 2-3x faster than whole-tensor passes
GPU_BLOCK_ELEMENTS = 1 << 26  # on a GPU, 256 MB fp32 blocks: few transfers, whatever the tensor's size


def merge_tensor(W, plan, sign, out_dtype, out=None, device=None):
    """W' for one full-precision tensor. W is the base tensor as stored; every addition is in fp32 and the result is
    rounded once to `out_dtype` (into `out` when given; `out` may be W itself: each row block is read before it is
    written). `device`: a GPU the row blocks of the usual case (LoRA factors and full deltas) are summed on."""
    if plan.replacement is not None:  # the spec: a replacement first, then the deltas on top of it
        W = plan.replacement
        if not plan.loras and not plan.slices and not plan.biases and not plan.deltas:
            return check_finite(plan.name, W.to(out_dtype))
    if plan.biases or plan.transforms or any(m.magnitude is not None for m, _ in plan.loras):
        return merge_whole(W, plan, sign, out_dtype)
    gpu = device if device is not None and device.type != "cpu" else None
    factors = [(*m.factors(torch.float32), sign * w) for m, w in plan.loras]
    pieces = [(*m.factors(torch.float32), sign * w, start, start + m.shape[0]) for m, w, start in plan.slices]
    # rows as the adapter sees the tensor: a 3-D MoE tensor [E, out, in] is E x out rows (each expert's LoRA a
    # slice of them); every other tensor its first dimension
    inner = (factors or pieces or [(None, None)])[0][1]
    n_rows = W.numel() // inner.shape[1] if inner is not None else W.shape[0]
    deltas = [(D.reshape(n_rows, -1), sign * w) for D, w in plan.deltas]
    if gpu is not None:  # the factors go once; each block goes there, and its rounded rows come back
        factors = [(B2.to(gpu), A2.to(gpu), alpha) for B2, A2, alpha in factors]
        pieces = [(B2.to(gpu), A2.to(gpu), *rest) for B2, A2, *rest in pieces]
    W2 = W.reshape(n_rows, -1)
    out = torch.empty(W2.shape, dtype=out_dtype) if out is None else out.reshape(W2.shape)
    rows = max(1, (BLOCK_ELEMENTS if gpu is None else GPU_BLOCK_ELEMENTS) // max(1, W2.shape[1]))
    limit = torch.finfo(out_dtype).max
    for i in range(0, W2.shape[0], rows):
        block = W2[i : i + rows].to(gpu or "cpu").to(torch.float32, copy=True)
        add_block(block, i, factors, pieces, deltas)
        # one pass over the fp32 block while it is in cache (aminmax: half the time of abs().amax(), no temporary):
        # NaN, Inf and values the cast would overflow
        low, high = torch.aminmax(block)
        if not (float(high) <= limit and float(low) >= -limit):
            raise non_finite(plan.name, block.to(out_dtype).cpu())
        out[i : i + rows] = block if gpu is None else block.to(out_dtype).cpu()  # rounded once
    return out.reshape(W.shape)


def add_block(block, i, factors, pieces, deltas):
    """Rows i.. of W + dW into the fp32 `block` (rows i..): the LoRA factors, the row slices overlapping it (an
    expert's LoRA in a 3-D tensor), the full deltas."""
    rows = block.shape[0]
    for B2, A2, alpha in factors:
        block.addmm_(B2[i : i + rows], A2, alpha=alpha)
    for B2, A2, alpha, s0, s1 in pieces:
        o0, o1 = max(i, s0), min(i + rows, s1)
        if o0 < o1:
            block[o0 - i : o1 - i].addmm_(B2[o0 - s0 : o1 - s0], A2, alpha=alpha)
    for D, alpha in deltas:
        block.add_(D[i : i + rows].to(block.device, torch.float32), alpha=alpha)


def merge_whole(W, plan, sign, out_dtype):
    """The cases that need the whole fp32 tensor at once, on the CPU: multiplicative adapters (IA3, HRA, OFT) first,
    DoRA (its norm), biases."""
    Wf = W.float() if W.dtype != torch.float32 else W.clone()
    for t in plan.transforms:  # multiplicative (IA3, HRA, OFT): on W, before anything is added
        Wf = t.apply(Wf)
    for m, w in plan.loras:  # DoRA needs the whole tensor for its norm; it is alone here (see plan)
        Wf = m.apply(Wf, sign=sign, weight=w)
    for m, w, start in plan.slices:
        rows = Wf.reshape(-1, m.A.flatten(1).shape[1])[start : start + m.shape[0]]
        rows.add_(m.delta().reshape(rows.shape), alpha=sign * w)
    for m, w in plan.biases:
        Wf.add_(m.bias.float(), alpha=sign * w)
    for D, w in plan.deltas:
        Wf.add_(D.float(), alpha=sign * w)
    return check_finite(plan.name, Wf.to(out_dtype))


def non_finite(name, t):
    return LorakitError(
        f"the merged tensor has {int((~torch.isfinite(t)).sum())} NaN/Inf value(s) (a NaN in the base "
        "or its scales, or a result out of the output dtype's range): nothing was written",
        tensor=name,
    )


def check_finite(name, t):
    """Nothing non-finite reaches an output."""
    if count_non_finite(t):
        raise non_finite(name, t.float())
    return t
