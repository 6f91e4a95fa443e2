"""Mixture-of-Experts modules. In memory an expert LoRA is one ordinary Module per expert, named as the base stores the
expert: `<...>.experts.<e>.<proj>` (a per-expert checkpoint) or `<fused tensor>.<e>` (rows of a 3-D [E, rows, cols]
tensor: gpt-oss, Llama 4, llama.cpp's *_exps). A group is those names with the index written `*`, which is also the
module name of the spec's `experts` kind (E experts of one projection in one [E, r, in] / [E, out, r] pair)."""

import re
from dataclasses import dataclass

from .adapter import Module

WILDCARD = "*"
PER_EXPERT = re.compile(r"(?P<parent>.+\.experts)\.(?P<e>\d+)\.(?P<proj>[^.*]+)")
FUSED_ROWS = re.compile(r"(?P<tensor>.+\.experts\.[^.*]+)\.(?P<e>\d+)")


def expert_of(name):
    """(group name with the index as '*', the index) of a per-expert module name, else None."""
    m = PER_EXPERT.fullmatch(name)
    if m:
        return f"{m['parent']}.{WILDCARD}.{m['proj']}", int(m["e"])
    m = FUSED_ROWS.fullmatch(name)
    return (f"{m['tensor']}.{WILDCARD}", int(m["e"])) if m else None


def layer_of(group):
    """(the MoE layer, the projection) of a group: ('...mlp.experts', 'gate_proj'), ('...mlp.experts', 'gate_up_proj')."""
    head, _, tail = group.partition(f".{WILDCARD}")
    return (head, tail[1:]) if tail else tuple(head.rsplit(".", 1))


def expert_name(group, e):
    """Expert e's module name in a group: the one '*' replaced by the decimal index."""
    return group.replace(WILDCARD, str(e), 1)


def expert_groups(names):
    """{group: {expert index: module name}} of the per-expert names among `names`."""
    groups = {}
    for name in names:
        found = expert_of(name)
        if found:
            groups.setdefault(found[0], {})[found[1]] = name
    return groups


def _packable(modules):
    """Whether per-expert modules (index order) can be one `experts` module: plain linear, one shape and dtype."""
    first = modules[0]
    return len(modules) > 1 and all(
        m.kind == "linear"
        and m.bias is None
        and m.magnitude is None
        and not m.pads_base
        and m.A.shape == first.A.shape
        and m.B.shape == first.B.shape
        and m.A.dtype == first.A.dtype
        and m.B.dtype == first.B.dtype
        for m in modules
    )


@dataclass
class Packed:
    """E experts of one projection as one pair of 3-D factors (the spec's `experts` kind)."""

    names: list  # expert e's module name
    A: object  # [E, r, in]
    B: object  # [E, out, r]
    alphas: list  # one per expert


def packed(modules):
    """{group: Packed} for every group of `modules` ({name: Module}) covering experts 0..E-1 with one shape and
    dtype."""
    import torch

    out = {}
    for group, names in expert_groups(modules).items():
        if sorted(names) != list(range(len(names))):
            continue
        members = [modules[names[e]] for e in range(len(names))]
        if _packable(members):
            A = torch.stack([m.A for m in members])
            B = torch.stack([m.B for m in members])
            out[group] = Packed([m.name for m in members], A, B, [m.alpha for m in members])
    return out


def unpacked(group, As, Bs, alphas):
    """The per-expert Modules of one `experts` module: expert e's factors As[e], Bs[e] and alpha alphas[e]."""
    return [
        Module(expert_name(group, e), A, B, alpha=alpha, kind="linear")
        for e, (A, B, alpha) in enumerate(zip(As, Bs, alphas, strict=True))
    ]
