"""LyCORIS deltas as exact LoRA factors (pure math, no IO).

LoHa:  dW = (w1a @ w1b) * (w2a @ w2b)      (elementwise)  = B @ A with B = face-splitting product of w1a, w2a
                                                           (row-wise Kronecker) and A = Khatri-Rao of w1b, w2b:
       rank r1 * r2, exact.
LoKr:  dW = kron(w1, w2); with w = U @ V for each factor, kron(U1 V1, U2 V2) = kron(U1, U2) @ kron(V1, V2): rank
       r1 * r2, exact. A full factor F [a, c] is written F @ I_c or I_a @ F, whichever is smaller.
Tucker (LoRA lora_mid): dW[o, i, k...] = sum_ab up[o, a] mid[a, b, k...] down[b, i]  = up @ (mid x down): rank r.
`resize` shrinks any of these optimally afterwards.
"""

import torch


def loha_factors(w1a, w1b, w2a, w2b):
    """(B, A) with B @ A = (w1a @ w1b) * (w2a @ w2b), computed in fp64."""
    w1a, w1b, w2a, w2b = (t.double().flatten(1) for t in (w1a, w1b, w2a, w2b))
    B = (w1a[:, :, None] * w2a[:, None, :]).reshape(w1a.shape[0], -1)  # [out, r1 * r2]
    A = (w1b[:, None, :] * w2b[None, :, :]).reshape(-1, w1b.shape[1])  # [r1 * r2, in]
    return B, A


def _split(F):
    """(U, V) with U @ V = F for a full matrix, using the smaller identity."""
    a, c = F.shape
    eye = torch.eye(min(a, c), dtype=F.dtype)
    return (F, eye) if c <= a else (eye, F)


def lokr_factors(w1, w2):
    """(B, A) with B @ A = kron(w1, w2) flattened to 2-D ([a*b, c*d*k...]). Each w is a matrix or a (U, V) pair."""
    U1, V1 = (t.double() for t in w1) if isinstance(w1, tuple) else _split(w1.double())
    if isinstance(w2, tuple):
        U2, V2 = (t.double() for t in w2)
    else:
        w2 = w2.double()
        U2, V2 = (
            _split(w2.flatten(1)) if w2.ndim == 2 else (torch.eye(w2.shape[0], dtype=w2.dtype), w2.flatten(1))
        )
    c = lambda t: t.flatten(1).contiguous()  # noqa: E731  (torch.kron views its inputs)
    return torch.kron(c(U1), c(U2)), torch.kron(c(V1), c(V2))


def tucker_factors(up, mid, down):
    """(B, A) for the LoRA Tucker form: A[a, i, k...] = sum_b mid[a, b, k...] down[b, i]."""
    up2, down2 = up.double().flatten(1), down.double().flatten(1)
    A = torch.einsum("ab...,bi->ai...", mid.double(), down2)
    return up2, A
