"""Exact combination in delta space, from the factors (fp64): cat, linear, svd. Never forms a dense delta."""

from ..core.algebra import truncate, weighted_stack
from ..core.linalg import choose_rank, factor_svd


def cat(name, entries, **_):
    B2, A2 = weighted_stack(entries)
    return B2, A2, 1.0


def linear(name, entries, rank=None, energy=None, **_):
    B2, A2 = weighted_stack(entries)
    if rank is None and energy is None:
        return B2, A2, 1.0
    svd = factor_svd(B2, A2)
    return truncate(svd, choose_rank(svd.S, rank=rank, energy=energy))


def svd(name, entries, rank=None, energy=None, **_):
    if rank is None and energy is None:
        rank = max(m.rank for m, _ in entries if m is not None)
    return linear(name, entries, rank=rank, energy=energy)
