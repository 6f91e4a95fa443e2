"""Rounding a merged weight onto a quantization grid (pure math, no IO), at memory speed.

A grid gives every element of W [out, in] a scale S and zero point Z; the representable values are S * (c - Z) for c
in a codebook. Each codebook rounds in its own cheapest exact way: FP8 with the native cast (round to nearest even,
saturated first), integer grids with round + clamp, a non-uniform table (NF4) by a bin lookup; code values come from
int32 table gathers.

Strategies on U = T / S + Z (the target in code units):
- nearest (same-grid): the closest code; small deltas round straight back (what PEFT does for bitsandbytes).
- stochastic: one of the two neighbouring codes, unbiased (E[dQ] = dW), seeded.
- feedback (adapter-aware error feedback): columns are rounded in order and each column's rounding error is carried
  into the remaining columns so that the error seen by inputs in the adapter's input subspace (the rows of A) stays
  near zero: (Q - T) A^T ~ 0. GPTQ/OPTQ's column order with the adapter's low-rank Hessian A^T A; the carried error
  is R = sum_k e_k a_k^T [out, r], so each column costs O(out r) and a block of columns starts from one matmul.
"""

import itertools
import threading

import torch

FP8_MAX = 448.0
CHUNK = 1 << 22  # elements per step of a table gather: its int32 index stays a small temporary
# Column loops (feedback) of concurrent workers take turns: two threads issuing many microsecond ops at once hand the GIL
# over at every op and run 3-4x slower than one after the other; meanwhile the other worker does its bulk work.
COLUMN_LOOPS = threading.Lock()


def gather(table, codes):
    """table[codes] for integer codes (one byte each) of any layout, in fp32 and the codes' layout: index_select with
    an int32 index, 2-5x faster than advanced indexing or the fp8 -> fp32 cast; chunked so that the index stays
    small."""
    if codes.dim() == 1 and codes.numel() <= CHUNK:  # one column (NF4's feedback loop): no bookkeeping
        return torch.index_select(table, 0, codes if codes.dtype == torch.int32 else codes.int())
    if codes.dim() == 2 and not codes.is_contiguous() and codes.T.is_contiguous():
        return gather(table, codes.T).T  # the transpose of a contiguous block: gathered as it lies
    flat = codes.reshape(-1)
    out = torch.empty(flat.shape, dtype=table.dtype)
    for i in range(0, flat.numel(), CHUNK):
        torch.index_select(table, 0, flat[i : i + CHUNK].int(), out=out[i : i + CHUNK])
    return out.reshape(codes.shape)


class Codebook:
    """What every codebook offers: values(stored), round (the nearest) and stochastic ((stored codes, their values)),
    to_storage(c) (the stored codes of code values c, which may be overwritten), and column_rounder(n): a function
    (u, out) writing the nearest code values of one column of n (feedback's inner loop: u may be overwritten). The
    subclasses round their own way.

    stochastic draws one of the two codes lo <= U <= hi around U: hi when r < (U - lo) / (hi - lo) for r uniform in
    [0, 1) (torch.rand, seeded), so that the expectation is U (clamped to the codebook); every codebook makes this
    same draw."""


class Uniform(Codebook):
    """Integer codes lo..hi (INT8, GPTQ, AWQ), stored as `storage` integers."""

    def __init__(self, lo, hi, storage):
        self.lo, self.hi, self.storage = lo, hi, storage

    def column_rounder(self, n):
        return lambda u, out: torch.round(u, out=out).clamp_(self.lo, self.hi)

    def round(self, U):
        """(stored codes, their values) of the nearest codes; U is overwritten."""
        c = U.round_().clamp_(self.lo, self.hi)
        return c.to(self.storage), c

    def stochastic(self, U, generator):
        """ceil(U - r): the upper code exactly when r < frac(U) (but for U - r rounding onto an integer), in two
        passes."""
        c = U.sub(torch.rand(U.shape, generator=generator)).ceil_().clamp_(self.lo, self.hi)
        return c.to(self.storage), c

    def to_storage(self, c):
        return c.to(self.storage)

    def values(self, stored):
        return stored.float()

    def span(self):
        """(smallest, largest) code value."""
        return float(self.lo), float(self.hi)

    def count(self):
        """How many codes."""
        return self.hi - self.lo + 1


