"""Linear algebra on low-rank factors. Never forms the dense out x in product when the factors suffice.

The SVD of B @ A (B: m x r, A: r x n) is exact from QR(B) = Qb Rb, QR(A^T) = Qa Ra and the SVD of the r x r core
Rb @ Ra^T: B @ A = (Qb Uc) diag(S) (Qa Vc)^T. Cost O((m + n) r^2) instead of O(m n min(m, n)).
"""

from dataclasses import dataclass

import torch


@dataclass
class LowRankSVD:
    U: torch.Tensor  # [m, k] orthonormal columns
    S: torch.Tensor  # [k] descending
    Vh: torch.Tensor  # [k, n] orthonormal rows

    def truncate(self, k):
        return LowRankSVD(self.U[:, :k], self.S[:k], self.Vh[:k])

    def factors(self):
        """(B, A) with B @ A = U diag(S) Vh; sqrt(S) on each side keeps both factors well scaled."""
        root = self.S.sqrt()
        return self.U * root, root[:, None] * self.Vh


def factor_svd(B, A, dtype=torch.float64):
    """Exact SVD of B @ A from the factors, computed in `dtype` (fp64 by default: the cost is in the small core)."""
    B, A = B.to(dtype), A.to(dtype)
    Qb, Rb = torch.linalg.qr(B)
    Qa, Ra = torch.linalg.qr(A.T)
    Uc, S, Vhc = torch.linalg.svd(Rb @ Ra.T)
    return LowRankSVD(Qb @ Uc, S, Vhc @ Qa.T)


def singular_values(B, A):
    """Singular values of B @ A (the core's: QR factors are orthonormal)."""
    B, A = B.double(), A.double()
    return torch.linalg.svdvals(torch.linalg.qr(B).R @ torch.linalg.qr(A.T).R.T)


def rank_for_energy(S, energy):
    """Smallest k whose leading singular values keep `energy` of sum(S^2) (the squared Frobenius norm)."""
    e = (S.double() ** 2).cumsum(0)
    return _first_reaching(e / e[-1], energy) if len(e) and e[-1] > 0 else 1


def choose_rank(
    S, rank=None, energy=None, sv_ratio=None, sv_fro=None, sv_cumulative=None, max_rank=None, minimal=False
):
    """The kept rank for one module: a fixed rank, an energy share, or sd-scripts' dynamic rules.

    sd-scripts' resize_lora rules, as it applies them: the smallest k with S[k-1] > S[0] / x (sv_ratio), with
    cumsum(S)/sum(S) >= x (sv_cumulative) or sqrt(cumsum(S^2)/sum(S^2)) >= x (sv_fro), plus one (its `index + 1`).
    `minimal` drops that extra rank. The result lies in [1, len(S)]: never more than the number of singular values
    (sd-scripts #325; where sd-scripts would add a zero direction, lorakit does not).
    """
    S = S.double()
    extra = 0 if minimal else 1
    if rank is not None:
        k = rank
    elif energy is not None:
        k = rank_for_energy(S, energy)
    elif sv_fro is not None:
        k = rank_for_energy(S, sv_fro**2) + extra
    elif sv_ratio is not None:
        k = int((S > S[0] / sv_ratio).sum()) + extra
    elif sv_cumulative is not None:
        k = (_first_reaching(S.cumsum(0) / S.sum(), sv_cumulative) if S.sum() > 0 else 1) + extra
    else:
        k = len(S)
    if max_rank is not None:
        k = min(k, max_rank)
    return max(1, min(k, len(S)))


def _first_reaching(curve, x):
    """1 + index of the first entry of a rising curve that reaches x (1e-12 slack for rounding)."""
    return int(torch.searchsorted(curve, torch.tensor(x, dtype=torch.float64) - 1e-12).item()) + 1


def frobenius_norm(B, A):
    """||B @ A||_F from the factors: the norm of the small core."""
    B, A = B.double(), A.double()
    return torch.linalg.matrix_norm(torch.linalg.qr(B).R @ torch.linalg.qr(A.T).R.T).item()


def inner(B1, A1, B2, A2):
    """<B1 A1, B2 A2>_F = trace((B1^T B2)(A2 A1^T)) from the factors."""
    return torch.trace((B1.double().T @ B2.double()) @ (A2.double() @ A1.double().T)).item()


def truncated_svd(M, k, oversample=10, power_iters=4, generator=None):
    """Rank-k truncated SVD of a dense matrix. Randomized (Halko et al.) when k is far below the size, else exact."""
    M = M.double() if M.dtype == torch.float64 else M.float()
    m, n = M.shape
    if 4 * (k + oversample) >= min(m, n):
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        return LowRankSVD(U[:, :k], S[:k], Vh[:k])
    omega = torch.randn(n, k + oversample, dtype=M.dtype, generator=generator)
    Y = M @ omega
    Q = torch.linalg.qr(Y).Q
    for _ in range(power_iters):  # subspace iteration, re-orthonormalized each step for stability
        Q = torch.linalg.qr(M.T @ Q).Q
        Q = torch.linalg.qr(M @ Q).Q
    Ub, S, Vh = torch.linalg.svd(Q.T @ M, full_matrices=False)
    return LowRankSVD((Q @ Ub)[:, :k], S[:k], Vh[:k])


def count_non_finite(t):
    """How many NaN/Inf values `t` holds (0 for integer tensors). One reduction on the stored dtype in the usual
    case: amax(|t|) is NaN or Inf exactly when t holds one (isfinite on bf16 is several times slower)."""
    if not t.is_floating_point() or t.numel() == 0:
        return 0
    if t.dtype == torch.float8_e4m3fn:  # no Inf in this format; NaN is S.1111.111: count by the bytes
        return int(((t.view(torch.uint8) & 0x7F) == 0x7F).sum())
    x = t.float() if t.element_size() == 1 else t  # other 1-byte floats have no reduction kernels
    if float(x.abs().amax()) <= torch.finfo(x.dtype).max:
        return 0
    return int((~torch.isfinite(x)).sum())
