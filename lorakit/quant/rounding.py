"""Rounding a merged weight onto a quantization grid (pure math, no IO), at memory speed.

A grid gives every element of W [out, in] a scale S and zero point Z; the representable values are S * (c - Z) for c
in a codebook. Each codebook rounds in its own cheapest exact way: FP8 with the native cast (round to nearest even,
saturated first), integer grids with round + clamp, and only a non-uniform table (NF4) with a search.

Strategies on U = T / S + Z (the target in code units):
- nearest (same-grid): the closest code; small deltas round straight back (what PEFT does for bitsandbytes).
- stochastic: one of the two neighbouring codes, unbiased (E[dQ] = dW), seeded.
- feedback (adapter-aware error feedback): columns are rounded in order and each column's rounding error is carried
  into the remaining columns so that the error seen by inputs in the adapter's input subspace (the rows of A) stays
  near zero: (Q - T) A^T ~ 0. GPTQ/OPTQ's column order with the adapter's low-rank Hessian A^T A; the carried error
  is R = sum_k e_k a_k^T [out, r], so each column costs O(out r) and a block of columns starts from one matmul.
"""
import torch

FP8_MAX = 448.0
GATHER_MAX = 1 << 23  # elements up to which FP8 values come from a table gather (2x the cast), e.g. column blocks


class Uniform:
    """Integer codes lo..hi (INT8, GPTQ, AWQ), stored as `storage` integers."""

    def __init__(self, lo, hi, storage):
        self.lo, self.hi, self.storage = lo, hi, storage

    def nearest(self, U):
        return U.round().clamp_(self.lo, self.hi)

    def nearest_into(self, u, out):
        """The nearest code values of u, written to `out` (u may be overwritten)."""
        return torch.round(u, out=out).clamp_(self.lo, self.hi)

    def round(self, U):
        """(stored codes, their values) of the nearest codes; U is overwritten."""
        c = U.round_().clamp_(self.lo, self.hi)
        return c.to(self.storage), c

    def neighbours(self, U):
        lo = U.floor().clamp_(self.lo, self.hi)
        return lo, (lo + 1).clamp_(max=self.hi)

    def to_storage(self, c):
        return c.to(self.storage)

    def values(self, stored):
        return stored.float()


class FP8:
    """The finite float8_e4m3fn values; a code is stored as itself."""
    storage = torch.float8_e4m3fn

    def __init__(self):
        bits = torch.arange(256, dtype=torch.uint8)
        values = bits.view(torch.float8_e4m3fn).float()
        finite = torch.isfinite(values)
        self.table = torch.where(finite, values, torch.zeros(()))  # bit pattern -> value: a gather beats the cast
        self.sorted = values[finite].unique()  # 253 values (the two zeros are one)
        # rank of each bit pattern in the sorted list, to step to a neighbouring code
        self.rank = torch.searchsorted(self.sorted, self.table).to(torch.int64)

    def nearest(self, U):
        return U.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()

    def nearest_into(self, u, out):
        q = u.clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return torch.index_select(self.table, 0, q.view(torch.uint8).long(), out=out)

    def round(self, U):
        q = U.clamp_(-FP8_MAX, FP8_MAX).add_(0.0).to(torch.float8_e4m3fn)  # + 0.0: one zero, +0
        return q, self.values(q)

    def neighbours(self, U):
        c = U.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        i = self.rank[c.view(torch.uint8).long()]
        v = c.float()
        below = torch.where(v > U, self.sorted[(i - 1).clamp_(min=0)], v)
        above = torch.where(v < U, self.sorted[(i + 1).clamp_(max=len(self.sorted) - 1)], v)
        return below, above

    def to_storage(self, c):
        """The FP8 codes, with one zero (+0: -0.0 and 0.0 are one code value, so one stored byte)."""
        return (c + 0.0).to(torch.float8_e4m3fn)

    def values(self, stored):
        if stored.numel() > GATHER_MAX:  # a whole tensor: the cast, without an int64 index per element
            return stored.float()
        return torch.take(self.table, stored.view(torch.uint8).long())


