"""Sparsifying merges on the dense deltas, per module in fp32, then re-factorized to --rank (default: the sum of the
input ranks) or --energy: TIES (Yadav et al. 2023), DARE (Yu et al. 2024), magnitude pruning."""

import zlib

import torch

from ..core.algebra import truncate
from ..core.linalg import choose_rank, truncated_svd


def _sparsify_magnitude(d, density):
    """Keep the `density` share of entries with the largest |value| (TIES 'trim')."""
    k = int(round(density * d.numel()))
    if k >= d.numel():
        return d
    if k <= 0:
        return torch.zeros_like(d)
    threshold = d.abs().flatten().kthvalue(d.numel() - k).values
    return d * (d.abs() > threshold)


def _sparsify_random(d, density, generator):
    """DARE: drop each entry with probability 1 - density, rescale the kept ones by 1 / density."""
    if density >= 1:
        return d
    keep = torch.rand(d.shape, generator=generator) < density
    return d * keep / density


def _sign_consensus(deltas, weights):
    """TIES elect + disjoint merge: entries agreeing with the sign of the sum, divided by their summed weight."""
    stacked = torch.stack(deltas)
    sign = torch.sign(stacked.sum(0))
    agree = torch.sign(stacked) == sign
    merged = (stacked * agree).sum(0)
    w = torch.tensor(weights, dtype=stacked.dtype).reshape(-1, *[1] * (stacked.ndim - 1))
    divisor = (w * agree).sum(0)
    return merged / torch.where(divisor.abs() < 1e-12, torch.ones_like(divisor), divisor)


def _seeded(seed, name, index):
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode()) * 31 + index) % 2**63)


def _dense_delta(name, entries, method, density, seed):
    """The papers' definitions on the deltas: TIES (Yadav et al. 2023), DARE (Yu et al. 2024), magnitude pruning.

    entries: [(Module or None, weight)]. Returns the combined dense delta (fp32, flattened to 2-D).
    """
    deltas, weights = [], []
    for i, (m, w) in enumerate(entries):
        if m is None:
            continue
        d = m.delta().flatten(1)
        if method in ("ties", "magnitude_prune"):
            d = _sparsify_magnitude(d, density)
        else:
            d = _sparsify_random(d, density, _seeded(seed, name, i))
        deltas.append(w * d)
        weights.append(w)
    if method in ("ties", "dare_ties"):
        return _sign_consensus(deltas, weights)
    return torch.stack(deltas).sum(0)


def _refactorize(name, entries, method, rank=None, energy=None, density=0.5, seed=0):
    D = _dense_delta(name, entries, method, density, seed)
    k = rank or sum(m.rank for m, _ in entries if m is not None)
    svd = truncated_svd(D, min(k, *D.shape) if energy is None else min(D.shape))
    if energy is not None:
        k = choose_rank(svd.S, energy=energy)
    total = float(D.double().square().sum())
    B2, A2, _ = truncate(svd, min(k, len(svd.S)))
    kept = float((svd.S[:k].double() ** 2).sum()) / total if total > 0 else 1.0
    return B2, A2, kept


def ties(name, entries, **params):
    return _refactorize(name, entries, "ties", **params)


def dare_linear(name, entries, **params):
    return _refactorize(name, entries, "dare_linear", **params)


def dare_ties(name, entries, **params):
    return _refactorize(name, entries, "dare_ties", **params)


def magnitude_prune(name, entries, **params):
    return _refactorize(name, entries, "magnitude_prune", **params)
