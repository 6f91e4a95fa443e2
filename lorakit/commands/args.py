"""Argument parsing shared by the commands (not a command itself)."""

import math
import os
from collections import Counter

from ..core import Adapter
from ..engine.landing import renamed
from ..errors import LorakitError, listed, missing, opt
from ..io.hub import local  # hub ids where a path goes (the commands import it from here)
from ..naming.kohya import resolution_table
from ..naming.prefixes import rename_onto
from ..options import existing, in_range, parse_size  # noqa: F401 (the commands' one import)

FP32_MAX = 3.4028234663852886e38


def parse_weighted(spec):
    """'path:0.5' -> ('path', 0.5); a path without a numeric suffix has weight 1 (paths may contain ':'). An Adapter
    already loaded (or (Adapter, weight)) stands for itself."""
    if isinstance(spec, Adapter):
        return spec, 1.0
    if isinstance(spec, (tuple, list)):
        return (spec[0] if isinstance(spec[0], Adapter) else os.fspath(spec[0])), float(spec[1])
    spec = os.fspath(spec)
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return spec, 1.0


def check_weight(path, weight):
    """A merge/combine weight: finite and within fp32 (torch treats alpha=nan as 1 in addmm: never pass it on)."""
    if not (math.isfinite(weight) and abs(weight) <= FP32_MAX):
        raise LorakitError(f"weight {weight!r} is not a finite fp32 number", path=path)
    return weight


def weighted_inputs(specs):
    """[(path, weight)] from 'path' / 'path:weight' strings, every weight checked."""
    if isinstance(specs, (str, os.PathLike, Adapter)):
        specs = [specs]
    out = []
    for spec in specs:
        path, w = parse_weighted(spec)
        path = local(path, "adapter")
        if isinstance(path, Adapter):
            out.append((path, check_weight("<Adapter>", w)))
            continue
        if not os.path.exists(path):
            raise _weight_hint(os.fspath(spec), out) or missing(path)
        out.append((path, check_weight(path, w)))
    return out


def _weight_hint(spec, before):
    """The usual slips: a weight given as its own argument, or with a decimal comma."""
    try:
        float(spec)
        prev = before[-1][0] if before else "adapter.safetensors"
        return LorakitError(
            f"'{spec}' is not a file: a weight goes after its adapter with a colon, {prev}:{spec}"
        )
    except ValueError:
        pass
    head, sep, tail = spec.rpartition(":")
    if sep and os.path.exists(head):
        example = tail.replace(",", ".")
        try:
            float(example)
        except ValueError:
            example = "0.5"
        return LorakitError(
            f"weight '{tail}' is not a number: a weight is a number after the colon, e.g. {head}:{example} "
            f"or {head}:-{example.lstrip('-')}",
            path=head,
        )
    return None


def same_base(loaded):
    """Refuse adapters made for different bases ([(path, Adapter, weight)]), naming both files: by fingerprint, by
    a module both have at different shapes, or (neither recorded) by module names with no common root (a Llama and
    a GPT-2 adapter). A recorded base name (PEFT's base_model_name_or_path) is a path or an id, not the weights:
    two names for the same weights are common, so names are not compared."""
    for (pa, a, _), (pb, b, _) in zip(loaded, loaded[1:]):
        why = None
        clash = next(
            (n for n in a.modules if n in b.modules and a.modules[n].shape != b.modules[n].shape), None
        )
        if a.base_fingerprint and b.base_fingerprint and a.base_fingerprint != b.base_fingerprint:
            why = "their base fingerprints differ"
        elif clash is not None:
            why = (
                f"module {clash} is {list(a.modules[clash].shape)} in one, "
                f"{list(b.modules[clash].shape)} in the other"
            )
        else:
            roots_a = {n.split(".", 1)[0] for n in a.modules}
            roots_b = {n.split(".", 1)[0] for n in b.modules}
            if roots_a and roots_b and not roots_a & roots_b:
                why = f"their module names share no root ({listed(sorted(roots_a), 4)} vs {listed(sorted(roots_b), 4)})"
        if why:
            raise LorakitError(f"{pa} and {pb} were made for different base models: {why}")


