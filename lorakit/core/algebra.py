"""Adapter algebra on modules: the combine frame (the methods are lorakit.methods), truncate, compare. Pure math
on factors, no file IO.

Every function works on the flattened factors (B2: out x r with the scale folded in, A2: r x in*kernel), so conv
modules are handled by flattening and the results are reshaped back. Factor work is in fp64 (cheap: it is O(n r^2));
dense work (TIES/DARE, extraction) in fp32.
"""

import torch

from ..errors import LorakitError
from .adapter import Module
from .linalg import choose_rank, factor_svd, inner, truncated_svd


def module_from_factors(name, shape, kind, B2, A2, dtype, alpha=None):
    """A Module for a base weight of `shape` from flat factors with dW = B2 @ A2 (scale folded in).

    With `alpha` given the scale alpha/k is kept and B is divided by it (resize keeps the file's scale); without,
    alpha = k so that the scale is exactly 1.
    """
    k = A2.shape[0]
    if k == 0:  # an all-zero result still needs rank >= 1 (spec LK205)
        B2 = torch.zeros(B2.shape[0], 1, dtype=B2.dtype)
        A2 = torch.zeros(1, A2.shape[1], dtype=A2.dtype)
        k = 1
    if alpha is None:
        alpha = float(k)
    m = Module(name, A2.reshape(k, *shape[1:]), B2, alpha=alpha, kind=kind)
    B2 = B2 / m.scale if m.scale != 1.0 else B2
    m.B = B2.reshape(B2.shape[0], k, *[1] * (len(shape) - 2)).to(dtype)
    m.A = m.A.to(dtype)
    return m


def module_of_delta(name, D, kind, dtype, rank=None, energy=None, generator=None):
    """The best rank-`rank` (or `energy`) Module of a dense delta D shaped like its weight, and the truncation's
    stats (rank, energy kept, relative error): extract and the conversions of deltas that are not low-rank."""
    B2, A2, stats = extract_matrix(D.float().flatten(1), rank=rank, energy=energy, generator=generator)
    return module_from_factors(name, tuple(D.shape), kind, B2, A2, dtype), stats


def truncate(svd, k):
    """Optimal (Eckart-Young) rank-k factors from an SVD, and the share of ||dW||_F^2 kept."""
    total = float((svd.S.double() ** 2).sum())
    kept = float((svd.S[:k].double() ** 2).sum())
    B2, A2 = svd.truncate(k).factors()
    return B2, A2, (kept / total if total > 0 else 1.0)


def weighted_stack(entries):
    """[(Module or None, weight)] -> (B2, A2) with B2 @ A2 = sum_i w_i dW_i exactly (fp64)."""
    Bs, As = [], []
    for m, w in entries:
        if m is not None:
            B2, A2 = m.factors(torch.float64)
            Bs.append(w * B2)
            As.append(A2)
    return torch.cat(Bs, dim=1), torch.cat(As, dim=0)


def combine_module(name, entries, method, dtype=torch.float32, **params):
    """One module of `combine`: `method(name, present, **params)` gives flat factors (B2, A2) of the combined delta and
    the share of energy kept; shapes are checked, DoRA refused and bias deltas summed here, once for every method.
    entries: [(Module or None, weight)]. Returns (Module, stats)."""
    present = [(m, w) for m, w in entries if m is not None]
    like = present[0][0]
    for m, _ in present:
        if m.shape != like.shape:
            raise LorakitError(
                f"module shapes differ between inputs: {list(like.shape)} and {list(m.shape)}", tensor=name
            )
        if m.magnitude is not None:
            raise LorakitError(
                "DoRA modules cannot be combined exactly (the magnitude is not linear in dW): "
                "merge them into the base one at a time instead",
                tensor=name,
            )
    B2, A2, kept = method(name, entries, **params)
    out = module_from_factors(name, like.shape, like.kind, B2, A2, dtype)
    biases = [(m.bias, w) for m, w in present if m.bias is not None]
    if biases:
        out.bias = sum(w * b.double() for b, w in biases).to(dtype)
    return out, {
        "module": name,
        "inputs": len(present),
        "rank_in": sum(m.rank for m, _ in present),
        "rank": out.rank,
        "energy_kept": kept,
    }


def resize_module(m, dtype=None, **rule):
    """Optimal truncation of one module; alpha rescaled so the scale alpha / rank is kept (sd-scripts' convention)."""
    svd = factor_svd(*m.factors(torch.float64))
    k = choose_rank(svd.S, **rule)
    B2, A2, kept = truncate(svd, k)
    out = module_from_factors(m.name, m.shape, m.kind, B2, A2, dtype or m.A.dtype, alpha=m.scale * k)
    out.bias, out.magnitude, out.dora_axis = m.bias, m.magnitude, m.dora_axis
    return out, {
        "module": m.name,
        "rank_in": m.rank,
        "rank": k,
        "energy_kept": kept,
        "relative_error": max(0.0, 1.0 - kept) ** 0.5,
    }


