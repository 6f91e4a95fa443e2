"""Merging into a quantized module: dequantize -> add the deltas -> round onto a grid -> encode, and the survival
report of what came through. The strategies are listed (and described) in lorakit.quant.STRATEGIES.

Everything runs over blocks of input columns in fp32 (the rounding, the error feedback, the survival sums), so a
module costs its stored codes twice (old and new, one byte per element) plus a few blocks, whatever its size.
"""

from dataclasses import dataclass

import torch

from ..core.linalg import factor_svd
from ..errors import LorakitError
from . import rounding, score
from .base import Grid, Stored, row_major

COLUMNS = 256  # columns per block: [out, 256] fp32 blocks stay in cache for usual widths...
BLOCK_ELEMENTS = 1 << 21  # ...and tall modules take fewer (down to 64: a multiple of the usual group sizes)
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


@dataclass
class Module:
    """One quantized module as requantizing sees it: the stored grid and codes (`rows`: the codes row-major), the
    adapters' stacked factors (B [out, R], A [R, in]), the full-precision weight when merging onto it, and the
    probes every candidate is measured on (random inputs X, the adapter's inputs Y as x = A^T y, and with
    calibration data the square root of the layer's input second moment, H ~ F^T F + rest I)."""

    old: Grid
    stored: torch.Tensor
    B: torch.Tensor
    A: torch.Tensor
    full: torch.Tensor = None
    X: torch.Tensor = None
    Y: torch.Tensor = None
    inputs: InputMoments = None

    @property
    def rows(self):
        return row_major(self.stored)

    def sample(self, idx):
        """The same module on the rows `idx` (a copy): rounding is row by row, so every candidate's error on them
        estimates its error on the whole module."""
        full = self.full[idx] if self.full is not None else None
        stored = self.stored[idx].contiguous()
        return Module(self.old.rows(idx), stored, self.B[idx], self.A, full, self.X, self.Y, self.inputs)


def requantize(fmt, ckpt, members, loras, sign, strategy, full=None, seed=0, inputs=None, bias_weight=1.0):
    """The new tensors of one quantized module (same names, shapes, dtypes) and its survival report row (with the
    strategy it took). `inputs` (InputMoments): the layer's inputs on calibration data. `auto` measures every
    candidate on a sample of rows, keep-the-old-codes among them, takes the smallest output error (its biased part
    weighted by `bias_weight`: see coherence), and keeps the old codes where the whole module's result scores worse
    than they do ({}: every member copied)."""
    with fmt.held(ckpt, members):
        return requantize_held(fmt, ckpt, members, loras, sign, strategy, full, seed, inputs, bias_weight)


def requantize_held(fmt, ckpt, members, loras, sign, strategy, full, seed, inputs, bias_weight):
    """requantize, while the format may keep the module's stored bytes."""
    old, stored = fmt.grid(ckpt, members), fmt.codes(ckpt, members)
    out, inn = stored.shape
    B, A = stacked_factors(loras, sign) if loras else (torch.zeros(out, 1), torch.zeros(1, inn))
    generator = torch.Generator().manual_seed(seed)
    # random inputs, then inputs in the adapter's subspace (x = A^T y); drawn in fp64 as lorakit always has, so that a
    # report does not change with the implementation
    X = torch.randn(inn, PROBES, generator=generator, dtype=torch.float64).float()
    Y = torch.randn(A.shape[0], PROBES, generator=generator, dtype=torch.float64).float()
    module = Module(old, stored, B, A, full, X, Y, inputs)
    chosen, trials = strategy, None
    if strategy == "auto":
        chosen, trials = choose(fmt, ckpt, members, module, seed, bias_weight)
        if chosen == "keep":  # every member copied byte for byte: a NaN in the base is refused all the same
            if not finite_stored(module):
                raise not_finite(ckpt, members)
            return kept(trials)
    if chosen == "gptq" and inputs is None:
        raise LorakitError("--strategy gptq needs --calibration DATA", tensor=members_name(members))
    codes, grid, row = run_strategy(fmt, ckpt, members, module, chosen, generator)
    if not row.pop("finite"):
        raise not_finite(ckpt, members)
    row["strategy"] = chosen
    if trials is not None:
        row["candidates"] = {s: round(score(r), 6) for s, r in trials.items()}
        if bias_weight != 1.0:
            row["bias_weight"] = bias_weight
        if (grid is old and row["codes_changed"] == 0) or weighted(row, bias_weight) > bias_weight * (
            1.0 - TIE
        ):
            return kept(trials)  # the sample misjudged: never worse than the old codes
    return fmt.encode(ckpt, members, codes, grid), row


