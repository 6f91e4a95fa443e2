"""Merge planning: every adapter tensor resolved to a base tensor of the right shape before anything is written."""

from dataclasses import dataclass, field

import torch

from ..errors import LorakitError, opt
from ..core import Module
from ..naming.embeddings import HEAD, is_embedding
from ..naming.fused import fused_aliases, split_aliases
from ..spec import fingerprint


@dataclass
class TensorPlan:
    """What to do with one output tensor: its source tensor in the base, and what the adapters add to it."""

    name: str
    source: str  # base tensor read (differs from name only for an untied lm_head)
    loras: list = field(default_factory=list)  # [(Module, weight)]
    biases: list = field(default_factory=list)  # [(Module, weight)]
    replacement: torch.Tensor = None
    deltas: list = field(default_factory=list)  # [(full tensor added, weight)]

    @property
    def touched(self):
        return bool(self.loras or self.biases or self.deltas) or self.replacement is not None


def plan_merge(view, adapters, unmerge, tied, ignore_fingerprint, skip_unmatched=False):
    """Resolve every adapter tensor (adapters: [(path, Adapter, weight)]) to a tensor of the WeightView `view`
    (quantized weights by their dequantized shapes). Returns ({output name: TensorPlan}, the embedding to untie or
    None, [tensors skipped]). Raises one error listing everything that does not fit; with `skip_unmatched`, tensors
    the base does not have are skipped instead (a shape that differs stays an error: that is another base)."""
    ckpt = view.ckpt
    plans, problems, skipped, hints = {}, [], [], set()
    aliases = splits = (
        None  # other tools' names for the base's tensors and fused slices, built when first needed
    )

    def unmatched(name, problem):
        if skip_unmatched:
            skipped.append(name)
        else:
            problems.append(problem)
            hints.add(f"{opt('skip_unmatched', True)} merges the tensors the base has")

    embed = next((n for n in ckpt.where if is_embedding(n)), None) if tied else None
    # the fingerprint sees a quantized base as its full-precision weights, so adapters for the original fit
    base_fp = fingerprint(view.shapes())

    def target(name):
        if name in view:
            return plans.setdefault(name, TensorPlan(name, name))
        if name == HEAD and embed is not None:  # tied head, stored only as the embedding
            return plans.setdefault(name, TensorPlan(name, embed))
        return None

    def fitting(name, t, what):
        """The plan of the base tensor a full tensor (delta or replacement) goes to, or None (the problem noted)."""
        p = target(name)
        if p is None:
            unmatched(name, f"{name}: {what} of a tensor not in the base")
        elif tuple(view.shape(p.source)) != tuple(t.shape):
            problems.append(f"{name}: base {list(view.shape(p.source))}, {what} {list(t.shape)}")
        else:
            return p
        return None

    for path, ad, w in adapters:
        if ad.base_fingerprint and ad.base_fingerprint != base_fp and not ignore_fingerprint:
            problems.append(
                f"{path} was made for another base (fingerprint {ad.base_fingerprint[:15]}... != "
                f"{base_fp[:15]}...; {opt('ignore_fingerprint', True)} to merge anyway)"
            )
        for m in ad.modules.values():
            p = target(f"{m.name}.weight")
            if p is None:
                if aliases is None:
                    aliases = fused_aliases(view.shapes())
                if m.name in aliases and m.magnitude is None and m.bias is None:
                    tensor, start, stop, swap = aliases[m.name]
                    if tuple(m.shape) == (stop - start, *view.shape(tensor)[1:]):
                        m = on_rows(m.rows(0, m.shape[0], swap), tensor, start, stop, view.shape(tensor)[0])
                        p = target(tensor)
            if (
                p is None and m.magnitude is None and m.bias is None
            ):  # an original DiT name on a diffusers base
                if splits is None:
                    splits = split_aliases(view.shapes())
                pieces = splits.get(m.name)
                if (
                    pieces
                    and m.shape[0] == pieces[-1][2]
                    and all(view.shape(t)[1:] == tuple(m.shape[1:]) for t, *_ in pieces)
                ):
                    for tensor, start, stop, swap in pieces:
                        target(tensor).loras.append((m.rows(start, stop, swap, tensor[: -len(".weight")]), w))
                    continue
            if p is None:
                unmatched(f"{m.name}.weight", f"{m.name}.weight: not in the base")
                continue
            shape = view.shape(p.source)
            if tuple(shape) != tuple(m.shape):
                problems.append(f"{m.name}.weight: base {list(shape)}, adapter {list(m.shape)}")
                continue
            if m.magnitude is not None and (p.loras or unmerge):
                problems.append(
                    f"{m.name}: DoRA "
                    + (
                        "cannot be unmerged (the norm of W + dW is not in the file)"
                        if unmerge
                        else "shares its tensor with another adapter"
                    )
                )
            if p.loras and any(x.magnitude is not None for x, _ in p.loras):
                problems.append(f"{m.name}: DoRA shares its tensor with another adapter")
            p.loras.append((m, w))
            if m.bias is not None:
                b = target(f"{m.name}.bias")
                if b is None:
                    problems.append(f"{m.name}.bias: the adapter has a bias delta but the base has no bias")
                elif tuple(view.shape(b.source)) != tuple(m.bias.shape):
                    problems.append(
                        f"{m.name}.bias: base {list(view.shape(b.source))}, adapter {list(m.bias.shape)}"
                    )
                else:
                    b.biases.append((m, w))
        for name, t in ad.deltas.items():
            p = fitting(name, t, "delta")
            if p is not None:
                p.deltas.append((t, w))
        for name, t in ad.replacements.items():
            p = fitting(name, t, "replacement")
            if p is not None and unmerge:
                problems.append(f"{name}: a full replacement cannot be unmerged")
            elif p is not None and p.replacement is not None:
                problems.append(f"{name}: replaced by more than one adapter")
            elif p is not None:
                p.replacement = t
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        hint = f" ({'; '.join(sorted(hints))})" if hints else ""
        raise LorakitError(
            f"{len(problems)} adapter tensor(s) do not fit the base: {shown}{hint}", path=ckpt.path
        )
    untie = embed is not None and (HEAD in plans or embed in plans)
    if untie:
        target(HEAD)  # write the head explicitly, with or without its own delta
    return plans, embed if untie else None, skipped


def on_rows(m, tensor, start, stop, rows):
    """Module `m` as a delta of the whole fused `tensor`: B padded with zero rows outside [start, stop) (exact)."""
    B = m.B.new_zeros((rows, *m.B.shape[1:]))
    B[start:stop] = m.B
    return Module(tensor.removesuffix(".weight"), m.A, B, m.alpha, m.kind)
