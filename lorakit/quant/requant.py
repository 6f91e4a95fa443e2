"""Merging into a quantized tensor: dequantize -> add the deltas -> round onto a grid -> pack, and the survival
report of what came through. The strategies are listed (and described) in lorakit.quant.STRATEGIES."""
import torch

from ..errors import LorakitError
from . import STRATEGIES, rounding


def merged_target(W_old, loras, sign, full):
    """(target, dW, A): dW = sum_i sign w_i s_i B_i A_i in fp32; the target is onto the dequantized weight, or onto
    the full-precision one when given; A stacks the adapters' input factors (the aligned subspace)."""
    dW = torch.zeros_like(W_old)
    rows = []
    for m, w in loras:
        if m.magnitude is not None:
            raise LorakitError("DoRA into a quantized base is not supported: merge with --dtype", tensor=m.name)
        B2, A2 = m.factors(torch.float32)
        dW.addmm_(B2, A2, alpha=sign * w)
        rows.append(A2)
    base = full if full is not None else W_old
    return base + dW, dW, torch.cat(rows)


def requantize(handler, ckpt, members, loras, sign, strategy, full=None, seed=0):
    """The new tensors of one quantized module (same names, shapes, dtypes) and its survival report row."""
    W_old = handler.dequantize(ckpt, members)
    T, dW, A = merged_target(W_old, loras, sign, full)
    old = handler.grid(ckpt, members)
    generator = torch.Generator().manual_seed(seed)
    if strategy in ("rescale", "original"):
        grid = handler.fit(ckpt, members, T)
        codes = rounding.nearest(T / grid.S + grid.Z, grid.C)
    else:
        grid = old
        U = T / grid.S + grid.Z
        if strategy == "same-grid":
            codes = rounding.nearest(U, grid.C)
        elif strategy == "stochastic":
            codes = rounding.stochastic(U, grid.C, generator)
        elif strategy == "feedback":
            codes = rounding.feedback(T, grid.S, grid.Z, grid.C, A)
        else:
            raise LorakitError(f"unknown strategy '{strategy}' (choose from {', '.join(STRATEGIES)})")
    W_new = grid.S * (codes - grid.Z)
    codes_old = rounding.nearest(W_old / old.S + old.Z, old.C)
    row = {**rounding.survival(W_old, W_new, dW, T, A, generator),
           "codes_changed": float((codes != codes_old).float().mean()),
           "relative_delta": float(dW.norm() / W_old.norm()) if W_old.norm() > 0 else 0.0}
    return handler.encode(ckpt, members, codes, grid), row