class FP8(Codebook):
    """The finite float8_e4m3fn values; a code is stored as itself."""

    storage = torch.float8_e4m3fn

    def __init__(self):
        bits = torch.arange(256, dtype=torch.uint8)
        values = bits.view(torch.float8_e4m3fn).float()
        finite = torch.isfinite(values)
        self.table = torch.where(
            finite, values, torch.zeros(())
        )  # bit pattern -> value: a gather beats the cast
        # the same, with the NaN patterns as +-448: a cast that does not saturate (older torch) still rounds right
        self.saturated = torch.where(finite, values, torch.where(bits < 0x80, FP8_MAX, -FP8_MAX))

    def column_rounder(self, n):
        """The cast and the int32 index go to buffers of their own, and the lookup saturates (no clamp): three
        dispatches a column."""
        q, index = torch.empty(n, dtype=torch.float8_e4m3fn), torch.empty(n, dtype=torch.int32)
        bits = q.view(torch.uint8)

        def round_into(u, out):
            q.copy_(u)
            return torch.index_select(self.saturated, 0, index.copy_(bits), out=out)

        return round_into

    def round(self, U):
        """Round to nearest even by the native cast (saturated first); -0 stored as +0 (one zero, one byte)."""
        b = U.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
        q = b.masked_fill_(b == 0x80, 0).view(torch.float8_e4m3fn)
        return q, self.values(q)

    def stochastic(self, U, generator):
        """The draw of Codebook.stochastic (hi when r < (U - lo) / (hi - lo)), branch-free on the fp32 bits (a
        torch.where on random conditions costs 4 ns an element in branch misses). r = k 2^-24 exactly, and in the
        normal range p is U's 20 bits below e4m3's 3 mantissa bits, f 2^-20 (1 - that for negative U, whose hi is the
        smaller magnitude), so the magnitude rounds up exactly when f + (k >> 4) (positive U: f + 2^20 - 1 - (k >> 4))
        carries into the mantissa. The subnormal range (|U| < 2^-6: a fixed step of 2^-9) is a uniform grid."""
        U = U.clamp_(-FP8_MAX, FP8_MAX)
        r = torch.rand(U.shape, generator=generator)
        bits = U.view(torch.int32)
        positive = (
            (bits >> 31).bitwise_not_().bitwise_and_(0xFFFFF)
        )  # 2^20 - 1 for positive U, 0 for negative
        k = r.mul(2.0**24).int().bitwise_right_shift_(4)
        c = k.bitwise_xor_(positive).add_(bits).bitwise_and_(~0xFFFFF).view(torch.float32)
        small = torch.nonzero(U.reshape(-1).abs() < 2.0**-6)[:, 0]  # few: gathered, drawn as a uniform grid
        if len(small):
            x = U.reshape(-1)[small].mul_(512.0).sub_(r.reshape(-1)[small])
            c.reshape(-1)[small] = x.ceil_().div_(512.0).add_(0.0)  # (+ 0.0: -0 is +0)
        return c.to(torch.float8_e4m3fn), c

    def to_storage(self, c):
        """The FP8 codes, with one zero (+0: -0.0 and 0.0 are one code value, so one stored byte); c is overwritten."""
        return c.add_(0.0).to(torch.float8_e4m3fn)

    def values(self, stored):
        return gather(self.table, stored.view(torch.uint8))

    def span(self):
        return -FP8_MAX, FP8_MAX

    def count(self):
        return int(torch.isfinite(self.table).sum())