def _orthonormal_range(svd):
    """Column and row bases of the numerical range (singular values above 1e-10 of the largest)."""
    if len(svd.S) == 0 or svd.S[0] == 0:
        return svd.U[:, :0], svd.Vh[:0]
    k = int((svd.S > svd.S[0] * 1e-10).sum())
    return svd.U[:, :k], svd.Vh[:k]


def principal_cosines(Q1, Q2):
    """Cosines of the principal angles between the spans of two orthonormal column sets."""
    if Q1.shape[1] == 0 or Q2.shape[1] == 0:
        return torch.zeros(0, dtype=torch.float64)
    return torch.linalg.svdvals(Q1.T @ Q2).clamp(max=1.0)


def compare_modules(a, b):
    """Delta-space comparison of two modules from their factors (fp64). Reparametrizations compare equal."""
    Ba, Aa = a.factors(torch.float64)
    Bb, Ab = b.factors(torch.float64)
    sa, sb = factor_svd(Ba, Aa), factor_svd(Bb, Ab)
    na, nb = float(sa.S.norm()), float(sb.S.norm())
    diff = float(factor_svd(torch.cat([Ba, -Bb], 1), torch.cat([Aa, Ab], 0)).S.norm())
    dot = inner(Ba, Aa, Bb, Ab)
    Ua, Va = _orthonormal_range(sa)
    Ub, Vb = _orthonormal_range(sb)
    col, row = principal_cosines(Ua, Ub), principal_cosines(Va.T, Vb.T)
    overlap = lambda c, k: float((c**2).sum()) / k if k else 0.0  # noqa: E731
    kmin = min(Ua.shape[1], Ub.shape[1])
    return {
        "rank_a": a.rank,
        "rank_b": b.rank,
        "norm_a": na,
        "norm_b": nb,
        "norm_diff": diff,
        "relative_diff": diff / na if na > 0 else (0.0 if diff == 0 else float("inf")),
        "cosine": dot / (na * nb) if na > 0 and nb > 0 else 0.0,
        "column_overlap": overlap(col, kmin),
        "row_overlap": overlap(row, kmin),
        "column_angles_deg": [float(torch.rad2deg(torch.arccos(c))) for c in col],
        "row_angles_deg": [float(torch.rad2deg(torch.arccos(c))) for c in row],
    }


def extract_matrix(D, rank=None, energy=None, generator=None):
    """Low-rank factors of a dense difference (2-D, fp32): randomized SVD for a rank far below the size, exact SVD
    otherwise or for an energy target. Returns (B2, A2, stats) with the exact achieved error."""
    total = float(D.double().square().sum())
    if energy is not None:
        svd = truncated_svd(D, min(D.shape), generator=generator)
        k = choose_rank(svd.S, energy=energy)
        if rank is not None:
            k = min(k, rank)
    else:
        k = min(rank, *D.shape)
        svd = truncated_svd(D, k, generator=generator)
    B2, A2 = svd.truncate(k).factors()
    residual = float((D - B2 @ A2).double().square().sum())
    return (
        B2,
        A2,
        {
            "rank": k,
            "energy_kept": 1.0 - residual / total if total > 0 else 1.0,
            "relative_error": (residual / total) ** 0.5 if total > 0 else 0.0,
        },
    )


def minus_initial(m, m0):
    """dW = s B A - s0 B0 A0 as one module of rank r + r0 at the scale s: A' = [A; A0], B' = [B, -(s0 / s) B0]
    (PEFT's conversion of PiSSA / OLoRA / CorDA / LoRA-GA adapters: its bytes where s0 == s). Exact, no SVD."""
    if m.kind != m0.kind or tuple(m.shape) != tuple(m0.shape):
        raise LorakitError(
            f"the initial adapter's module is {m0.kind} {list(m0.shape)}, the adapter's {m.kind} {list(m.shape)}",
            tensor=m.name,
        )
    if m.magnitude is not None or m0.magnitude is not None:
        raise LorakitError("a DoRA module cannot be taken back to its initial factors", tensor=m.name)
    B0 = -m0.B if m0.scale == m.scale else (m0.B.double() * (-m0.scale / m.scale)).to(m.B.dtype)
    A = torch.cat([m.A, m0.A.to(m.A.dtype)], dim=0)
    out = Module(
        m.name, A, torch.cat([m.B, B0.to(m.B.dtype)], dim=1), alpha=m.scale * A.shape[0], kind=m.kind
    )
    out.bias = m.bias
    return out
