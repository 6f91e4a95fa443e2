"""`lorakit convert`: read any format, write any writable one; every key consumed or reported."""

import os

from ..errors import LorakitError
from ..formats import detect_format, get_format, given, load, refuse_misnamed, save, takes
from ..io import check_output
from .args import existing, local, rank_rule, undo_initial


def convert(
    input,
    output,
    to=None,
    from_=None,
    base=None,
    alpha=None,
    allow_unknown=False,
    force=False,
    rank=None,
    energy=None,
    for_engine=None,
    max_rank=None,
    initial=None,
):
    """Convert an adapter between formats. Returns a report with what the reader and writer did. `base` goes to the
    reader and/or the writer that use it (an error when neither does); `alpha` and `allow_unknown` to the reader.
    `for_engine` (lorakit.serving.ENGINES) writes what that inference server loads, with the same dW: scales folded
    into B, one rank (`max_rank`: truncate to it), DoRA / full tensors as low-rank deltas against `base` at `rank` /
    `energy` where asked, everything else it would drop refused by name. `initial`: the PEFT adapter as saved before training, for one whose
    initialisation changed its base (PiSSA, OLoRA, CorDA, LoRA-GA): written as dW = B A - B0 A0 (PEFT's conversion)."""
    input, output = os.fspath(local(input, "adapter")), os.fspath(output)
    rank_rule(rank=rank, energy=energy, max_rank=max_rank)
    engine, to = _engine_and_format(for_engine, to, max_rank)
    base = existing(local(base, "base"), "base")
    initial = existing(local(initial, "adapter"), "initial")
    check_output(output, [input, base, initial], force)
    base = _opened(base)
    dst = get_format(to)
    refuse_misnamed(dst.name, output)
    if dst.write is None:
        raise LorakitError(f"format '{dst.name}' cannot be written")  # save() lists the writable ones
    src, adapter = _read(input, from_, base, dst, alpha, allow_unknown, engine or rank or energy)
    [(_, adapter, _)], undone = undo_initial([(input, adapter, 1.0)], initial, "convert")
    adapter.notes = [*adapter.notes, *(note for _, note in undone)]
    if base is not None:
        adapter = _onto(base, adapter, input)
    rows = _transforms_as_lora(adapter, base, rank, energy, input) if adapter.transforms else []
    if engine is not None:
        adapter, rows = _serve_ready(adapter, engine, base, rank, energy, max_rank, input, rows)
    adapter.provenance = {
        **adapter.provenance,
        "operation": "convert",
        "parents": [{"file": os.path.basename(os.path.normpath(input)), "format": src.name}],
    }
    if engine is None and dst.name == "peft":
        adapter = _experts_for_peft(adapter, base, None)
    _rank_was_used(rank, energy, rows)
    notes = _write(adapter, output, dst, base, force, input)
    return {
        "input": input,
        "output": output,
        "from": src.name,
        "to": dst.name,
        **({"for": engine.name} if engine else {}),
        "module_count": len(adapter.modules),
        "replacement_count": len(adapter.replacements),
        **({"modules": rows} if rows else {}),  # what each module kept where it was approximated or re-ranked
        "notes": notes,
    }


def _read(input, from_, base, dst, alpha, allow_unknown, computes_on_base):
    """(source format, Adapter); `base` goes to the reader when it takes one."""
    src = get_format(from_) if from_ else detect_format(input)
    uses = takes(src.read or (lambda: None)) | takes(dst.write) | ({"base"} if computes_on_base else set())
    if base is not None and "base" not in uses:
        raise LorakitError(f"--base is used neither by the {src.name} reader nor by the {dst.name} writer")
    read_options = given({"alpha": alpha, "allow_unknown": allow_unknown})
    if src.read is not None and "base" in takes(src.read) and base is not None:
        read_options["base"] = base
    return src, load(input, format=src.name, **read_options)


