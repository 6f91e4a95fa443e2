"""Merging into a quantized module: dequantize -> add the deltas -> round onto a grid -> encode, and the survival
report of what came through. The strategies are listed (and described) in lorakit.quant.STRATEGIES.

Everything runs over blocks of input columns in fp32 (the rounding, the error feedback, the survival sums), so a
module costs its stored codes twice (old and new, one byte per element) plus a few blocks, whatever its size.
"""

from dataclasses import dataclass

import torch

from ..errors import LorakitError
from . import rounding
from .base import Stored, row_major

COLUMNS = 256  # columns per block: [out, 256] fp32 blocks stay in cache for usual widths...
BLOCK_ELEMENTS = 1 << 21  # ...and tall modules take fewer (down to 64: a multiple of the usual group sizes)
PROBES = 64
SMALL_DELTA = 8  # small_delta's bound: between the weak (<= 2.6) and strong (>= 16) adapters measured


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
            raise LorakitError(
                "DoRA into a quantized base is not supported: merge with --dtype", tensor=m.name
            )
        B2, A2 = m.factors(torch.float32)
        Bs.append(B2 * (sign * w))
        As.append(A2)
    return torch.cat(Bs, 1), torch.cat(As, 0)


@dataclass
class InputMoments:
    """The second moment of a layer's inputs on calibration data, compressed: H ~ A^T A + rest * I, A [k, in] from
    its top eigenpairs, `rest` the mean of the eigenvalues left out."""

    factor: torch.Tensor
    rest: float

    def hessian(self):
        A = self.factor.double()
        return A.T @ A + self.rest * torch.eye(A.shape[1], dtype=torch.float64)


def requantize(fmt, ckpt, members, loras, sign, strategy, full=None, seed=0, inputs=None, small=None):
    """The new tensors of one quantized module (same names, shapes, dtypes) and its survival report row (with the
    strategy it took). `inputs` (InputMoments): what the layer's inputs are on calibration data, for --strategy
    gptq. `small`: the strategy stochastic gives way to where the delta is too small for random rounding to pay
    (small_delta; --strategy auto)."""
    old, stored = fmt.grid(ckpt, members), fmt.codes(ckpt, members)
    out, inn = stored.shape
    rows = row_major(
        stored
    )  # every block below takes the stored codes' layout: elementwise work stays at memory speed
    columns = COLUMNS
    while out * columns > BLOCK_ELEMENTS and columns > 64:
        columns //= 2
    B, A = stacked_factors(loras, sign) if loras else (torch.zeros(out, 1), torch.zeros(1, inn))
    generator = torch.Generator().manual_seed(seed)
    # random inputs, then inputs in the adapter's subspace (x = A^T y); drawn in fp64 as lorakit always has, so that a
    # report does not change with the implementation
    probes = torch.randn(inn, PROBES, generator=generator, dtype=torch.float64).float()
    aligned = torch.randn(A.shape[0], PROBES, generator=generator, dtype=torch.float64).float()
    report = Survival(out, A.shape[0])
    if strategy == "stochastic" and small is not None and small_delta(old, B, A):
        strategy = small
    if strategy == "gptq":
        if inputs is None:
            raise LorakitError("--strategy gptq needs --calibration DATA", tensor=members_name(members))
        new_codes, grid = gptq(fmt, ckpt, members, old, stored, (B, A), inputs, report, probes, full)
        return fmt.encode(ckpt, members, new_codes, grid), {
            **report.row(B, A, probes, aligned),
            "strategy": strategy,
        }

    # feedback makes its codes column by column: its targets come column-major ([b, out] contiguous, seen as [out, b])
    by_rows = rows and strategy != "feedback"

    def in_layout(X, row_wise):
        """X [out, b] laid out row-major or column-major (no copy when it already is)."""
        return X.contiguous() if row_wise else X.T.contiguous().T

    def blocks(tally):
        """(j0, j1, target T = W + dW, D = T - W_old) for each block of columns, in the layout `by_rows`; `tally`
        adds W_old to the report."""
        for j0 in range(0, inn, columns):
            j1 = min(inn, j0 + columns)
            S, Z = old.columns(j0, j1, rows)
            c = old.codebook.values(stored[:, j0:j1])
            W_old = (c.sub_(Z) if Z is not None else c).mul_(S)
            if tally:
                report.add_base(W_old)
            W_old = in_layout(
                W_old, by_rows
            )  # (a transposing mul into the other layout is 4x slower than this)
            dW = B @ A[:, j0:j1] if by_rows else (A[:, j0:j1].T @ B.T).T
            if full is None:
                yield j0, j1, W_old.add_(dW), dW
            else:
                T = in_layout(full[:, j0:j1].to(torch.float32, copy=True), by_rows).add_(dW)
                yield j0, j1, T, T - W_old

    if strategy in ("rescale", "original", "refit"):
        lo, hi = target_range(old, ((j0, j1, T) for j0, j1, T, _ in blocks(False)))
        grid = (
            fmt.fit(ckpt, members, lo, hi) if strategy != "refit" else refit(fmt, ckpt, members, old, lo, hi)
        )
    else:
        grid = old
    # the new codes overwrite the stored ones block by block (each block is read before it is written)
    book, codes = grid.codebook, stored
    if strategy == "feedback":
        G, R = rounding.feedback_gains(A), torch.zeros(out, A.shape[0])
    for j0, j1, T, D in blocks(True):
        S, Z = grid.columns(j0, j1, by_rows)
        if strategy == "feedback":
            c, E = rounding.feedback_block(T, S, Z, book, A[:, j0:j1], G[j0:j1], R, groups=grid.g[j0:j1])
            new, E = book.to_storage(in_layout(c.T, rows)), E.T  # [b, out] -> [out, b]
        else:
            U = T / S
            if Z is not None:
                U.add_(Z)
            new, c = book.stochastic(U, generator) if strategy == "stochastic" else book.round(U)
            E = (c.sub_(Z) if Z is not None else c).mul_(S).sub_(T)  # W_new - target, in place of the codes
        report.changed += int(torch.count_nonzero(bits(new) != bits(codes[:, j0:j1])))
        codes[:, j0:j1] = new
        report.add(E, D, probes[j0:j1], A[:, j0:j1], full is not None)
    if not report.finite():
        raise LorakitError(
            "the requantized module would hold NaN/Inf values (a NaN in the base or its scales, "
            "or a zero scale): nothing was written",
            path=ckpt.path,
            tensor=members_name(members),
        )
    return fmt.encode(ckpt, members, codes, grid), {**report.row(B, A, probes, aligned), "strategy": strategy}


