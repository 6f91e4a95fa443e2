"""The in-memory model of a LoRA adapter. Pure: tensors and numbers in, tensors out, no file IO.

One rule for every module (spec section "The delta"): with r = A.shape[0] and scale = alpha / r,
    dW = scale * (B.flatten(1) @ A.flatten(1)), reshaped to the base weight's shape [B.shape[0], *A.shape[1:]].
Factors are stored in the base weight's own layout, so embeddings and GPT-2 Conv1D need no transposes here.
Torch is imported where tensors are computed, not at import: header-only work (inspect, validate) never loads it.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from ..errors import LorakitError

if TYPE_CHECKING:
    import torch

# linear_t: a base weight stored [in, out] (GPT-2 Conv1D); conv: factors of ndim > 2
KINDS = ("linear", "conv", "embedding", "linear_t")


def default_kind(ndim):
    """The kind a module has when nothing says otherwise: conv for factors (or weights) of ndim > 2."""
    return "conv" if ndim > 2 else "linear"


def require_floating(part, t, tensor, path=None):
    """Refuse an integer or bool LoRA tensor (`part`: what it is, e.g. lora_A): a cast would read it, not
    dequantize it (an int8 factor of values under 1 reads as zeros)."""
    if t is not None and not t.is_floating_point():
        raise LorakitError(
            f"{part} is {str(t.dtype).removeprefix('torch.')}: LoRA factors are floating-point values",
            path=path,
            tensor=tensor,
            code="LK103",
        )


def fp32(x):
    """x rounded to an fp32 value, as a Python float: how the spec stores alpha."""
    x = float(x)
    try:
        return struct.unpack("<f", struct.pack("<f", x))[0]  # IEEE round to nearest, as a cast to float32
    except OverflowError:  # beyond fp32's range: what the cast gives
        return math.copysign(math.inf, x)


@dataclass
class Module:
    name: str  # the base weight's tensor name without ".weight"
    A: torch.Tensor  # [r, in, *kernel]
    B: torch.Tensor  # [out, r, 1, ...]
    alpha: float  # an fp32 value; scale = alpha / rank
    kind: str = None  # default: "conv" for factors of ndim > 2, else "linear"
    bias: torch.Tensor = None  # delta added to the base bias [out]
    magnitude: torch.Tensor = None  # DoRA magnitude, 1-D, indexed along `dora_axis` of the weight
    dora_axis: int = None
    # the base weight is zero-padded to this module's shape before dW is added: control LoRAs that widen a layer's
    # input (BFL's Flux Canny / Depth LoRAs: img_in from 64 to 128 channels; ComfyUI's `reshape_weight`)
    pads_base: bool = False

    def __post_init__(self):
        try:
            self.alpha = fp32(self.alpha)
        except (TypeError, ValueError, RuntimeError, OverflowError):
            raise LorakitError(f"alpha {self.alpha!r} is not a number", tensor=self.name) from None
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise LorakitError(
                f"alpha is {self.alpha}: the spec needs a finite alpha > 0", tensor=self.name, code="LK206"
            )
        parts = {"lora_A": self.A, "lora_B": self.B, "bias": self.bias, "magnitude": self.magnitude}
        for part, t in parts.items():
            require_floating(part, t, self.name)
        if self.A.ndim >= 2 and self.B.ndim >= 2 and 0 in (self.B.shape[0], *self.A.shape[1:]):
            raise LorakitError(
                f"lora_A {list(self.A.shape)} / lora_B {list(self.B.shape)}: the weight they change would be empty",
                tensor=self.name,
                code="LK203",
            )
        if self.kind is None:
            self.kind = default_kind(self.A.ndim)
        if self.kind not in KINDS or (self.kind == "conv") != (self.A.ndim > 2):
            raise LorakitError(
                f"module kind '{self.kind}' does not fit factors of ndim {self.A.ndim} (kinds: "
                f"{', '.join(KINDS)})",
                tensor=self.name,
            )

    @property
    def rank(self):
        return self.A.shape[0]

    @property
    def scale(self):
        """alpha / rank, in fp64 from the fp32 alpha: the single scaling rule of the spec."""
        return self.alpha / self.rank

    @property
    def shape(self):
        """Shape of the base weight this module changes."""
        return (self.B.shape[0], *self.A.shape[1:])

    def factors(self, dtype=None):
        """(B2, A2) as matrices with dW.flatten(1) = B2 @ A2; the scale is folded into B2 (fp32 by default)."""
        import torch

        dtype = dtype or torch.float32
        return self.B.flatten(1).to(dtype) * self.scale, self.A.flatten(1).to(dtype)

    def delta(self, dtype=None):
        """dW in `dtype` (fp32 by default), shaped like the base weight."""
        B2, A2 = self.factors(dtype)
        return (B2 @ A2).reshape(self.shape)

    def apply(self, W, sign=1.0, weight=1.0):
        """W' for this module alone in fp32 (DoRA included): W + w*dW, or m * (W + dW) / ||W + dW||."""
        Wf = W.float() + (sign * weight) * self.delta()
        if self.magnitude is not None:
            dims = [d for d in range(Wf.ndim) if d != self.dora_axis]
            norm = Wf.norm(dim=dims, keepdim=True)
            shape = [1] * Wf.ndim
            shape[self.dora_axis] = -1
            Wf = Wf * (self.magnitude.float().reshape(shape) / norm)
        return Wf

    def transposed(self):
        """This linear module on the transposed weight: dW^T = A^T B^T (exact: the factors swap)."""
        if self.kind not in ("linear", "linear_t") or self.bias is not None or self.magnitude is not None:
            raise LorakitError(f"a {self.kind} module cannot be transposed", tensor=self.name)
        return replace(self, A=self.B.T.contiguous(), B=self.A.T.contiguous())

    def rows(self, start, stop, swap=False, name=None):
        """This module on output rows start:stop (B's and the bias's rows: exact), as module `name`; with `swap` the
        two halves of those rows in the other order (diffusers' AdaLayerNormContinuous [scale, shift] is the original
        [shift, scale])."""
        import torch

        B, bias = self.B[start:stop], None if self.bias is None else self.bias[start:stop]
        if swap:
            half = B.shape[0] // 2
            B = torch.cat([B[half:], B[:half]])
            bias = None if bias is None else torch.cat([bias[half:], bias[:half]])
        return replace(self, name=name or self.name, B=B.contiguous(), bias=bias)

    def widens(self, shape):
        """Whether zero-padding a base weight of `shape` at the end of its axes gives this module's shape (spec 4.4):
        as many axes, none smaller. Says nothing of whether the module is marked `pads_base`."""
        return len(shape) == len(self.shape) and all(a <= b for a, b in zip(shape, self.shape))

    @property
    def num_params(self):
        n = self.A.numel() + self.B.numel()
        return n + sum(t.numel() for t in (self.bias, self.magnitude) if t is not None)