def kept(trials):
    """({}: every member copied byte for byte, its report row): the old codes kept."""
    candidates = {s: round(score(r), 6) for s, r in trials.items()}
    return {}, {**trials["keep"], "strategy": "keep", "candidates": candidates}


def not_finite(ckpt, members):
    return LorakitError(
        "the requantized module would hold NaN/Inf values (a NaN in the base or its scales, "
        "or a zero scale): nothing was written",
        path=ckpt.path,
        tensor=members_name(members),
    )


# Dropping a trained adapter errs coherently: every module's delta was a step down the same loss, so the errors of
# modules that keep their codes add up in the model's output, while unbiased rounding noise (stochastic) adds up
# only in its squares. Per module the first looks cheaper than it is (issue #36: on trained adapters stochastic
# rounding is best at the model's output while each module's probes favour keeping the codes). A trained adapter
# shows it in its factors, with no data: the residual stream's gradient is nearly the same at every layer, so its
# modules of one kind share output directions across layers (cross-layer overlap of the top column spaces of B
# 3-10x chance on SmolLM2), where random factors sit at chance. auto then weighs the biased part of each module's
# error, (1 - retention)^2 of ||dW x||^2, COHERENT_BIAS_WEIGHT times: the weight that matched the model's KL on int8
# and Q4_K_M (bench_quant_quality), checked on the other formats.
COHERENT_BIAS_WEIGHT = 30.0
COHERENCE_Z = (
    10.0  # the shared directions' excess over chance, in standard errors, that marks an adapter coherent
)
COHERENCE_RANK = 8  # top column directions of each module's B compared
COHERENCE_MODULES = 64  # modules of one kind compared at most


@dataclass
class Coherence:
    """How far an adapter's modules of one kind share output directions beyond chance (z, in standard errors), and
    the weight auto gives the biased part of each module's error for it."""

    z: float
    bias_weight: float


