"""Merging into a quantized module: dequantize -> add the deltas -> round onto a grid -> encode, and the survival
report of what came through. The strategies are listed (and described) in lorakit.quant.STRATEGIES.

Everything runs over blocks of input columns in fp32 (the rounding, the error feedback, the survival sums), so a
module costs its stored codes twice (old and new, one byte per element) plus a few blocks, whatever its size.
"""
import torch

from ..errors import LorakitError
from . import STRATEGIES, rounding

COLUMNS = 256  # columns per block: [out, 256] fp32 blocks stay in cache for usual widths
PROBES = 64


def merged_target(W_old, loras, sign, full):
    """(target, dW, A) of a whole module (the dequantized --dtype path): dW = sum_i sign w_i s_i B_i A_i in fp32; the
    target is onto the dequantized weight, or onto the full-precision one when given."""
    B, A = stacked_factors(loras, sign)
    dW = B @ A
    base = full if full is not None else W_old
    return base + dW, dW, A


def stacked_factors(loras, sign):
    """(B [out, R], A [R, in]) with B @ A = sum_i sign w_i s_i B_i A_i: every adapter of the module at once."""
    Bs, As = [], []
    for m, w in loras:
        if m.magnitude is not None:
            raise LorakitError("DoRA into a quantized base is not supported: merge with --dtype", tensor=m.name)
        B2, A2 = m.factors(torch.float32)
        Bs.append(B2 * (sign * w))
        As.append(A2)
    return torch.cat(Bs, 1), torch.cat(As, 0)


def requantize(fmt, ckpt, members, loras, sign, strategy, full=None, seed=0):
    """The new tensors of one quantized module (same names, shapes, dtypes) and its survival report row."""
    if strategy not in STRATEGIES:
        raise LorakitError(f"unknown strategy '{strategy}' (choose from {', '.join(STRATEGIES)})")
    old, stored = fmt.grid(ckpt, members), fmt.codes(ckpt, members)
    out, inn = stored.shape
    B, A = stacked_factors(loras, sign) if loras else (torch.zeros(out, 1), torch.zeros(1, inn))
    generator = torch.Generator().manual_seed(seed)
    probes = torch.randn(inn, PROBES, generator=generator)  # random inputs, then inputs in the adapter's subspace
    aligned = torch.randn(A.shape[0], PROBES, generator=generator)  # x = A^T y

    def blocks():
        """(j0, j1, W_old, dW, target) for each block of columns."""
        for j0 in range(0, inn, COLUMNS):
            j1 = min(inn, j0 + COLUMNS)
            S, Z = old.columns(j0, j1)
            c = old.codebook.values(stored[:, j0:j1])
            W_old = (c.sub_(Z) if Z is not None else c).mul_(S)
            dW = B @ A[:, j0:j1]
            yield j0, j1, W_old, dW, (full[:, j0:j1].float() if full is not None else W_old) + dW

    if strategy in ("rescale", "original"):
        grid = fit(fmt, ckpt, members, old, ((j0, j1, T) for j0, j1, _, _, T in blocks()))
    else:
        grid = old
    book, codes = grid.codebook, torch.empty_like(stored)
    if strategy == "feedback":
        G, R = rounding.feedback_gains(A), torch.zeros(out, A.shape[0])
    report = Survival(out, A.shape[0])
    for j0, j1, W_old, dW, T in blocks():
        S, Z = grid.columns(j0, j1)
        if strategy in ("feedback", "stochastic"):
            if strategy == "feedback":
                c = rounding.feedback_block(T, S, Z, book, A[:, j0:j1], G[j0:j1], R)
            else:
                c = rounding.stochastic(book, T / S + Z if Z is not None else T / S, generator)
            new = book.to_storage(c)
        else:
            new, c = book.round(T / S + Z if Z is not None else T / S)
        codes[:, j0:j1] = new
        W_new = (c.sub_(Z) if Z is not None else c).mul_(S)
        report.add(W_old, W_new, dW, T, probes[j0:j1], A[:, j0:j1], full is None,
                   int((bits(new) != bits(stored[:, j0:j1])).sum()))
    return fmt.encode(ckpt, members, codes, grid), report.row(B, A, probes, aligned)


def bits(codes):
    """Stored codes as integers, to count the changed ones (FP8 by its bytes: its zero is always +0)."""
    return codes.view(torch.uint8) if codes.dtype == torch.float8_e4m3fn else codes


def fit(fmt, ckpt, members, old, targets):
    """A fresh grid for the targets ((j0, j1, T) blocks of columns): from their minimum and maximum per (column group,
    row), the groups of the stored grid `old`."""
    lo = torch.full(old.S.shape, float("inf"))
    hi = torch.full(old.S.shape, -float("inf"))
    for j0, j1, T in targets:
        index = old.g[j0:j1, None].expand(-1, T.shape[0])
        lo.scatter_reduce_(0, index, T.T, "amin")
        hi.scatter_reduce_(0, index, T.T, "amax")
    return fmt.fit(ckpt, members, lo, hi)


class Survival:
    """What came through, summed block by block: retention rho = <dQ, dW> / ||dW||^2, noise nu = ||dQ - rho dW|| /
    ||dW||, the share of codes changed, and the output error ||(W_new - target) x|| / ||dW x|| on random probes X and
    on probes in the adapter's input subspace x = A^T y. The products with the aligned probes go through the factors
    (E A^T is [out, r]), and dW x = B (A x) never needs dW."""

    def __init__(self, out, rank):
        self.qd = self.qq = self.dd = self.old2 = 0.0
        self.changed = self.count = 0
        self.EX, self.EAt = torch.zeros(out, PROBES), torch.zeros(out, rank)

    def add(self, W_old, W_new, dW, target, X, A, onto_old, changed):
        dQ = W_new - W_old
        q, d = dQ.reshape(-1).double(), dW.reshape(-1).double()  # fp64 sums: nu subtracts nearly equal numbers
        self.qd += float(torch.dot(q, d))
        self.qq += float(torch.dot(q, q))
        self.dd += float(torch.dot(d, d))
        self.old2 += float(W_old.square().sum(dtype=torch.float64))
        E = dQ.sub_(dW) if onto_old else W_new - target  # W_new - (W_old + dW) without another block
        self.EX.addmm_(E, X)
        self.EAt.addmm_(E, A.T)
        self.changed += changed
        self.count += W_old.numel()

    def row(self, B, A, X, Y):
        rho = self.qd / self.dd if self.dd else 0.0
        nu = max(0.0, self.qq - 2 * rho * self.qd + rho * rho * self.dd) ** 0.5 / self.dd ** 0.5 if self.dd else 0.0

        def err(E, D):
            base = float(D.double().norm())
            return float(E.double().norm()) / base if base else 0.0
        AAtY = A @ (A.T @ Y)
        return {"retention": rho, "noise": nu, "probe_error_random": err(self.EX, B @ (A @ X)),
                "probe_error_aligned": err(self.EAt @ Y, B @ AAtY), "codes_changed": self.changed / max(1, self.count),
                "relative_delta": (self.dd / self.old2) ** 0.5 if self.old2 else 0.0}