def spelled_alike(adapter, other, what):
    """(`adapter` with the modules that `other` names otherwise renamed to `other`'s names, the note saying so,
    `what` its subject): kohya's mangled names (read without --base) by their mangled form, another model prefix
    (model.language_model. against model.) where exactly one lands; a name two modules would take stays as it is."""
    mine, theirs = set(adapter.modules) - set(other.modules), set(other.modules) - set(adapter.modules)
    table = resolution_table({f"{n}.weight": None for n in theirs})
    names = {n: table[n] for n in mine if n in table}
    names.update(rename_onto(sorted(mine - set(names)), theirs.__contains__))
    taken = Counter(names.values())
    names = {k: v for k, v in names.items() if taken[v] == 1}
    if not names:
        return adapter, []
    first = min(names)
    return renamed(adapter, names), [
        f"{len(names)} of {what}, spelled otherwise there (kohya's mangled names, another prefix): e.g. {first} "
        f"as {names[first]}"
    ]


def one_rule(**rule):
    """{option: value} of the rules given, refused where several are (the first would win and the others be
    ignored): 'give --rank or --energy, not both'."""
    given = {k: v for k, v in rule.items() if v is not None}
    if len(given) > 1:
        names = ["--" + k.replace("_", "-") for k in rule]
        which = (
            " or ".join(names) + ", not both"
            if len(names) == 2
            else f"one of {', '.join(names)}, not several"
        )
        raise LorakitError(f"give {which}")
    return given


def rank_rule(rank=None, energy=None, max_rank=None):
    """The rank options the commands share: one of rank and energy, refused (never clamped) out of range."""
    one_rule(rank=rank, energy=energy)
    in_range("rank", rank, 1, integer=True)
    in_range("max_rank", max_rank, 1, integer=True)
    in_range("energy", energy, 0, 1, low_open=True)


def load_inputs(inputs, base=None):
    """[(path or Adapter, weight)] -> [(label, Adapter, weight)]; paths are read in any format. `base` (a path) goes
    to the readers that resolve names or layouts against it (kohya's mangled names, PEFT's Conv1D)."""
    from ..formats import detect_format, load, takes

    out = []
    for i, (src, w) in enumerate(inputs):
        if isinstance(src, Adapter):
            out.append((f"<Adapter {i + 1}>", src, w))
            continue
        fmt = detect_format(src)
        options = {"base": base} if base is not None and "base" in takes(fmt.read or (lambda: None)) else {}
        out.append((src, load(src, format=fmt.name, **options), w))
    return out


def factors_only(loaded, command):
    """combine / resize / diff work on low-rank factors: an adapter with multiplicative modules (PEFT IA3, HRA, OFT,
    BOFT) is refused, never silently written without them."""
    for label, ad, *_ in loaded:
        if ad.transforms:
            kinds = ", ".join(sorted({t.kind for t in ad.transforms.values()}))
            raise LorakitError(
                f"{len(ad.transforms)} module(s) change W multiplicatively ({kinds}): {command} works on LoRA "
                "factors; write them as one first (lorakit convert ADAPTER -o OUT --to lorakit --base BASE --rank R)",
                path=label,
                code="LK508",
            )
    return loaded


def as_adapter(source):
    """An Adapter given as itself or as a path."""
    return load_inputs([(source, 1.0)])[0][:2]


def paths(inputs):
    """The file inputs among [(path or Adapter, weight)] (what an output must never be)."""
    return [p for p, _ in inputs if not isinstance(p, Adapter)]


