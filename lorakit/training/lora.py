"""LoRA layers for any torch model (think loralib/layers.py): wrap nn.Linear, nn.Conv1d/2d, nn.Embedding and GPT-2's
Conv1D by module-name patterns, train only the factors, extract an `Adapter` named by the base's weight names, and
merge / unmerge in place.

Factors follow the spec: dW = (alpha / r) * B @ A in the base weight's own layout, B zero at the start."""

import fnmatch
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core import Adapter, Module, fp32
from ..errors import LorakitError
from .frozen import FrozenLinear


class LoRA(nn.Module):
    """Wraps a base layer; forward = base(x) + scale * (x through A then B), in the layer's own way."""

    def __init__(self, base, rank, alpha, kind):
        super().__init__()
        self.base, self.kind, self.rank, self.alpha = base, kind, rank, float(alpha)
        frozen = isinstance(base, FrozenLinear)  # a quantized weight, kept as its codes
        shape = base.weight_shape if frozen else tuple(base.weight.shape)
        device = base.codes.device if frozen else base.weight.device
        self.shape = shape
        self.lora_A = nn.Parameter(torch.empty(rank, *shape[1:], dtype=torch.float32, device=device))
        self.lora_B = nn.Parameter(
            torch.zeros(shape[0], rank, *[1] * (len(shape) - 2), dtype=torch.float32, device=device)
        )
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.merged = False

    @property
    def scale(self):
        return fp32(self.alpha) / self.rank

    def delta(self):
        return (self.lora_B.flatten(1) @ self.lora_A.flatten(1)).reshape(self.shape) * self.scale

    def forward(self, x):
        y = self.base(x)
        if self.merged:
            return y
        A, B = self.lora_A.to(y.dtype), self.lora_B.to(y.dtype)
        if self.kind == "linear":  # the scale on the rank-r activations: the cheaper side
            return y + F.linear(F.linear(x.to(y.dtype), A) * self.scale, B)
        if self.kind == "linear_t":  # GPT-2 Conv1D: y = x @ W with W [in, out] = B [in, r] @ A [r, out]
            return y + (x.to(y.dtype) @ B * self.scale) @ A
        if self.kind == "embedding":  # W [num, dim] = B [num, r] @ A [r, dim]: look up rows of B
            return y + F.embedding(x, B) @ A * self.scale
        conv = F.conv1d if self.lora_A.ndim == 3 else F.conv2d
        b = self.base
        h = conv(x.to(y.dtype), A, None, b.stride, b.padding, b.dilation)
        return y + conv(h, B) * self.scale

    @torch.no_grad()
    def merge(self, sign=1.0):
        """W += sign * dW in fp32, rounded once to W's dtype."""
        if self.merged == (sign > 0):
            return
        if isinstance(self.base, FrozenLinear):
            raise LorakitError(
                "a quantized base layer is not merged in place: merge the adapter into the checkpoint "
                "(lorakit merge), which puts W + dW back on its grid"
            )
        W = self.base.weight
        W.copy_((W.float() + sign * self.delta().float()).to(W.dtype))
        self.merged = sign > 0


def _kind(module):
    if isinstance(module, (nn.Linear, FrozenLinear)):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if module.groups != 1:
            raise LorakitError("grouped convolutions are not supported")
        return "conv"
    if type(module).__name__ == "Conv1D" and hasattr(
        module, "nf"
    ):  # transformers' GPT-2 Conv1D, weight [in, out]
        return "linear_t"
    return None


def target_list(targets):
    """'q_proj,v_proj' or a list -> a list of patterns (None stays None)."""
    return [t for t in targets.split(",") if t] if isinstance(targets, str) else targets


def matches(name, patterns):
    """A pattern is a module name, its suffix (q_proj, self_attn.q_proj) or a glob."""
    return any(name == p or name.endswith("." + p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def refuse_idle_targets(targets, names, what):
    """A target pattern that matches none of `names` is refused: a misspelt one would make an adapter without it,
    silently."""
    idle = [t for t in targets if not any(matches(n, [t]) for n in names)]
    if idle:
        matched = sum(matches(n, targets) for n in names)
        others = f" (the other targets match {matched})" if matched else ""
        raise LorakitError(
            f"--targets {', '.join(idle)}: matches no {what}{others}: drop it or fix its spelling"
        )


def inject(model, targets, rank=16, alpha=32.0):
    """Wrap every supported layer whose name matches `targets`; freeze everything else. Returns the wrapped names."""
    targets = target_list(targets)
    if not targets:
        raise LorakitError(
            "--targets is empty: name the layers to train (q_proj,v_proj, a glob or a full name)"
        )
    layers = [n for n, m in model.named_modules() if n and _kind(m)]
    names = [n for n in layers if matches(n, targets)]
    refuse_idle_targets(targets, layers, "Linear, Conv, Embedding or Conv1D layer of the base")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        setattr(parent, child, LoRA(base, rank, alpha, _kind(base)))
    return names


def lora_layers(model):
    """(name, layer) for every LoRA layer; names are the wrapped module's own (without '.base')."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRA)]


def extract(model, prefix="", dtype=torch.float32):
    """The trained adapter. Module names are the base layer names, i.e. the checkpoint's weight names without
    '.weight' (give `prefix` when the checkpoint names the model from a parent, e.g. 'model.')."""
    ad = Adapter()
    for name, layer in lora_layers(model):
        ad.add(
            Module(
                prefix + name,
                layer.lora_A.detach().to(dtype).clone(),
                layer.lora_B.detach().to(dtype).clone(),
                alpha=layer.alpha,
                kind=layer.kind,
            )
        )
    return ad


def load_into(model, adapter, prefix=""):
    """Set the LoRA layers' factors from an adapter (for --resume); ranks must agree."""
    for name, layer in lora_layers(model):
        m = adapter.modules.get(prefix + name)
        if m is None:
            raise LorakitError(f"the adapter has no module '{prefix + name}'")
        if m.A.shape != layer.lora_A.shape or m.B.shape != layer.lora_B.shape:
            raise LorakitError(f"'{prefix + name}': the adapter has rank {m.rank}, the run rank {layer.rank}")
        with torch.no_grad():
            layer.lora_A.copy_(m.A)
            layer.lora_B.copy_(m.B)
        layer.alpha = m.alpha


def merge(model):
    for _, layer in lora_layers(model):
        layer.merge(+1.0)


def unmerge(model):
    for _, layer in lora_layers(model):
        layer.merge(-1.0)