def _onto(base, adapter, input):
    """The adapter under the base's names (another language-model prefix); refused where modules land nowhere or
    on a weight of another shape (merge refuses both as well)."""
    from ..engine.landing import on_base_names, shape_mismatches

    adapter, moved, found = on_base_names(base, adapter)
    if found.nowhere:
        raise LorakitError(found.summary(), path=input, code="LK601")
    mismatched = shape_mismatches(base, moved)
    if mismatched:
        name, shapes = mismatched[0]
        more = f" (and {len(mismatched) - 1} more modules)" if len(mismatched) > 1 else ""
        raise LorakitError(
            f"does not fit the base's weight: {shapes}{more}", path=input, tensor=name, code="LK602"
        )
    return adapter


def _engine_and_format(for_engine, to, max_rank):
    from .. import serving

    if for_engine is None:
        if to is None:
            raise LorakitError("give the output format (--to FORMAT) or the engine (--for ENGINE)")
        if max_rank is not None:
            raise LorakitError("--max-rank goes with --for ENGINE (use resize to re-rank an adapter)")
        return None, to
    engine = serving.get_engine(for_engine)
    if to is not None and get_format(to).name != engine.writes:
        raise LorakitError(
            f"{engine.name} loads {engine.writes} adapters, not {to}: drop --to, --for chooses it"
        )
    return engine, engine.writes


def _write(adapter, output, dst, base, force, input):
    write_options = {"base": base} if base is not None and "base" in takes(dst.write) else {}
    try:
        return list(adapter.notes) + save(adapter, output, format=dst.name, force=force, **write_options)
    except (
        LorakitError
    ) as e:  # the input holds what the output format cannot: name the input, say which output
        if e.path is not None and os.fspath(e.path) != output:
            raise
        message = f"cannot write {output} as {dst.name}: {e.message}"
        raise LorakitError(message, path=input, tensor=e.tensor, code=e.code) from None


def _opened(base):
    """The base opened once, for the reader, the writer and the deltas computed against it (None: no base)."""
    if base is None:
        return None
    from ..bases import open_base

    return open_base(base)


def _rank_was_used(rank, energy, rows):
    """--rank / --energy set the rank of what is written as a low-rank delta: refused where nothing was (an option
    that changes nothing is not silently dropped). Rows with a "kind" are those modules; serve_ready's re-rank
    rows (--max-rank) have none."""
    if (rank is not None or energy is not None) and not any("kind" in r for r in rows):
        option = "--rank" if rank is not None else "--energy"
        raise LorakitError(
            f"{option} sets the rank of what convert writes as a low-rank delta against --base (IA3, OFT and other "
            "multiplicative modules; DoRA modules and full tensors with --for ENGINE), and this adapter has none: "
            "resize re-ranks an adapter"
        )


def _serve_ready(adapter, engine, base, rank, energy, max_rank, path, rows):
    """The adapter as `engine` serves it exactly (lorakit.serving.serve_ready), DoRA modules and full tensors first
    written as low-rank deltas against the base when asked (--base with --rank / --energy)."""
    from .. import serving

    from ..formats.common import checked_base_copies

    copies = adapter.base_copies  # PEFT's copies of the base's embedding / lm_head: the base has them already
    adapter.notes.extend(checked_base_copies(adapter, copies, base, path, engine.name))
    for name in copies:
        del adapter.replacements[name]
    if base is not None and (rank is not None or energy is not None):
        rows = rows + _low_rank_deltas(adapter, engine, base, rank, energy)
    if base is not None and engine.every_expert:
        added = serving.with_every_expert(adapter, base.shapes())
        if added:
            adapter.notes.append(
                f"{len(added)} expert(s) the adapter lacks given zero LoRAs ({engine.name} loads every expert)"
            )
    adapter = _experts_for_peft(adapter, base, engine)
    try:
        adapter, ranks = serving.serve_ready(adapter, engine, max_rank)
    except LorakitError as e:
        raise LorakitError(e.message, path=path, tensor=e.tensor, code=e.code) from None
    adapter.notes.append(
        f"written for {engine.name}: every module at rank {next(iter(adapter.modules.values())).rank} and one "
        "scale (patterns, rsLoRA and per-module alphas folded into B)"
        if adapter.modules
        else f"written for {engine.name}"
    )
    return adapter, rows + [r for r in ranks if r["rank"] != r["rank_in"] or r["energy_kept"] < 1]