def small_delta(grid, B, A):
    """Whether dW = B A is too small for random rounding to pay: in times its RMS under SMALL_DELTA grid steps. On
    an output, random rounding adds noise ~ sqrt(in |dW| step) where nearest rounding loses at most the delta's
    own in |dW|, so a weak delta is better kept than drawn. Measured on SmolLM2: a weak adapter (2 steps; ratios
    0.4 to 2.6) merged into the Q4_1 GGUF had KL 0.0039 stochastic against 0.00019 kept, its whole effect; the
    benchmark's adapter (ratios 16 to 117) is where stochastic won."""
    out, inn = B.shape[0], A.shape[1]
    delta = (float(((B.T.double() @ B.double()) * (A.double() @ A.T.double())).sum()) / (out * inn)) ** 0.5
    lo, hi = grid.codebook.span()
    step = float(grid.S.double().pow(2).mean()) ** 0.5 * (hi - lo) / (grid.codebook.count() - 1)
    return delta * inn < SMALL_DELTA * step


def gptq(fmt, ckpt, members, old, stored, factors, inputs, report, probes, full):
    """GPTQ onto the stored grid (a weight W + dW pushes past its block's range is clipped, and its error spread
    over the later columns like any rounding error: refitting scales cost more on coarse grids): the new codes in
    the stored layout, and the grid. One module at a time in fp32, as the dequantized path holds it."""
    (B, A), inn = factors, stored.shape[1]
    before = stored.contiguous()
    W_old = Stored(old, before).dequantize()
    T = (full.float() if full is not None else W_old) + B @ A
    S, Z = old.columns(0, inn, True)
    values, codes = rounding.gptq_round(T, S, Z, old.codebook, inputs.hessian())
    E = (values.sub_(Z) if Z is not None else values).mul_(S).sub_(T)
    report.add_base(W_old)
    report.changed += int(torch.count_nonzero(bits(codes) != bits(before)))
    report.add(E, T - W_old, probes, A, full is not None)
    stored.copy_(codes)  # in the stored layout (GPTQ / AWQ keep W^T)
    return stored, old


def members_name(members):
    return next(iter(members.values()))


def bits(codes):
    """Stored codes as integers, to count the changed ones (FP8 by its bytes: its zero is always +0)."""
    return codes.view(torch.uint8) if codes.dtype == torch.float8_e4m3fn else codes


def fit(fmt, ckpt, members, old, targets):
    """A fresh grid for the targets ((j0, j1, T) blocks of columns): from their minimum and maximum per (column group,
    row), the groups of the stored grid `old`."""
    return fmt.fit(ckpt, members, *target_range(old, targets))


def refit(fmt, ckpt, members, old, lo, hi):
    """The stored grid while the targets stay inside its range; where W + dW leaves it anywhere (a group whose
    largest weight grows), a grid fitted to the union of the stored range and the targets', so that nothing is
    clipped and groups the delta keeps inside keep their range (the same file size: only scales change)."""
    c_lo, c_hi = old.codebook.span()
    Z = old.Z if old.Z is not None else 0.0
    old_lo, old_hi = (c_lo - Z) * old.S, (c_hi - Z) * old.S
    tolerance = 1e-6 * old.S
    if not bool(((lo < old_lo - tolerance) | (hi > old_hi + tolerance)).any()):
        return old
    return fmt.fit(ckpt, members, torch.minimum(lo, old_lo), torch.maximum(hi, old_hi))