def undo_initial(loaded, initial, command):
    """[(label, Adapter, weight)] against the original base: an adapter whose initialisation moved the base (PEFT's
    PiSSA, OLoRA, CorDA, LoRA-GA) becomes dW = B A - B0 A0 with its initial adapter (`initial`, a path: the adapter
    as saved before training); refused without one (LK603), and LoftQ always (its base is in no file). Returns
    (the adapters, [(label, note on what was undone)])."""
    from ..formats.peft_config import undoable

    moved = [(label, ad) for label, ad, _ in loaded if ad.moved_base]
    for label, ad in moved:
        if not undoable(ad.moved_base) or initial is None:
            way = (
                f", which the adapter does not hold; {command} it with {opt('initial', bare=True)} {INITIAL_HOW}"
                if undoable(ad.moved_base)
                else ""
            )
            raise LorakitError(f"{ad.moved_base}{way}", path=label, code="LK603")
    if initial is None:
        return loaded, []
    if len(moved) != 1:
        raise LorakitError(
            f"{opt('initial')} undoes the initialisation of one adapter that changed its base (PiSSA, OLoRA, "
            "CorDA, LoRA-GA); "
            + (
                "none given here did (nothing to undo)"
                if not moved
                else f"{len(moved)} given here did: {command} them one at a time"
            ),
            path=initial,
        )
    label0, ad0 = as_adapter(initial)
    ((label, ad),) = moved
    undone, note = _minus_initial(ad, ad0, initial)
    return [(lb, undone if a is ad else a, w) for lb, a, w in loaded], [(label, note)]


# how to make the initial adapter (PEFT's own conversion needs the same folder)
INITIAL_HOW = (
    "DIR, the adapter saved right after get_peft_model, before training (init_lora_weights set to True)"
)


def _minus_initial(ad, initial, path):
    from ..core.algebra import minus_initial

    missing_here = sorted(set(ad.modules) ^ set(initial.modules))
    if missing_here:
        raise LorakitError(
            f"the initial adapter and the adapter differ in {len(missing_here)} module(s) (first: "
            f"{missing_here[0]}): not the same run's initial factors",
            path=path,
        )
    moved = sorted(_moved(ad.modules[n], initial.modules[n]) for n in ad.modules)
    if moved[-1] == 0:
        raise LorakitError(
            "the initial adapter is the adapter itself (every factor equal): dW would be 0", path=path
        )
    out = Adapter(**{**vars(ad), "modules": {}, "moved_base": None})
    for name, m in ad.modules.items():
        try:
            out.add(minus_initial(m, initial.modules[name]))
        except LorakitError as e:
            raise LorakitError(e.message, path=path, tensor=name) from None
    median = moved[len(moved) // 2]
    note = (
        f"dW = B A - B0 A0 with the initial adapter {os.path.basename(os.path.normpath(path))} (rank doubled, "
        f"as PEFT's path_initial_model_for_weight_conversion writes it); training moved the factors by "
        f"{100 * median:.3g}% (median over modules)"
        + ("; that much suggests the initial adapter of another run: check --initial" if median > 1 else "")
    )
    return out, note


def _moved(m, m0):
    """How far training moved a module's factors from the initial ones: ||[A; B^T] - [A0; B0^T]|| relative."""
    if m.A.shape != m0.A.shape or m.B.shape != m0.B.shape:
        return float("inf")  # minus_initial says what differs
    num = (m.A.double() - m0.A.double()).norm() ** 2 + (m.B.double() - m0.B.double()).norm() ** 2
    den = m0.A.double().norm() ** 2 + m0.B.double().norm() ** 2
    return float((num / den).sqrt()) if den > 0 else float(num > 0)


def refuse_adapter_as_base(
    base,
    usage="lorakit merge BASE ADAPTER[:WEIGHT]... -o OUT",
    role="BASE",
    hint="did you swap BASE and ADAPTER?",
):
    """An opened base that is an adapter (BASE and ADAPTER swapped) refused in one line, with the command's usage."""
    from ..formats import adapter_format

    fmt = adapter_format(base)
    if fmt is not None:
        raise LorakitError(f"{role} is a {fmt.name} adapter, not a model: {hint} ({usage})", path=base.path)


def weight_notes(loaded):
    """Notes for an adapter given with weight 0 (it changes nothing) and a file given more than once (its delta added
    once for each)."""
    notes = [f"{label} has weight 0: it changes nothing" for label, _, w in loaded if w == 0]
    labels = [label for label, _, _ in loaded]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    notes += [
        f"{label} is given {labels.count(label)} times: its delta is added once for each, with its weight"
        for label in twice
    ]
    return notes