class Table(Codebook):
    """A non-uniform table of levels (NF4's quant_map); a code is stored as its index in the table.

    The nearest level by lookup, not search: the levels' span is cut into equal bins, each holding at most one
    midpoint between neighbouring levels (and none close to its edges), so the nearest level is the bin's first
    candidate, or the next one past the bin's midpoint: a few passes at memory speed where a binary search
    (bucketize) costs 20 ns an element."""

    def __init__(self, levels, storage=torch.uint8):
        self.levels = levels.float()
        self.sorted, self.order = self.levels.sort()
        self.mid = (self.sorted[1:] + self.sorted[:-1]) / 2
        self.storage = storage
        lo, hi = float(self.sorted[0]), float(self.sorted[-1])
        mid = self.mid.double()

        def fits(bins):
            pos = (mid - lo) * (bins / (hi - lo))  # each midpoint's place in bins
            inside = pos.floor()
            margin = float(torch.minimum(pos - inside, inside + 1 - pos).min())
            return inside.unique().numel() == len(mid) and margin > 1e-3

        # clustered levels need finer bins; none at all (an absurd table) falls back to a search
        bins = (
            1
            if len(mid) == 0 or hi <= lo
            else next(
                (n for n in itertools.chain(range(2048, 4096), range(4096, 1 << 20, 4093)) if fits(n)), None
            )
        )
        self.bins, self.lo, self.hi = bins or 1, lo, hi
        self.search = bins is None
        self.scale = self.bins / (hi - lo) if hi > lo else 0.0
        self.offset = torch.tensor(-lo * self.scale)  # bin of u: offset + scale * u
        # per bin (and one past the last, where u == hi lands): the nearest level's index at its left edge, and the
        # midpoint inside it (inf for none)
        edges = lo + torch.arange(self.bins + 1, dtype=torch.float64) * ((hi - lo) / self.bins)
        self.first = torch.bucketize(edges, mid, right=True).int()
        self.split = torch.full((self.bins + 1,), float("inf"))
        if len(mid) and not self.search:
            self.split[(mid - lo).mul(self.scale).floor().long().clamp(0, self.bins - 1)] = self.mid
        self.stored = self.order.to(torch.int32)  # sorted index -> stored code

    def _index(self, U):
        """The index (in sorted order) of the nearest level; exactly halfway goes to the lower one. (A NaN lands in
        bin 0.)"""
        if self.search:
            return torch.bucketize(U, self.mid).int()
        b = torch.add(self.offset, U.clamp(self.lo, self.hi), alpha=self.scale).int().clamp_(0, self.bins)
        i = gather(self.first, b)
        return i.add_(U > gather(self.split, b))

    def column_rounder(self, n):
        return lambda u, out: torch.index_select(self.sorted, 0, self._index(u), out=out)

    def round(self, U):
        i = self._index(U)
        return gather(self.stored, i).to(self.storage), gather(self.sorted, i)

    def stochastic(self, U, generator):
        """The draw on the levels' indexes, branch-free: lo is the nearest level's index, less one where that level
        lies above U; beyond the ends p is 0 / 0 or negative (lo drawn) or +inf (the last level)."""
        i = self._index(U)
        lo = i.add_(gather(self.sorted, i) > U, alpha=-1).clamp_(min=0)
        below = gather(self.sorted, lo)
        p = (U - below).div_(gather(self.sorted, (lo + 1).clamp_(max=len(self.sorted) - 1)).sub_(below))
        k = lo.add_(torch.rand(U.shape, generator=generator) < p).clamp_(max=len(self.sorted) - 1)
        return gather(self.stored, k).to(self.storage), gather(self.sorted, k)

    def to_storage(self, c):
        return gather(self.stored, self._index(c)).to(self.storage)

    def values(self, stored):
        return gather(self.levels, stored)

    def span(self):
        return self.lo, self.hi

    def count(self):
        return len(self.levels)