def target_range(old, targets):
    """(lo, hi) [groups, out]: the targets' minimum and maximum per (column group, row) of the grid `old`."""
    lo = torch.full(old.S.shape, float("inf"))
    hi = torch.full(old.S.shape, -float("inf"))
    size = run_length(old.g)
    for j0, j1, T in targets:
        b = j1 - j0
        if (
            size and j0 // size == (j1 - 1) // size
        ):  # the block inside one group (per-channel grids: every block)
            g = j0 // size
            torch.minimum(lo[g], T.amin(1), out=lo[g])
            torch.maximum(hi[g], T.amax(1), out=hi[g])
            continue
        if (
            size and j0 % size == 0 and b % size == 0
        ):  # groups of `size` columns in order: reductions, no scatter
            n, g0 = b // size, j0 // size
            by_group = (
                T.reshape(-1, n, size).transpose(0, 1) if T.is_contiguous() else T.T.reshape(n, size, -1)
            )
            dim = 2 if T.is_contiguous() else 1
            torch.minimum(lo[g0 : g0 + n], by_group.amin(dim), out=lo[g0 : g0 + n])
            torch.maximum(hi[g0 : g0 + n], by_group.amax(dim), out=hi[g0 : g0 + n])
            continue
        index = old.g[j0:j1, None].expand(-1, T.shape[0])
        lo.scatter_reduce_(0, index, T.T, "amin")
        hi.scatter_reduce_(0, index, T.T, "amax")
    return lo, hi


def run_length(g):
    """k when column j is in group j // k (per-channel grids: k = all columns), else None (GPTQ's act-order g_idx)."""
    if len(g) == 0:
        return None
    k = int((g == g[0]).sum())
    return k if bool((g == torch.arange(len(g)) // k).all()) else None


class Survival:
    """What came through: retention rho = <dQ, dW> / ||dW||^2, noise nu = ||dQ - rho dW|| / ||dW|| (dQ = W_new -
    W_old), the share of codes changed, and the output error ||E x|| / ||dW x|| (E = W_new - target) on random probes
    x and on probes in the adapter's input subspace x = A^T y. Summed block by block, without a dense copy: ||dQ||^2
    directly (dQ = E + D, D = target - W_old), so that nu^2 = (||dQ||^2 - <dQ, dW>^2 / ||dW||^2) / ||dW||^2 stays
    exact where nothing changed; every product with dW = B A goes through the factors: <dQ, dW> = <E A^T + D A^T, B>
    (E A^T being the aligned probes' sum anyway; D A^T = dW A^T onto the dequantized base), ||dW||^2 = <B^T B, A A^T>,
    E x = E A^T y and dW x = B (A x)."""

    def __init__(self, out, rank):
        self.qq = self.old2 = 0.0
        self.changed = self.count = 0
        # [E X | E A^T]: one product reads E once. Blocks of column-major E add to its transpose instead: BLAS's
        # faster form of the product for each layout (1.8 ms against 2.3 for a [4096, 256] block)
        self.EP, self.PE, self.DAt = torch.zeros(out, PROBES + rank), torch.zeros(PROBES + rank, out), None

    def add_base(self, W_old):
        self.old2 += float(torch.dot(flat(W_old), flat(W_old)))

    def add(self, E, D, X, A, shifted):
        """One block: E = W_new - target and D = target - W_old in one layout, X its rows of the probes, A its
        columns of the factors; `shifted`: the target is not W_old + dW (merging onto the original weight)."""
        q = flat(E.add(D))
        self.qq += float(torch.dot(q, q))
        P = torch.cat([X, A.T], 1)
        if E.is_contiguous():
            self.EP.addmm_(E, P)
        else:
            self.PE.addmm_(P.T, E.T)
        if shifted:
            self.DAt = D @ A.T if self.DAt is None else self.DAt.addmm_(D, A.T)
        self.count += E.numel()

    def finite(self):
        return self.qq < float("inf")  # one NaN or Inf in E makes the sum of squares of dQ = E + D so

    def row(self, B, A, X, Y):
        Bd, Ad = B.double(), A.double()
        EP = self.EP + self.PE.T
        EX, EAt = EP[:, :PROBES], EP[:, PROBES:]
        dd = float(((Bd.T @ Bd) * (Ad @ Ad.T)).sum())
        qd = float((EAt.double() * Bd).sum()) + (
            dd if self.DAt is None else float((self.DAt.double() * Bd).sum())
        )
        rho = qd / dd if dd else 0.0
        nu = (max(0.0, self.qq - qd * qd / dd) / dd) ** 0.5 if dd else 0.0

        def err(E, D):
            base = float(D.double().norm())
            return float(E.double().norm()) / base if base else 0.0

        AAtY = A @ (A.T @ Y)
        return {
            "retention": rho,
            "noise": nu,
            "probe_error_random": err(EX, B @ (A @ X)),
            "probe_error_aligned": err(EAt @ Y, B @ AAtY),
            "codes_changed": self.changed / max(1, self.count),
            "relative_delta": (dd / self.old2) ** 0.5 if self.old2 else 0.0,
        }


def flat(t):
    """A contiguous block, or the transpose of one, as a flat view (for sums over all its elements)."""
    return t.T.reshape(-1) if not t.is_contiguous() and t.T.is_contiguous() else t.reshape(-1)