class Table:
    """A non-uniform table of levels (NF4's quant_map); a code is stored as its index in the table."""

    def __init__(self, levels, storage=torch.uint8):
        self.levels = levels.float()
        self.sorted, self.order = self.levels.sort()
        self.mid = (self.sorted[1:] + self.sorted[:-1]) / 2
        self.storage = storage

    def nearest(self, U):
        return self.sorted[torch.bucketize(U, self.mid)]

    def nearest_into(self, u, out):
        return out.copy_(self.nearest(u))

    def round(self, U):
        i = torch.bucketize(U, self.mid)
        return self.order[i].to(self.storage), self.sorted[i]

    def neighbours(self, U):
        i = torch.searchsorted(self.sorted, U.contiguous()).clamp_(1, len(self.sorted) - 1)
        return self.sorted[i - 1], self.sorted[i]

    def to_storage(self, c):
        return self.order[torch.searchsorted(self.sorted, c.contiguous())].to(self.storage)

    def values(self, stored):
        return self.levels[stored.long()]


def stochastic(book, U, generator):
    """One of the two neighbouring codes, with the probability that makes the expectation U (clamped to the book)."""
    lo, hi = book.neighbours(U)
    width = hi - lo
    p = torch.where(width > 0, (U - lo) / torch.where(width > 0, width, torch.ones(())), torch.zeros(()))
    return torch.where(torch.rand(U.shape, generator=generator) < p.clamp_(0, 1), hi, lo)


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
    """Code values of one block of columns [out, b] by error feedback; R [out, r], the error carried from the columns
    before (sum_k e_k a_k^T), is updated in place. T: the merged target; S, Z: the grid (Z None for 0); A [r, b] the
    adapters' input factors; G [b, r] their gains; groups [b]: each column's scale group (None: read S). Column j is
    rounded after repaying R G_j: the errors of earlier sub-blocks of `sub` columns arrive with one matmul, those of
    its own sub-block through K = a_k . g_j. Where a sub-block's columns share one scale (per-channel grids, and
    groups or blocks of 16 or more), it runs in code units: the errors stay in them, so a column costs one
    correction, one rounding and one subtraction."""
    # rows of the transposed blocks are the columns; S and Z come as [out, b] transposes or [out, 1] broadcasts, whose
    # transposed rows are contiguous without a copy
    Tt, St, inv = T.T.contiguous(), S.expand_as(T).T, (1.0 / S).expand_as(T).T
    Zt = Z.expand_as(T).T if Z is not None else None
    a = A.T.contiguous()  # [b, r]
    codes, E = torch.empty_like(Tt), torch.empty_like(Tt)
    for s0 in range(0, Tt.shape[0], sub):
        s1 = min(Tt.shape[0], s0 + sub)
        U = torch.addmm(Tt[s0:s1], G[s0:s1], R.T, alpha=-1.0)  # targets less what the earlier columns repay
        K = a[s0:s1] @ G[s0:s1].T  # K[k, j]: how much of column k's error column j repays
        if S.shape[1] == 1 or (groups is not None and bool((groups[s0:s1] == groups[s0]).all())):
            Uc, Tc = U.mul_(inv[s0]), Tt[s0:s1] * inv[s0]  # in code units of the one scale
            if Zt is not None:
                Uc.add_(Zt[s0])
                Tc.add_(Zt[s0])
            Ec = E[s0:s1]
            for j in range(s1 - s0):
                u = Uc[j]
                if j:
                    u.addmv_(Ec[:j].T, K[:j, j], alpha=-1.0)
                torch.sub(book.nearest_into(u, codes[s0 + j]), Tc[j], out=Ec[j])
            Ec.mul_(St[s0])  # back to values for R
            R.addmm_(Ec.T, a[s0:s1])
            continue
        for j in range(s0, s1):
            u = U[j - s0]
            if j > s0:
                u.addmv_(E[s0:j].T, K[: j - s0, j - s0], alpha=-1.0)
            u.mul_(inv[j])
            if Zt is not None:
                u.add_(Zt[j])
            c = book.nearest_into(u, codes[j])
            e = torch.sub(c, Zt[j], out=E[j]) if Zt is not None else E[j].copy_(c)
            e.mul_(St[j]).sub_(Tt[j])  # its own error, against the target
        R.addmm_(E[s0:s1].T, a[s0:s1])
    return codes.T