def feedback_gains(A, damp=1e-6, block=256):
    """G [in, r] for error feedback: G_j = (M_j + damp I)^-1 a_j with M_j = sum_{k >= j} a_k a_k^T (what the columns
    from j on can still repay), built backwards block by block in fp64 so that memory stays O(block r^2)."""
    a = A.double().T.contiguous()  # [in, r]
    n, r = a.shape
    eye = torch.eye(r, dtype=torch.float64)
    damping = damp * float((a * a).sum()) / max(r, 1) * eye if r else eye
    G = torch.empty(n, r, dtype=torch.float64)
    tail = torch.zeros(r, r, dtype=torch.float64)  # M_{j1}: the columns after this block
    for j1 in range(n, 0, -block):
        j0 = max(0, j1 - block)
        outer = a[j0:j1, :, None] * a[j0:j1, None, :]
        M = outer.flip(0).cumsum(0).flip(0) + tail
        G[j0:j1] = torch.linalg.solve(M + damping, a[j0:j1, :, None])[..., 0]
        tail = M[0]
    return G.float()


def feedback_block(T, S, Z, book, A, G, R, sub=16, groups=None):
    """(code values, errors W_new - T) of one block of columns [out, b] by error feedback, both as [b, out]
    (column-major: the order they are made in); R [out, r], the error carried from the columns
    before (sum_k e_k a_k^T), is updated in place. T: the merged target; S, Z: the grid (Z None for 0); A [r, b] the
    adapters' input factors; G [b, r] their gains; groups [b]: each column's scale group (None: read S). Column j is
    rounded after repaying R G_j: the errors of earlier sub-blocks of `sub` columns arrive with one matmul, those of
    its own sub-block through K = a_k . g_j. Where a sub-block's columns share one scale (per-channel grids, and
    groups or blocks of 16 or more), it runs in code units: a column costs one correction and one rounding."""

    # rows of the transposed blocks are the columns (a copy only for row-major blocks; [out, 1] grids broadcast)
    def by_column(X):
        return X.T.expand(T.shape[1], -1) if X.shape[1] == 1 else X.T.contiguous()

    Tt, St, inv = T.T.contiguous(), by_column(S), by_column(1.0 / S)
    Zt = by_column(Z) if Z is not None else None
    a = A.T.contiguous()  # [b, r]
    b, out = Tt.shape
    codes, E = torch.empty_like(Tt), torch.empty_like(Tt)
    round_into = book.column_rounder(out)
    # a sub-block's loop works in buffers whose views are made once (a view costs a dispatch, like an op)
    V, C, K = torch.empty(sub, out), torch.empty(sub, out), torch.empty(sub, sub)
    V_rows, C_rows = V.unbind(0), C.unbind(0)
    C_before, K_before = [C[:j].T for j in range(sub)], [K[:j, j] for j in range(sub)]
    # each sub-block's scale group when its columns share one (it runs in code units), else None
    g = [0] * b if S.shape[1] == 1 else groups.tolist() if groups is not None else None
    shared = [g[s0] if g is not None and len(set(g[s0 : s0 + sub])) == 1 else None for s0 in range(0, b, sub)]
    # in code units, R is carried as Rc = R / s (s the sub-blocks' shared scale, per row): U = Tc - G Rc^T and
    # Rc += (C - Tc)^T a, with no rescaling a sub-block; R is back in values where the scale changes, and at the end
    Rc, scale, key = torch.empty_like(R), None, None
    in_code_units = [k is not None for k in shared]
    Tc_all = None  # the targets in code units, for the whole block at once
    if any(in_code_units):
        Tc_all = Tt * inv if Zt is None else torch.addcmul(Zt, Tt, inv)
    for s0, group in zip(range(0, b, sub), shared):
        s1 = min(b, s0 + sub)
        n = s1 - s0
        K[:n, :n] = a[s0:s1] @ G[s0:s1].T  # K[k, j]: how much of column k's error column j repays
        if key is not None and group != key:
            torch.mul(Rc, scale[:, None], out=R)
            key = None
        if group is not None:
            if key is None:
                scale, key = St[s0], group
                torch.mul(R, inv[s0][:, None], out=Rc)
            Tc = Tc_all[s0:s1]
            # V_j = T_j - G_j Rc + sum_{k<j} K[k, j] T_k: the targets less what the earlier sub-blocks repay, and the
            # targets' share of this one's corrections, at once; each column then repays only its codes' share,
            # sum_{k<j} K[k, j] C_k (the errors being C - T)
            torch.addmm(Tc, K[:n, :n].triu(1).T, Tc, out=V[:n]).addmm_(G[s0:s1], Rc.T, alpha=-1.0)
            with COLUMN_LOOPS:
                for j in range(n):
                    if j:
                        V_rows[j].addmv_(C_before[j], K_before[j], alpha=-1.0)
                    round_into(V_rows[j], C_rows[j])
            codes[s0:s1] = C[:n]
            Rc.addmm_(torch.sub(C[:n], Tc, out=E[s0:s1]).T, a[s0:s1])  # errors in code units (scaled below)
            continue
        U = torch.addmm(Tt[s0:s1], G[s0:s1], R.T, alpha=-1.0)  # targets less what the earlier columns repay
        for j in range(s0, s1):  # (per-column scales: only GPTQ act-order and odd groups, left unserialized)
            u = U[j - s0]
            if j > s0:
                u.addmv_(E[s0:j].T, K[: j - s0, j - s0], alpha=-1.0)
            u.mul_(inv[j])
            if Zt is not None:
                u.add_(Zt[j])
            c = round_into(u, codes[j])
            e = torch.sub(c, Zt[j], out=E[j]) if Zt is not None else E[j].copy_(c)
            e.mul_(St[j]).sub_(Tt[j])  # its own error, against the target
        R.addmm_(E[s0:s1].T, a[s0:s1])
    if key is not None:
        torch.mul(Rc, scale[:, None], out=R)
    if all(in_code_units):
        E.mul_(St)  # the errors back to values
    else:
        for s0, group in zip(range(0, b, sub), shared):
            if group is not None:
                E[s0 : s0 + sub].mul_(St[s0 : s0 + sub])
    return codes, E


