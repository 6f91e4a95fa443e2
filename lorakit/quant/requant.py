"""Merging into a quantized module: dequantize -> add the deltas -> round onto a grid -> encode, and the survival
report of what came through. The strategies are listed (and described) in lorakit.quant.STRATEGIES.

Everything runs over blocks of input columns in fp32 (the rounding, the error feedback, the survival sums), so a
module costs its stored codes twice (old and new, one byte per element) plus a few blocks, whatever its size.
"""
import torch

from ..errors import LorakitError
from . import rounding

COLUMNS = 256  # columns per block: [out, 256] fp32 blocks stay in cache for usual widths
PROBES = 64


def merged_target(W_old, loras, sign, full):
    """W + dW of a whole module in fp32 (the dequantized --dtype path), dW = sum_i sign w_i s_i B_i A_i; W is the
    dequantized weight, or the full-precision one when given."""
    B, A = stacked_factors(loras, sign)
    return (full if full is not None else W_old) + B @ A


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
    old, stored = fmt.grid(ckpt, members), fmt.codes(ckpt, members)
    out, inn = stored.shape
    B, A = stacked_factors(loras, sign) if loras else (torch.zeros(out, 1), torch.zeros(1, inn))
    generator = torch.Generator().manual_seed(seed)
    # random inputs, then inputs in the adapter's subspace (x = A^T y); drawn in fp64 as lorakit always has, so that a
    # report does not change with the implementation
    probes = torch.randn(inn, PROBES, generator=generator, dtype=torch.float64).float()
    aligned = torch.randn(A.shape[0], PROBES, generator=generator, dtype=torch.float64).float()

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
                c = rounding.feedback_block(T, S, Z, book, A[:, j0:j1], G[j0:j1], R, groups=grid.g[j0:j1])
            else:
                c = rounding.stochastic(book, T / S + Z if Z is not None else T / S, generator)
            new = book.to_storage(c)
        else:
            new, c = book.round(T / S + Z if Z is not None else T / S)
        codes[:, j0:j1] = new
        E = (c.sub_(Z) if Z is not None else c).mul_(S).sub_(T)  # W_new - target, in place of the codes
        if not float(E.abs().amax()) < float("inf"):
            raise LorakitError("the requantized module would hold NaN/Inf values (a NaN in the base or its scales, "
                               "or a zero scale): nothing was written", path=ckpt.path, tensor=members_name(members))
        report.add(E, W_old, dW, T if full is not None else None, probes[j0:j1], A[:, j0:j1],
                   int((bits(new) != bits(stored[:, j0:j1])).sum()))
    return fmt.encode(ckpt, members, codes, grid), report.row(B, A, probes, aligned)


def members_name(members):
    return next(iter(members.values()))


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
    ||dW|| (dQ = W_new - W_old), the share of codes changed, and the output error ||E x|| / ||dW x|| (E = W_new -
    target) on random probes x and on probes in the adapter's input subspace x = A^T y. Everything comes from E, which
    the rounding makes anyway: onto the dequantized base dQ = E + dW, so nu^2 = (||E||^2 - <E, dW>^2 / ||dW||^2) /
    ||dW||^2 without subtracting nearly equal numbers; E x = E A^T y goes through the factors, and dW x = B (A x)."""

    def __init__(self, out, rank):
        self.ee = self.ed = self.dd = self.old2 = self.extra_qq = self.extra_qd = 0.0
        self.changed = self.count = 0
        self.EX, self.EAt = torch.zeros(out, PROBES), torch.zeros(out, rank)

    def add(self, E, W_old, dW, target, X, A, changed):
        """One block: E = W_new - target; target None when it is W_old + dW (the usual merge onto the base)."""
        e, d = E.reshape(-1), dW.reshape(-1)
        self.ee += float(torch.dot(e, e))
        self.ed += float(torch.dot(e, d))
        self.dd += float(torch.dot(d, d))
        self.old2 += float(torch.dot(W_old.reshape(-1), W_old.reshape(-1)))
        if target is not None:  # onto the original weight: dQ = E + (target - W_old), kept apart
            shift = (target - W_old - dW).reshape(-1)
            self.extra_qq += float(torch.dot(shift, shift) + 2 * torch.dot(shift, e + d))
            self.extra_qd += float(torch.dot(shift, d))
        self.EX.addmm_(E, X)
        self.EAt.addmm_(E, A.T)
        self.changed += changed
        self.count += E.numel()

    def row(self, B, A, X, Y):
        dd = self.dd
        qd = self.ed + dd + self.extra_qd
        rho = qd / dd if dd else 0.0
        if self.extra_qq or self.extra_qd:
            qq = self.ee + 2 * self.ed + dd + self.extra_qq
            nu2 = qq - qd * qd / dd if dd else 0.0
        else:
            nu2 = self.ee - self.ed * self.ed / dd if dd else 0.0
        nu = (max(0.0, nu2) / dd) ** 0.5 if dd else 0.0

        def err(E, D):
            base = float(D.double().norm())
            return float(E.double().norm()) / base if base else 0.0
        AAtY = A @ (A.T @ Y)
        return {"retention": rho, "noise": nu, "probe_error_random": err(self.EX, B @ (A @ X)),
                "probe_error_aligned": err(self.EAt @ Y, B @ AAtY), "codes_changed": self.changed / max(1, self.count),
                "relative_delta": (dd / self.old2) ** 0.5 if self.old2 else 0.0}
