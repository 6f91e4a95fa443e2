"""The interface every quantized base format implements, and the grid it describes.

A format finds its modules in a checkpoint, gives each module's full-precision shape, describes its grid (scale S,
zero point Z, codebook: W = S * (c - Z)) and its stored codes, fits a fresh grid, and encodes codes back into tensors
of exactly the stored names, shapes and dtypes. Dequantizing follows from the grid and the codes. `ckpt` is a Checkpoint (or anything
with `where`, `entry`, `get` and `__contains__`); `m` is one module's {role: tensor name}.
"""

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..errors import LorakitError


@dataclass
class Grid:
    """Scale S and zero point Z of every element, compactly: element (i, j) uses S[g[j], i] and Z[g[j], i] (a group of
    input columns shares a scale per output row: per-channel formats have one group, GPTQ one per g_idx value)."""

    S: torch.Tensor  # [groups, out] fp32
    g: torch.Tensor  # [in] int64: the group of each input column
    codebook: object  # lorakit.quant.rounding.Uniform / FP8 / Table
    Z: torch.Tensor = None  # [groups, out] fp32 zero points in code units, None for 0
    params: dict = None  # the stored tensors (their names' roles, shapes and dtypes) that define S and Z
    _by_row: tuple = field(default=None, repr=False, compare=False)

    def columns(self, j0, j1, row_major=True):
        """(S, Z) of columns j0:j1 as [out, j1 - j0] in the layout of the codes they go with: row-major, or (not
        row_major) the transpose of a contiguous [j1 - j0, out], as GPTQ/AWQ store codes; [out, 1] where one group
        spans them all (they broadcast); Z None for 0. Elementwise work between tensors of one layout runs at memory
        speed, across layouts at a fraction of it."""
        if self.S.shape[0] == 1:
            return self.S[0][:, None], (self.Z[0][:, None] if self.Z is not None else None)
        g = self.g[j0:j1]
        if not row_major:
            return self.S[g].T, (self.Z[g].T if self.Z is not None else None)
        if (
            self._by_row is None
        ):  # [out, groups]: a gather along dim 1 gives row-major blocks without a transpose
            self._by_row = (self.S.T.contiguous(), self.Z.T.contiguous() if self.Z is not None else None)
        S, Z = self._by_row
        return S.index_select(1, g), (Z.index_select(1, g) if Z is not None else None)

    def rows(self, idx):
        """The grid of the rows `idx` only (what requantizing a sample of a module's rows rounds onto)."""
        Z = self.Z[:, idx].contiguous() if self.Z is not None else None
        return Grid(self.S[:, idx].contiguous(), self.g, self.codebook, Z)


class QuantFormat:
    """Base class of the registered formats (lorakit.quant.FORMATS)."""

    name = None

    @classmethod
    def configure(cls, qconfig):
        """An instance for this checkpoint's quantization config ({} when it has none), or None when the config
        says another format. Raises LorakitError for variants of this format that are not supported."""
        raise NotImplementedError

    def find(self, ckpt):
        """{module name: {role: tensor name}} of the modules stored in this format."""
        raise NotImplementedError

    def members(self, ckpt, m):
        """Every stored tensor that makes up module `m` (hidden behind its `.weight` in a WeightView)."""
        return list(m.values())

    @contextmanager
    def held(self, ckpt, m):
        """While module `m` is requantized (its codes, grid and fits read one after another): a format that reads
        the same stored bytes for each may keep them until the module is done (GGUF)."""
        yield

    transposed_experts = False  # whether a 3-D expert tensor's full-precision slices are its rows transposed

    def weight_name(self, module):
        """The full-precision tensor a module stands for."""
        return f"{module}.weight"

    def shape(self, ckpt, m):
        """The module's shape as its codes lie: [out, in] (rows, columns of the grid)."""
        return tuple(ckpt.entry(m["weight"]).shape)

    def full_shape(self, ckpt, m):
        """The full-precision tensor's shape (what names and fingerprints see; the dequantized output's)."""
        return self.shape(ckpt, m)

    def experts_shape(self, ckpt, m):
        """[E, rows, cols] of a module holding Mixture-of-Experts weights (its shape is E x rows rows), else None."""
        return None

    def to_full(self, ckpt, m, W):
        """The dequantized module [out, in] as the full-precision tensor."""
        return W

    def grid(self, ckpt, m):
        """The stored grid (Grid)."""
        raise NotImplementedError

    def codes(self, ckpt, m):
        """The stored codes [out, in] in the codebook's storage dtype (unpacked, one byte per element): row-major,
        or the transpose of a contiguous [in, out] where the format stores W^T (see row_major). A tensor of the
        caller's own (freshly read or unpacked): requantizing writes the new codes over it."""
        raise NotImplementedError

    def fit(self, ckpt, m, lo, hi):
        """A fresh Grid for targets whose minimum and maximum per (column group, row) are lo, hi [groups, out]
        (the groups of the stored grid)."""
        raise NotImplementedError

    def fit_rows(self, ckpt, m, lo, hi, idx):
        """fit's grid on the rows `idx` only (auto's sample of a module), from lo, hi of every row. A format whose
        rows are fitted apart (GGUF's blocks) fits those rows alone."""
        return self.fit(ckpt, m, lo, hi).rows(idx)

    def encode(self, ckpt, m, codes, grid):
        """{stored tensor name: tensor} for codes [out, in] (storage dtype) on `grid`: the stored names, shapes and
        dtypes exactly."""
        raise NotImplementedError

    def stored(self, ckpt, m):
        """The module as its codes and the arithmetic that dequantizes them (Stored): what training on a quantized
        base keeps in memory instead of W."""
        return Stored(self.grid(ckpt, m), self.codes(ckpt, m))

    def dequantize(self, ckpt, m):
        """W [out, in] in fp32: S * (c - Z) - M."""
        return self.stored(ckpt, m).dequantize()


