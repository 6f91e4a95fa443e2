"""`lorakit convert`: read any format, write any writable one; every key consumed or reported."""

import os

from ..errors import LorakitError
from ..formats import detect_format, get_format, given, load, save, takes
from ..io import check_output
from .args import existing, rank_rule


def convert(
    input,
    output,
    to,
    from_=None,
    base=None,
    alpha=None,
    allow_unknown=False,
    force=False,
    rank=None,
    energy=None,
):
    """Convert an adapter between formats. Returns a report with what the reader and writer did. `base` goes to the
    reader and/or the writer that use it (an error when neither does); `alpha` and `allow_unknown` to the reader."""
    input, output = os.fspath(input), os.fspath(output)
    existing(base, "base")
    check_output(output, [input, base], force)
    if base is not None:
        from ..bases import open_base

        base = open_base(base)  # once, for the reader, the writer and multiplicative modules
    src = get_format(from_) if from_ else detect_format(input)
    dst = get_format(to)
    if dst.write is None:
        raise LorakitError(f"format '{dst.name}' cannot be written")  # save() lists the writable ones
    if base is not None and not ({"base"} & (takes(src.read or (lambda: None)) | takes(dst.write))):
        raise LorakitError(f"--base is used neither by the {src.name} reader nor by the {dst.name} writer")
    read_options = given({"alpha": alpha, "allow_unknown": allow_unknown})
    if src.read is not None and "base" in takes(src.read) and base is not None:
        read_options["base"] = base
    adapter = load(input, format=src.name, **read_options)
    rows = _transforms_as_lora(adapter, base, rank, energy, input) if adapter.transforms else []
    adapter.provenance = {
        **adapter.provenance,
        "operation": "convert",
        "parents": [{"file": os.path.basename(os.path.normpath(input)), "format": src.name}],
    }
    write_options = {"base": base} if base is not None and "base" in takes(dst.write) else {}
    try:
        notes = list(adapter.notes) + save(adapter, output, format=dst.name, force=force, **write_options)
    except (
        LorakitError
    ) as e:  # the input holds what the output format cannot: name the input, say which output
        if e.path is not None and os.fspath(e.path) != output:
            raise
        message = f"cannot write {output} as {dst.name}: {e.message}"
        raise LorakitError(message, path=input, tensor=e.tensor, code=e.code) from None
    return {
        "input": input,
        "output": output,
        "from": src.name,
        "to": dst.name,
        "module_count": len(adapter.modules),
        "replacement_count": len(adapter.replacements),
        **({"modules": rows} if rows else {}),  # multiplicative modules written as LoRA: what each kept
        "notes": notes,
    }


def _transforms_as_lora(adapter, base, rank, energy, path):
    """A multiplicative adapter (IA3, HRA, OFT) written as LoRA modules: its change W' - W against `base`, exact where
    it is low-rank (HRA: rank <= r), else the best rank-`rank` (or `energy`) approximation, the energy kept reported
    per module."""

    from ..bases import open_base
    from ..core import algebra

    if base is None:
        raise LorakitError(
            f"{len(adapter.transforms)} module(s) change W multiplicatively (W' = f(W)): no LoRA file holds them "
            "as they are. Merge them (lorakit merge BASE ADAPTER -o OUT), or pass --base to write W' - W as a "
            "LoRA (exact for HRA; with --rank or --energy for IA3 and OFT)",
            path=path,
            code="LK402",
        )
    rank_rule(rank=rank, energy=energy)
    base, rows = open_base(base), []  # the reader's: opened once
    for name, t in sorted(adapter.transforms.items()):
        if f"{name}.weight" not in base:
            raise LorakitError("not in the base", path=base.path, tensor=f"{name}.weight")
        W = base.get(f"{name}.weight").float()
        factors = t.low_rank(W)
        if factors is None and rank is None and energy is None:
            raise LorakitError(
                f"{t.kind} is not low-rank: give --rank or --energy for its LoRA approximation",
                path=path,
                tensor=name,
            )
        if factors is None:
            B2, A2, stats = algebra.extract_matrix(t.apply(W) - W, rank=rank, energy=energy)
        else:
            B2, A2 = factors
            stats = {"rank": A2.shape[0], "energy_kept": 1.0, "relative_error": 0.0}
        adapter.add(algebra.module_from_factors(name, tuple(W.shape), "linear", B2, A2, W.dtype))
        rows.append({"module": name, "kind": t.kind, **stats})
    adapter.transforms = {}
    adapter.notes.append(
        f"{len(rows)} multiplicative module(s) written as W' - W against the base; least energy kept: "
        f"{min(r['energy_kept'] for r in rows):.6f}"
    )
    return rows