def _experts_for_peft(adapter, base, engine):
    """Per-expert modules as rows of transformers 5's fused expert tensors (written as PEFT's target_parameters)
    where the engine, or PEFT itself, loads them only so."""
    from ..formats import peft_experts

    model_type = base.model_type if base is not None else None
    if not peft_experts.wants_target_parameters(model_type, engine):
        return adapter
    return peft_experts.fused_in_memory(adapter)


def _low_rank_deltas(adapter, engine, base, rank, energy):
    """DoRA modules and full tensors the engine drops, as the best low-rank LoRA of their delta against the base
    (the DoRA delta m (W + dW) / ||W + dW|| - W is not low-rank): one row each, with the energy kept."""
    targets = {}
    if not engine.dora:
        targets.update({n: ("dora", m) for n, m in adapter.modules.items() if m.magnitude is not None})
    if not engine.full_weights:
        for name in [*adapter.replacements, *adapter.deltas]:
            if name.endswith(".weight") and name[: -len(".weight")] not in adapter.modules:
                kind = "replacement" if name in adapter.replacements else "delta"
                targets[name[: -len(".weight")]] = (kind, name)
    rows = []
    for name, (kind, what) in sorted(targets.items()):
        W = _base_weight(base, name)
        if kind == "dora":
            D = what.apply(W) - W
        elif kind == "replacement":
            D = adapter.replacements.pop(what).float() - W
        else:
            D = adapter.deltas.pop(what).float()
        if D.ndim < 2:
            raise LorakitError(f"a 1-D {kind} has no low-rank form: merge it instead", tensor=what)
        rows.append(_add_lora_of(adapter, name, W, D, kind, rank, energy))
    return rows


def _base_weight(base, name):
    """The base's full-precision weight of module `name`, in fp32."""
    if f"{name}.weight" not in base:
        raise LorakitError("not in the base", path=base.path, tensor=f"{name}.weight")
    return base.get(f"{name}.weight").float()


def _add_lora_of(adapter, name, W, D, label, rank, energy, factors=None):
    """Module `name` written as the LoRA of the change D of its base weight W: exact `factors` (B, A) where they are
    known, else the best rank-`rank` (or `energy`) one. Returns the report row."""
    from ..core import algebra, default_kind

    kind = adapter.modules[name].kind if name in adapter.modules else default_kind(W.ndim)
    if factors is None:
        module, stats = algebra.module_of_delta(name, D, kind, W.dtype, rank, energy)
    else:
        module = algebra.module_from_factors(name, tuple(W.shape), kind, *factors, W.dtype)
        stats = {"rank": module.rank, "energy_kept": 1.0, "relative_error": 0.0}
    adapter.add(module)
    return {"module": name, "kind": label, **stats}


def _transforms_as_lora(adapter, base, rank, energy, path):
    """A multiplicative adapter (IA3, HRA, OFT, BOFT) written as LoRA modules: its change W' - W against `base`,
    exact where it is low-rank (HRA: rank <= r), else the best rank-`rank` (or `energy`) approximation, the energy
    kept reported per module."""
    if base is None:
        raise LorakitError(
            f"{len(adapter.transforms)} module(s) change W multiplicatively (W' = f(W)): no LoRA file holds them "
            "as they are. Merge them (lorakit merge BASE ADAPTER -o OUT), or pass --base to write W' - W as a "
            "LoRA (exact for HRA; with --rank or --energy for IA3 and OFT)",
            path=path,
            code="LK402",
        )
    rows = []
    for name, t in sorted(adapter.transforms.items()):
        W = _base_weight(base, name)
        factors = t.low_rank(W)
        if factors is None and rank is None and energy is None:
            raise LorakitError(
                f"{t.kind} is not low-rank: give --rank or --energy for its LoRA approximation",
                path=path,
                tensor=name,
            )
        D = t.apply(W) - W if factors is None else None
        rows.append(_add_lora_of(adapter, name, W, D, t.kind, rank, energy, factors))
    adapter.transforms = {}
    adapter.notes.append(
        f"{len(rows)} multiplicative module(s) written as W' - W against the base; least energy kept: "
        f"{min(r['energy_kept'] for r in rows):.6f}"
    )
    return rows