@dataclass
class Factored:
    """A per-group tensor as the format builds it: float(outer) * float(inner) in fp32, outer [out, blocks] (a
    block's fp16 scale), inner [out, blocks * per] small integers (its sub-blocks' scales): GGUF's K types."""

    outer: torch.Tensor
    inner: torch.Tensor
    per: int

    def value(self):
        return self.outer.float().repeat_interleave(self.per, 1) * self.inner.float()


@dataclass
class Stored:
    """A module as stored: W = (values(codes) - Z) * S - M, with the grid's S and Z and an offset M [groups, out] in
    value units (None for 0: GGUF's affine types subtract dmin * m after the scale), in the order of operations the
    format's own dequantization uses, so that every reader of the codes gets the same bits."""

    grid: Grid
    codes: torch.Tensor
    M: torch.Tensor = None
    factors: dict = None  # {"S" / "M": Factored}: how the format builds them, for holding them compactly

    def rows(self, index):
        """The same module with its rows taken in `index`'s order (a row's codes, scales and zeros move with it)."""

        def take(T):
            return None if T is None else T.index_select(1, index)

        grid = Grid(take(self.grid.S), self.grid.g, self.grid.codebook, Z=take(self.grid.Z))
        factors = {
            k: Factored(f.outer.index_select(0, index), f.inner.index_select(0, index), f.per)
            for k, f in (self.factors or {}).items()
        }
        return Stored(grid, self.codes.index_select(0, index), take(self.M), factors or None)

    def dequantize(self):
        by_row = row_major(self.codes)
        S, Z = self.grid.columns(0, len(self.grid.g), by_row)
        W = self.grid.codebook.values(self.codes)
        W = (W.sub_(Z) if Z is not None else W).mul_(S)
        if self.M is not None:
            g = self.grid.g
            W.sub_(self.M.T.index_select(1, g) if by_row else self.M[g].T)
        return W.contiguous()


def row_major(codes):
    """Whether codes [out, in] are laid out row by row (else they are the transpose of a contiguous [in, out])."""
    return codes.stride(1) == 1 or codes.shape[1] == 1


FLOAT_SCALES = ("F32", "BF16", "F16")  # how checkpoints store floating scales


def check_scale(ckpt, m, role, out):
    """A per-tensor or per-output-channel scale: one floating value, or one per row."""
    check_dtype(ckpt, m, role, FLOAT_SCALES)
    if ckpt.entry(m[role]).numel not in (1, out):
        raise LorakitError(
            f"scale has shape {list(ckpt.entry(m[role]).shape)}: expected one value or {out} (one per "
            "output row)",
            path=ckpt.path,
            tensor=m[role],
        )


def per_row(s, out):
    """A per-tensor or per-output-channel scale as one group [1, out] in fp32."""
    return (
        s.float().reshape(1, -1).expand(1, out).contiguous() if s.numel() == 1 else s.float().reshape(1, out)
    )


def one_group(inn):
    return torch.zeros(inn, dtype=torch.int64)


def round_to(t, like):
    """t in the dtype and shape of the stored tensor `like`."""
    return t.to(like.dtype).reshape(like.shape)


def round_up_to(t, like):
    """t (positive scales) in the dtype and shape of the stored tensor `like`, rounded up where the nearest value
    is below t: a fitted scale never shrinks the range it was fitted to (nothing clipped). Below by more than fp32's
    own rounding only: a scale refitted to the range its stored value gives (S x 6 / 6) comes back as it was."""
    r = t.to(like.dtype)
    low = r.float() < t * (1 - 2.0**-20)
    if bool(low.any()):
        if like.dtype == torch.float8_e4m3fn:  # positive e4m3: the next value is the next bit pattern
            up = (r.view(torch.uint8) + 1).clamp(max=0x7E).view(torch.float8_e4m3fn)
        else:
            up = torch.nextafter(r, torch.full_like(r, float("inf")))
        r = torch.where(low, up, r)
    return r.reshape(like.shape)


def malformed(ckpt, tensor, message):
    """The error for a stored tensor that is not what its format says: it names the file that holds it."""
    return LorakitError(message, path=ckpt.where.get(tensor, ckpt.path), tensor=tensor)


def check_shape(ckpt, m, role, expected, what):
    """A stored tensor of exactly `expected` shape, else one line naming it and what it should be."""
    shape = tuple(ckpt.entry(m[role]).shape)
    if shape != tuple(expected):
        raise malformed(ckpt, m[role], f"{role} has shape {list(shape)}: expected {list(expected)} ({what})")


def check_dtype(ckpt, m, role, dtypes):
    dtype = ckpt.entry(m[role]).dtype
    if dtype not in dtypes:
        raise malformed(ckpt, m[role], f"{role} is {dtype}: expected {' or '.join(dtypes)}")


def check_dtypes(ckpt, m, expected):
    """check_dtype for each {role: dtypes} the module has (optional members left out are not checked)."""
    for role, dtypes in expected.items():
        if role in m:
            check_dtype(ckpt, m, role, dtypes)
