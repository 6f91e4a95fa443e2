"""Rounding a merged weight onto a quantization grid (pure math, no IO).

A grid gives every element of W [out, in] a scale S and zero point Z; the representable values are S * (c - Z) for c
in a sorted codebook C (integers for INT/GPTQ/AWQ, the finite FP8 values for FP8). Strategies:

- nearest (same-grid): the closest value; small deltas round straight back (what PEFT does for bitsandbytes).
- stochastic: one of the two neighbours, unbiased (E[dQ] = dW), seeded.
- feedback (adapter-aware error feedback): columns are rounded in order and each column's rounding error is carried
  into the remaining columns so that the error seen by inputs in the adapter's input subspace (the rows of A) stays
  near zero: (Q - T) A^T ~ 0. Sequential like GPTQ/OPTQ, with the low-rank Hessian A^T A, O(out * in * r).
"""
import torch


def fp8_codebook():
    """All finite float8_e4m3fn values, sorted."""
    values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    return values[torch.isfinite(values)].unique()


def int_codebook(lo, hi):
    return torch.arange(lo, hi + 1, dtype=torch.float32)


def neighbours(U, C):
    """The codebook values just below and above each element of U (clamped to the codebook's range)."""
    i = torch.searchsorted(C, U.contiguous()).clamp(1, len(C) - 1)
    return C[i - 1], C[i]


def nearest(U, C):
    lo, hi = neighbours(U, C)
    return torch.where((U - lo) <= (hi - U), lo, hi)


def stochastic(U, C, generator):
    lo, hi = neighbours(U, C)
    p = ((U - lo) / (hi - lo)).clamp(0, 1)
    return torch.where(torch.rand(U.shape, generator=generator) < p, hi, lo)


def feedback(T, S, Z, C, A, damp=1e-6):
    """Codes for target T [out, in] such that (S (codes - Z) - T) A^T stays near zero. A: [r, in] (all adapters'
    input factors stacked). Returns code values [out, in]."""
    a = A.double().T.contiguous()  # [in, r]: a_j for column j
    r = a.shape[1]
    M = (a[:, :, None] * a[:, None, :]).flip(0).cumsum(0).flip(0)  # M_j = sum_{k >= j} a_k a_k^T
    eye = torch.eye(r, dtype=torch.float64)
    G = torch.linalg.solve(M + damp * M[0].diagonal().mean().clamp(min=1e-30) * eye, a[:, :, None])[..., 0]
    # column-major copies: each step reads one contiguous column
    Tt, St, Zt = T.T.double().contiguous(), S.T.double().contiguous(), Z.T.double().contiguous()
    R = torch.zeros(T.shape[0], r, dtype=torch.float64)  # sum over done columns of e_j a_j^T
    codes = torch.empty(T.shape[1], T.shape[0])
    for j in range(T.shape[1]):
        t, s, z = Tt[j], St[j], Zt[j]
        c = nearest(((t - R @ G[j]) / s + z).float(), C)  # this column also repays the error carried so far
        codes[j] = c
        R.addr_(s * (c.double() - z) - t, a[j])
    return codes.T


def survival(W_old, W_new, dW, target, A, generator, probes=64):
    """What came through: retention rho = <dQ, dW> / ||dW||^2, noise nu = ||dQ - rho dW|| / ||dW||, and the output
    error ||(W_new - target) x|| / ||dW x|| on random probes and on probes in the adapter's input subspace."""
    dQ = (W_new - W_old).double()
    d = dW.double()
    n2 = float((d * d).sum())
    rho = float((dQ * d).sum()) / n2 if n2 else 0.0
    nu = float((dQ - rho * d).norm()) / n2 ** 0.5 if n2 else 0.0
    X = torch.randn(W_old.shape[1], probes, generator=generator, dtype=torch.float64)
    Xa = A.double().T @ torch.randn(A.shape[0], probes, generator=generator, dtype=torch.float64)
    E = (W_new - target).double()

    def err(P):
        base = float((d @ P).norm())
        return float((E @ P).norm()) / base if base else 0.0
    return {"retention": rho, "noise": nu, "probe_error_random": err(X), "probe_error_aligned": err(Xa)}
