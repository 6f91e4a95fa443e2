"""Where every module of an adapter lands in a base: on a tensor as named, under another language-model prefix
(lorakit.naming.prefixes), or nowhere (with the nearest base name and its share of the adapter's ||dW||). `validate
--base` reports it, `merge` and `convert --base` rename onto the base and refuse what lands nowhere or on a weight of
another shape."""

import dataclasses
from dataclasses import dataclass, field

from ..naming.embeddings import HEAD
from ..naming.prefixes import differing_prefixes, nearest, rename_onto


@dataclass
class Nowhere:
    module: str
    nearest: str  # the base module name closest to it (None for an empty base)
    norm: float  # ||dW||_F of the module (0 for a full tensor)


@dataclass
class Landing:
    modules: int  # LoRA modules and full tensors of the adapter
    renamed: dict = field(default_factory=dict)  # adapter name -> base name (another prefix)
    nowhere: list = field(default_factory=list)  # [Nowhere]
    norm: float = 0.0  # ||dW||_F over every LoRA module (computed only where some module lands nowhere)

    @property
    def nowhere_share(self):
        """The share of the adapter's ||dW||_F^2 in modules that land nowhere."""
        # exactly all of it where nothing lands (norm is a square root: its square can miss the sum by an ulp)
        if self.nothing_lands:
            return 1.0
        lost = sum(n.norm**2 for n in self.nowhere)
        return lost / self.norm**2 if self.norm > 0 else float(bool(self.nowhere))

    @property
    def nothing_lands(self):
        return self.modules > 0 and len(self.nowhere) == self.modules

    def summary(self):
        """'2 modules (3% of ||dW||) match nothing in the base: NAME (nearest: BASE NAME), ...'"""
        shown = ", ".join(
            f"{n.module}" + (f" (nearest: {n.nearest})" if n.nearest else "") for n in self.nowhere[:3]
        )
        more = f" and {len(self.nowhere) - 3} more" if len(self.nowhere) > 3 else ""
        share = f"{100 * self.nowhere_share:.3g}% of ||dW||"
        return f"{len(self.nowhere)} of {self.modules} modules ({share}) match nothing in the base: {shown}{more}"


def module_lands(base, tied_head):
    """Whether a module name lands on the base: a weight, a tied head, or rows of a fused / split / expert tensor."""

    def lands(name):
        weight = f"{name}.weight"
        return (
            weight in base
            or (weight == HEAD and tied_head)
            or name in base.fused_slices
            or name in base.split_slices
        )

    return lands


def landing(base, adapter):
    """The Landing of `adapter` (modules and full tensors, not those it stores for another file) on `base`."""
    from ..core.linalg import frobenius_norm

    lands = module_lands(base, base.tied_embeddings)
    names = [n for n in adapter.modules if n not in adapter.elsewhere]
    full = [
        n.removesuffix(".weight") for n in (*adapter.replacements, *adapter.deltas) if n.endswith(".weight")
    ]
    everything = [*names, *full, *adapter.transforms]
    out = Landing(modules=len(everything), renamed=rename_onto(everything, lands))
    lost = [n for n in everything if not lands(n) and n not in out.renamed]
    if not lost:  # the usual case: no nearest names, no norms (a QR per module) needed
        return out
    norms = {n: frobenius_norm(*adapter.modules[n].factors()) for n in names}
    out.norm = sum(v * v for v in norms.values()) ** 0.5
    candidates = [n.removesuffix(".weight") for n in base.shapes() if n.endswith(".weight")]
    out.nowhere = [Nowhere(n, nearest(n, candidates), norms.get(n, 0.0)) for n in lost]
    return out


def renamed(adapter, names):
    """The adapter with its modules and full tensors under the base's names ({old module name: new})."""
    if not names:
        return adapter

    def tensor(n):
        module = n.removesuffix(".weight")
        return names[module] + ".weight" if n.endswith(".weight") and module in names else n

    modules = {
        names.get(k, k): dataclasses.replace(m, name=names.get(k, k)) for k, m in adapter.modules.items()
    }
    transforms = {
        names.get(k, k): dataclasses.replace(t, name=names.get(k, k)) for k, t in adapter.transforms.items()
    }
    out = dataclasses.replace(
        adapter,
        modules=modules,
        transforms=transforms,
        replacements={tensor(k): v for k, v in adapter.replacements.items()},
        deltas={tensor(k): v for k, v in adapter.deltas.items()},
        notes=[*adapter.notes, renaming_note(names)],
    )
    return out


def renaming_note(names):
    """'12 module(s) renamed onto the base: model.layers. -> model.language_model.layers. (12)'"""
    pairs = {}
    for old, new in names.items():
        key = differing_prefixes(old, new)
        pairs[key] = pairs.get(key, 0) + 1
    shown = ", ".join(f"'{a}' -> '{b}' ({n})" for (a, b), n in sorted(pairs.items()))
    return f"{len(names)} module(s) renamed onto the base's names: {shown}"


def onto_base(base, adapter):
    """(the adapter renamed onto the base's names, its Landing): the adapter on the base's naming already (the
    merge engine's, after Base.to_base_names)."""
    found = landing(base, adapter)
    return renamed(adapter, found.renamed), found


def on_base_names(base, adapter):
    """(the adapter under the base's names, the same on the base's own naming, its Landing) for an adapter on
    Hugging Face's names: a base with a naming of its own (a GGUF's) translates it, and nothing is renamed."""
    named = base.to_base_names(adapter)
    if named is not adapter:
        found = landing(base, named)
        found.renamed = {}
        return adapter, named, found
    adapter, found = onto_base(base, adapter)
    return adapter, adapter, found


def shape_mismatches(base, adapter):
    """[(module name, 'base [..], adapter [..]')] for every module of `adapter` (under the base's names) whose base
    weight has another shape, unless the module widens it as it says it does (ComfyUI's zero padding)."""
    found = []
    for m in adapter.modules.values():
        weight = f"{m.name}.weight"
        if weight not in base:
            continue
        shape = tuple(base.shape(weight))
        if shape != tuple(m.shape) and not (m.pads_base and m.widens(shape)):
            found.append((m.name, f"base {list(shape)}, adapter {list(m.shape)}"))
    return found