def coherence(factors):
    """Coherence of [(module name, B [out, r])]: modules grouped by kind (the name's last part) and width; in each
    group of 3 or more, the mean overlap ||U_i^T U_j||^2 / k of every pair's top-k column spaces against chance k / d
    (a random pair's overlap has that mean and a standard deviation of about sqrt(2) (d - k) / d^2, taken as that of
    the group's mean over sqrt(its modules): conservative, pairs share modules); the groups' z joined (Stouffer)."""
    groups = {}
    for name, B in factors:
        B = B.flatten(1).double()
        if B.shape[0] > 4 * COHERENCE_RANK and B.shape[1] >= 1:
            groups.setdefault((name.rsplit(".", 1)[-1], B.shape[0]), []).append(B)
    scores = []
    for (_, d), Bs in groups.items():
        if len(Bs) < 3:
            continue
        Bs = Bs[
            :: -(-len(Bs) // COHERENCE_MODULES)
        ]  # a MoE's thousands of experts: an even sample, not n^2 pairs
        k = min(COHERENCE_RANK, *(B.shape[1] for B in Bs))
        # each B's top-k left singular vectors (through QR: LAPACK's SVD of a tall matrix is 100x slower)
        U = torch.stack(
            [factor_svd(B, torch.eye(B.shape[1], dtype=B.dtype)).U[:, :k] for B in Bs]
        )  # [n, d, k]
        overlaps = torch.einsum("adk,bdl->abkl", U, U).pow(2).sum((2, 3)) / k  # [n, n]
        n = len(Bs)
        mean = float((overlaps.sum() - overlaps.diagonal().sum()) / (n * (n - 1)))
        spread = 2**0.5 * (d - k) / d**2 / n**0.5
        scores.append((mean - k / d) / spread)
    z = sum(scores) / len(scores) ** 0.5 if scores else 0.0
    return Coherence(z, COHERENT_BIAS_WEIGHT if z > COHERENCE_Z else 1.0)


AUTO_ROWS = 128  # rows each candidate of auto is measured on (the whole module when it has fewer)
# A candidate must beat the old codes' score of 1 by this much to replace them: a few flipped codes that move the
# probes' error by less are within what 64 probes tell apart, and rewriting bytes for it buys nothing measurable.
TIE = 0.02
CANDIDATES = ("same-grid", "refit", "rescale", "stochastic")


def weighted(row, bias_weight):
    """What auto minimizes: the output error score(row), its biased part (1 - retention)^2 weighted by
    `bias_weight` (1: every error alike; keeping the codes scores bias_weight)."""
    return score(row) + (bias_weight - 1.0) * (1.0 - row["retention"]) ** 2


def choose(fmt, ckpt, members, module, seed, bias_weight=1.0):
    """(the strategy auto takes, by `pick`, {candidate: its row on a sample of rows}). "keep" (the old codes, the
    adapter dropped here) costs nothing to measure: its error is dW itself.
    refit is skipped where its grid is the stored one (it is same-grid there); gptq joins with calibration data."""
    out = module.stored.shape[0]
    generator = torch.Generator().manual_seed(seed + 1)
    idx = torch.randperm(out, generator=generator)[: min(out, AUTO_ROWS)].sort().values
    part = module.sample(idx)
    trials = {"keep": keep_row(part)}
    candidates = CANDIDATES + (("gptq",) if module.inputs is not None else ())
    for strategy in candidates:
        grid = part_grid(fmt, ckpt, members, module, part, idx, strategy)
        if strategy == "refit" and grid is part.old:  # refit kept the stored grid: it is same-grid here
            continue
        trial = Module(part.old, part.stored.clone(), part.B, part.A, part.full, part.X, part.Y, part.inputs)
        _, grid, row = run_strategy(fmt, ckpt, members, trial, strategy, generator, grid)
        if row.pop("finite") and not (grid is part.old and row["codes_changed"] == 0):  # else it is keep
            trials[strategy] = row
    return pick(trials, bias_weight), trials


def pick(trials, bias_weight=1.0):
    """The strategy auto takes from {candidate: its row}: the smallest weighted error, "keep" unless that beats
    keeping the codes by TIE. (Taking rescale among candidates within TIE of the smallest was measured: fp8-block
    strong 19.2 -> 17.3 floors, GPTQ strong 7.03 -> 7.40 and NF4 strong 10.4 -> 10.6, one check fewer met.)"""
    best = min(trials, key=lambda s: weighted(trials[s], bias_weight))
    # a candidate that changes nothing measurable (no code moved) ties with keeping the codes: keep them
    return "keep" if weighted(trials[best], bias_weight) >= bias_weight * (1.0 - TIE) else best


def keep_row(module):
    """The report row of the old codes kept: dQ = 0, E = -dW (every output error exactly the adapter's own)."""
    report = Survival(*module.B.shape, module.inputs)
    W_old = Stored(module.old, module.stored).dequantize()
    report.add_base(W_old)
    dW = module.B @ module.A
    report.add(-dW, dW, module.X, module.A, False)
    row = report.row(module.B, module.A, module.X, module.Y)
    exact = {
        k: 1.0 for k in ("probe_error_random", "probe_error_aligned", "probe_error_calibration") if k in row
    }
    # E = -dW and dQ = 0 exactly (the sums above carry rounding)
    return {**row, **exact, "retention": 0.0, "noise": 0.0}


def finite_stored(module):
    """Whether every stored weight of the module is finite, block by block (never a dense copy of it): its scales
    and zero points, and the values of its codes (an FP8 code can be NaN)."""
    old, stored = module.old, module.stored
    if not bool(torch.isfinite(old.S).all()) or (old.Z is not None and not bool(torch.isfinite(old.Z).all())):
        return False
    return all(
        bool(torch.isfinite(old.codebook.values(stored[:, j0 : j0 + COLUMNS])).all())
        for j0 in range(0, stored.shape[1], COLUMNS)
    )


def part_grid(fmt, ckpt, members, whole, part, idx, strategy):
    """The grid a candidate rounds the sampled rows onto: for rescale / refit a fresh one, the format's own fit on
    the whole module's ranges with the stored range standing in for the rows not sampled (the stored grid where
    refit keeps it); for the others the stored one."""
    if strategy not in ("rescale", "refit"):
        return part.old
    lo, hi = stored_range(whole.old)
    p_lo, p_hi = target_range(part.old, ((j0, j1, T) for j0, j1, T, _ in blocks(part, False)))
    lo[:, idx], hi[:, idx] = p_lo, p_hi
    if strategy == "refit":
        union = refit_range(whole.old, lo, hi)
        if union is None:  # refit keeps the stored grid
            return part.old
        lo, hi = union
    return fmt.fit_rows(ckpt, members, lo, hi, idx)


def stored_range(old):
    """(lo, hi) [groups, out]: the range each (group, row) of the stored grid covers."""
    c_lo, c_hi = old.codebook.span()
    Z = old.Z if old.Z is not None else 0.0
    ends = (c_lo - Z) * old.S, (c_hi - Z) * old.S  # a negative scale (ggml's Q4_0, Q6_K...) swaps them
    return torch.minimum(*ends), torch.maximum(*ends)


def run_strategy(fmt, ckpt, members, module, strategy, generator, grid=None):
    """(new codes, their grid, report row with 'finite') of one strategy on `module`, onto `grid` where given (a
    sample's, from part_grid), else the one the strategy fits: fresh for rescale / original / refit, the stored
    one otherwise."""
    report = Survival(*module.B.shape, module.inputs)
    if strategy == "gptq":
        codes, grid = gptq(module, report)
    else:
        if grid is None and strategy in ("rescale", "original", "refit"):
            lo, hi = target_range(module.old, ((j0, j1, T) for j0, j1, T, _ in blocks(module, False)))
            refitted = strategy == "refit"
            grid = (
                refit(fmt, ckpt, members, module.old, lo, hi) if refitted else fmt.fit(ckpt, members, lo, hi)
            )
        grid = module.old if grid is None else grid
        codes = round_onto(module, grid, strategy, generator, report)
    return codes, grid, {**report.row(module.B, module.A, module.X, module.Y), "finite": report.finite()}


def blocks(module, tally, report=None, by_rows=None):
    """(j0, j1, target T = W + dW, D = T - W_old) for each block of columns of `module`, in the layout `by_rows`
    (default: the codes'); with `tally`, W_old goes into `report`."""
    old, stored, B, A, full = module.old, module.stored, module.B, module.A, module.full
    out, inn = stored.shape
    rows = module.rows
    by_rows = rows if by_rows is None else by_rows
    columns = COLUMNS
    while out * columns > BLOCK_ELEMENTS and columns > 64:
        columns //= 2
    for j0 in range(0, inn, columns):
        j1 = min(inn, j0 + columns)
        S, Z = old.columns(j0, j1, rows)
        c = old.codebook.values(stored[:, j0:j1])
        W_old = (c.sub_(Z) if Z is not None else c).mul_(S)
        if tally:
            report.add_base(W_old)
        W_old = in_layout(W_old, by_rows)  # (a transposing mul into the other layout is 4x slower than this)
        dW = B @ A[:, j0:j1] if by_rows else (A[:, j0:j1].T @ B.T).T
        if full is None:
            yield j0, j1, W_old.add_(dW), dW
        else:
            T = in_layout(full[:, j0:j1].to(torch.float32, copy=True), by_rows).add_(dW)
            yield j0, j1, T, T - W_old


def in_layout(X, row_wise):
    """X [out, b] laid out row-major or column-major (no copy when it already is)."""
    return X.contiguous() if row_wise else X.T.contiguous().T


def round_onto(module, grid, strategy, generator, report):
    """The module's codes rounded onto `grid` block by block (same-grid / rescale / refit: nearest; stochastic;
    feedback: each column's error carried on), written over the stored ones (each block is read before it is
    written); the errors go into `report`."""
    rows, A, codes = module.rows, module.A, module.stored
    # feedback makes its codes column by column: its targets come column-major ([b, out] contiguous, seen as [out, b])
    by_rows = rows and strategy != "feedback"
    book = grid.codebook
    if strategy == "feedback":
        G, R = rounding.feedback_gains(A), torch.zeros(codes.shape[0], A.shape[0])
    for j0, j1, T, D in blocks(module, True, report, by_rows):
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
        report.add(E, D, module.X[j0:j1], A[:, j0:j1], module.full is not None, slice(j0, j1))
    return codes


def gptq(module, report):
    """GPTQ onto the stored grid (a weight W + dW pushes past its block's range is clipped, and its error spread
    over the later columns like any rounding error: refitting scales cost more on coarse grids): the new codes in
    the stored layout, and the grid. One module at a time in fp32, as the dequantized path holds it."""
    old, stored, B, A, full = module.old, module.stored, module.B, module.A, module.full
    inn = stored.shape[1]
    before = stored.contiguous()
    W_old = Stored(old, before).dequantize()
    T = (full.float() if full is not None else W_old) + B @ A
    S, Z = old.columns(0, inn, True)
    values, codes = rounding.gptq_round(T, S, Z, old.codebook, module.inputs.hessian())
    E = (values.sub_(Z) if Z is not None else values).mul_(S).sub_(T)
    report.add_base(W_old)
    report.changed += int(torch.count_nonzero(bits(codes) != bits(before)))
    report.add(E, T - W_old, module.X, A, full is not None)
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
    union = refit_range(old, lo, hi)
    return old if union is None else fmt.fit(ckpt, members, *union)


def refit_range(old, lo, hi):
    """None while the targets' ranges lo, hi stay inside the stored grid's; else the union of the two ranges."""
    old_lo, old_hi = stored_range(old)
    tolerance = 1e-6 * old.S.abs()
    if not bool(((lo < old_lo - tolerance) | (hi > old_hi + tolerance)).any()):
        return None
    return torch.minimum(lo, old_lo), torch.maximum(hi, old_hi)


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

    def __init__(self, out, rank, inputs=None):
        self.qq = self.old2 = self.ee = 0.0
        self.changed = self.count = 0
        # the calibration inputs' factor F (H ~ F^T F + rest I) joins the probes: ||E F^T||^2 + rest ||E||^2
        self.F = inputs.factor.float() if inputs is not None else torch.zeros(0, 0)
        self.rest = inputs.rest if inputs is not None else 0.0
        width = PROBES + rank + self.F.shape[0]
        # [E X | E A^T | E F^T]: one product reads E once. Blocks of column-major E add to its transpose instead:
        # BLAS's faster form of the product for each layout (1.8 ms against 2.3 for a [4096, 256] block)
        self.EP, self.PE, self.DAt = torch.zeros(out, width), torch.zeros(width, out), None

    def add_base(self, W_old):
        self.old2 += float(torch.dot(flat(W_old), flat(W_old)))

    def add(self, E, D, X, A, shifted, cols=slice(None)):
        """One block: E = W_new - target and D = target - W_old in one layout, X its rows of the probes, A its
        columns of the factors, `cols` its columns; `shifted`: the target is not W_old + dW (merging onto the
        original weight)."""
        q = flat(E.add(D))
        self.qq += float(torch.dot(q, q))
        self.ee += float(torch.dot(flat(E), flat(E)))
        P = torch.cat([X, A.T, self.F[:, cols].T], 1) if self.F.numel() else torch.cat([X, A.T], 1)
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
        rank = A.shape[0]
        EX, EAt, EF = EP[:, :PROBES], EP[:, PROBES : PROBES + rank], EP[:, PROBES + rank :]
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
        row = {
            "retention": rho,
            "noise": nu,
            "probe_error_random": err(EX, B @ (A @ X)),
            "probe_error_aligned": err(EAt @ Y, B @ AAtY),
            "codes_changed": self.changed / max(1, self.count),
            "relative_delta": (dd / self.old2) ** 0.5 if self.old2 else 0.0,
        }
        if self.F.numel():  # ||E F^T||^2 + rest ||E||^2 against the same for dW: the layer's own inputs
            dWF = Bd @ (Ad @ self.F.double().T)
            num = float(EF.double().pow(2).sum()) + self.rest * self.ee
            den = float(dWF.pow(2).sum()) + self.rest * dd
            row["probe_error_calibration"] = (num / den) ** 0.5 if den else 0.0
        return row


def flat(t):
    """A contiguous block, or the transpose of one, as a flat view (for sums over all its elements)."""
    return t.T.reshape(-1) if not t.is_contiguous() and t.T.is_contiguous() else t.reshape(-1)