@dataclass
class Adapter:
    modules: dict = field(default_factory=dict)  # name -> Module
    replacements: dict = field(default_factory=dict)  # full base tensor name -> tensor (PEFT modules_to_save)
    deltas: dict = field(
        default_factory=dict
    )  # full base tensor name -> tensor added to it (ComfyUI .diff/.diff_b)
    base_model: str = None
    base_fingerprint: str = None  # names and shapes of the base (spec: base fingerprint)
    base_identity: str = None  # a sample of the base's bytes (spec 1.1: base identity)
    provenance: dict = field(default_factory=dict)
    user_metadata: dict = field(default_factory=dict)  # free-form str -> str, kept verbatim
    source_format: str = "lorakit"
    notes: list = field(default_factory=list)  # what a reader did (folded scales, consumed copies); not saved
    transforms: dict = field(
        default_factory=dict
    )  # name -> core.multiplicative.Transform (PEFT IA3, HRA, OFT)
    # modules for another file of the same model (a Flux LoRA's text encoder when the base is the transformer), as a
    # reader resolving names against a base found them: merge reports them instead of failing; nothing else drops them
    elsewhere: list = field(default_factory=list)
    # why the adapter does not apply to the original base as it is (PEFT's PiSSA / OLoRA / CorDA / LoftQ trained it
    # against a base they changed), or None: merge and convert refuse it until the initial adapter undoes that
    moved_base: str = None

    def add(self, module):
        self.modules[module.name] = module
        return module

    @property
    def base_copies(self):
        """The replacements that are PEFT's copies of base weights saved beside their LoRA (`<module>.base_layer.weight`
        of an embedding or lm_head with save_embedding_layers): read as replacements of modules that have factors."""
        return [
            n for n in self.replacements if n.endswith(".weight") and n[: -len(".weight")] in self.modules
        ]

    @property
    def num_params(self):
        return sum(m.num_params for m in self.modules.values()) + sum(
            t.numel() for t in (*self.replacements.values(), *self.deltas.values())
        )

    def save(self, path, format="lorakit", force=False, **options):
        """Write the adapter in `format` (atomic), through lorakit.formats.save (a hook: the core imports nothing of
        the format layer). Returns the writer's notes (what it had to change)."""
        from .. import _hooks

        return _hooks.save_adapter(self, path, format=format, force=force, **options)
