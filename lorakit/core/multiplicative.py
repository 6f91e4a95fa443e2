"""Multiplicative adapters (PEFT IA3, HRA, OFT): W' = f(W), not an additive low-rank delta. Pure math, in fp64.

IA3:  W' = W * l, l broadcast along the output rows ([out, 1]) or the input columns ([1, in], feed-forward modules).
HRA:  W' = W H, H = prod_i (I - 2 u_i u_i^T / ||u_i||^2) in column order, or with Gram-Schmidt (apply_GS)
      H = I - 2 Q Q^T for the orthonormalized columns Q. dW = W H - W has rank <= r, exactly: each reflection adds
      -2 (X_i u_i) u_i^T to the running product X_i.
OFT:  W' = W R^T, R block-diagonal; each block the Cayley transform of a skew matrix Q (upper triangle stored):
      exact (I - Q)(I + Q)^-1, or PEFT's Neumann series I + 2Q + 2Q^2 + ... + 2Q^(n-2) + Q^(n-1) with n terms.
BOFT: W' = (W M^T) * s, M = G_k ... G_1 G_0 with G_i = P_i D_i P_i^T: D_i block-diagonal exact Cayley rotations of
      0.5 (R - R^T), P_i PEFT's block butterfly permutations of the input width, s [out, 1].
"""

from dataclasses import dataclass, field

import torch


@dataclass
class Transform:
    name: str  # the module: the base weight's name without `.weight`
    kind: str  # "ia3", "hra" or "oft"
    tensors: dict  # the stored parameters
    options: dict = field(default_factory=dict)

    def apply(self, W):
        """W' in fp32 for the base weight W."""
        return APPLY[self.kind](W.double(), self.tensors, self.options).float()

    def low_rank(self, W):
        """(B, A) in fp64 with B @ A = W' - W exactly where the change is low-rank (HRA), else None."""
        if self.kind != "hra":
            return None
        U = _hra_vectors(self.tensors["hra_u"].double(), self.options)
        X, columns = W.double().flatten(1), []
        for i in range(U.shape[1]):
            u = U[:, i : i + 1]
            step = -2 * (X @ u)
            columns.append(step)
            X = X + step @ u.T
        return torch.cat(columns, dim=1), U.T.contiguous()

    @property
    def num_params(self):
        return sum(t.numel() for t in self.tensors.values())


def ia3(W, tensors, options):
    return W * tensors["ia3_l"].double()


def _hra_vectors(U, options):
    """The unit reflection vectors as columns: normalized, or orthonormalized in order (apply_GS)."""
    if not options.get("apply_GS"):
        return U / U.norm(dim=0)
    Q, _ = torch.linalg.qr(U)
    signs = torch.sign(torch.diagonal(Q.T @ U))  # QR's columns up to sign: Gram-Schmidt keeps <q_i, u_i> > 0
    return Q * signs


def hra(W, tensors, options):
    U = _hra_vectors(tensors["hra_u"].double(), options)
    X = W.flatten(1)
    if options.get("apply_GS"):  # H = I - 2 Q Q^T
        return (X - 2 * (X @ U) @ U.T).reshape(W.shape)
    for i in range(U.shape[1]):
        u = U[:, i : i + 1]
        X = X - 2 * (X @ u) @ u.T
    return X.reshape(W.shape)


def oft_rotation(vectors, block, options):
    """[blocks, block, block]: the rotation of each block from its skew matrix's upper triangle."""
    rows, cols = torch.triu_indices(block, block, 1)
    Q = vectors.new_zeros(vectors.shape[0], block, block)
    Q[:, rows, cols] = vectors
    Q = Q - Q.transpose(-2, -1)
    eye = torch.eye(block, dtype=Q.dtype).expand_as(Q)
    if not options.get("use_cayley_neumann", True):
        return torch.linalg.solve(eye + Q, eye - Q, left=False)
    n = options.get("num_cayley_neumann_terms", 5)
    R = eye.clone()
    if n > 1:
        R = R + 2 * Q
    if n > 2:
        power = Q @ Q
        R = R + 2 * power
        for _ in range(3, n - 1):
            power = power @ Q
            R = R + 2 * power
        R = R + power @ Q
    return R


def oft(W, tensors, options):
    """W' = W R^T with R = block_diag of the rotations (one shared block when the stored ones are a single row)."""
    vectors = tensors["oft_R"].double()
    block = options["block_size"]
    R = oft_rotation(vectors, block, options)
    X = W.flatten(1)
    blocks = X.shape[1] // block
    R = R.expand(blocks, block, block) if R.shape[0] == 1 else R
    out = torch.einsum("obj,bij->obi", X.reshape(X.shape[0], blocks, block), R)  # (W R^T) block by block
    return out.reshape(W.shape)


def _butterfly_permutation(n, b, r, factors):
    """PEFT's block_butterfly_perm: within each of the b blocks of n / b indices, the sub-blocks of r in the order
    evens then odds (identity without butterfly factors)."""
    if factors == 0:
        return torch.arange(n)
    size, indices = n // b, torch.arange(n)
    step = size / r
    sequence = torch.cat((torch.arange(0, step, 2), torch.arange(1, step, 2)))
    order = torch.empty(size, dtype=torch.long)
    for i, pos in enumerate(sequence):
        order[int(i * r) : int(i * r + r)] = torch.arange(size)[int(pos * r) : int(pos * r + r)]
    for i in range(0, n, size):
        indices[i : i + size] = indices[i : i + size][order]
    return indices


def boft(W, tensors, options):
    R, s = tensors["boft_R"].double(), tensors["boft_s"].double()
    levels, blocks, size = R.shape[:3]
    n = W[0].numel()  # the input width, a conv's kernel included
    skew = 0.5 * (R - R.transpose(-2, -1)).reshape(-1, size, size)
    eye = torch.eye(size, dtype=R.dtype).expand_as(skew)
    rot = torch.linalg.solve(eye + skew, eye - skew, left=False).reshape(levels, blocks, size, size)
    M = torch.eye(n, dtype=R.dtype)
    for i in range(levels):
        P = torch.zeros(n, n, dtype=R.dtype)
        P[torch.arange(n), _butterfly_permutation(n, blocks // 2**i, size // 2, levels - 1)] = 1
        M = P @ torch.block_diag(*rot[i]) @ P.T @ M
    return (W.flatten(1) @ M.T * s).reshape(W.shape)


APPLY = {"ia3": ia3, "hra": hra, "oft": oft, "boft": boft}
