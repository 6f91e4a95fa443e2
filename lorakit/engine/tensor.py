"""The per-tensor merge: read -> add the deltas in fp32 -> round once to the output dtype. Quantized modules go
through lorakit.quant.requant (dequantize, add, back onto the grid)."""

import torch

from ..core.linalg import count_non_finite
from ..errors import LorakitError

BLOCK_ELEMENTS = 1 << 19  # fp32 row blocks of ~2 MB stay in cache: 2-3x faster than whole-tensor passes


def merge_tensor(W, plan, sign, out_dtype, out=None):
    """W' for one full-precision tensor. W is the base tensor as stored; every addition is in fp32 and the result is
    rounded once to `out_dtype` (into `out` when given; `out` may be W itself: each row block is read before it is
    written)."""
    if plan.replacement is not None:  # the spec: a replacement first, then the deltas on top of it
        W = plan.replacement
        if not plan.loras and not plan.slices and not plan.biases and not plan.deltas:
            return check_finite(plan.name, W.to(out_dtype))
    if plan.biases or plan.transforms or any(m.magnitude is not None for m, _ in plan.loras):
        Wf = W.float() if W.dtype != torch.float32 else W.clone()
        for t in plan.transforms:  # multiplicative (IA3, HRA, OFT): on W, before anything is added
            Wf = t.apply(Wf)
        for m, w in plan.loras:
            Wf = m.apply(
                Wf, sign=sign, weight=w
            )  # DoRA needs the whole tensor for its norm; it is alone here (see plan)
        for m, w, start in plan.slices:
            rows = Wf.reshape(-1, m.A.flatten(1).shape[1])[start : start + m.shape[0]]
            rows.add_(m.delta().reshape(rows.shape), alpha=sign * w)
        for m, w in plan.biases:
            Wf.add_(m.bias.float(), alpha=sign * w)
        for D, w in plan.deltas:
            Wf.add_(D.float(), alpha=sign * w)
        return check_finite(plan.name, Wf.to(out_dtype))
    factors = [(*m.factors(torch.float32), sign * w) for m, w in plan.loras]
    pieces = [(*m.factors(torch.float32), sign * w, start, start + m.shape[0]) for m, w, start in plan.slices]
    # rows as the adapter sees the tensor: a 3-D MoE tensor [E, out, in] is E x out rows (each expert's LoRA a
    # slice of them); every other tensor its first dimension
    inner = (factors or pieces or [(None, None)])[0][1]
    n_rows = W.numel() // inner.shape[1] if inner is not None else W.shape[0]
    deltas = [(D.reshape(n_rows, -1), sign * w) for D, w in plan.deltas]
    W2 = W.reshape(n_rows, -1)
    out = torch.empty(W2.shape, dtype=out_dtype) if out is None else out.reshape(W2.shape)
    rows = max(1, BLOCK_ELEMENTS // max(1, W2.shape[1]))
    limit = torch.finfo(out_dtype).max
    for i in range(0, W2.shape[0], rows):
        block = W2[i : i + rows].to(torch.float32, copy=True)
        for B2, A2, alpha in factors:
            block.addmm_(B2[i : i + rows], A2, alpha=alpha)
        for B2, A2, alpha, s0, s1 in pieces:  # a slice of rows: only where it overlaps this block
            o0, o1 = max(i, s0), min(i + rows, s1)
            if o0 < o1:
                block[o0 - i : o1 - i].addmm_(B2[o0 - s0 : o1 - s0], A2, alpha=alpha)
        for D, alpha in deltas:
            block.add_(D[i : i + rows].float(), alpha=alpha)
        # one reduction over the fp32 block while it is in cache: NaN, Inf and values the cast would overflow
        if not float(block.abs().amax()) <= limit:
            raise non_finite(plan.name, block.to(out_dtype))
        out[i : i + rows] = block
    return out.reshape(W.shape)


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