def gptq_round(T, S, Z, book, H, damp=0.01, block=128):
    """(code values, stored codes) [out, in] of targets T on the grid (S, Z [out, in] or [out, 1]) by GPTQ: columns
    rounded in order, each column's error spread over the columns after it by the inverse Hessian of the layer's
    inputs H [in, in] (its upper Cholesky factor U of H^-1, as GPTQ takes it), so that ||(W_new - T) X|| stays small
    for the inputs X that H measured. `damp`: the share of H's mean diagonal added to it (GPTQ's 1%)."""
    out, inn = T.shape
    H = H.double().clone()
    dead = H.diagonal() <= 0  # inputs that never fire: any code will do
    H[dead, dead] = 1.0
    H.diagonal().add_(damp * float(H.diagonal().mean()))
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    Wt = T.T.contiguous()  # [in, out]: a column is a row
    St, Zt = S.T.expand(inn, -1), (Z.T.expand(inn, -1) if Z is not None else None)
    C = torch.empty(inn, out)
    round_into = book.column_rounder(out)
    for i1 in range(0, inn, block):
        i2 = min(inn, i1 + block)
        errors = torch.empty(i2 - i1, out)
        for j in range(i1, i2):
            u = Wt[j] / St[j]
            if Zt is not None:
                u.add_(Zt[j])
            c = round_into(u, C[j])
            q = (c - Zt[j] if Zt is not None else c.clone()).mul_(St[j])
            e = errors[j - i1]
            torch.sub(Wt[j], q, out=e).div_(U[j, j])
            Wt[j + 1 : i2].addr_(U[j, j + 1 : i2], e, alpha=-1.0)
        Wt[i2:].addmm_(U[i1:i2, i2:].T, errors, alpha=-1.0)
    values = C.T.contiguous()
    return values, book.to_storage(values.clone())
