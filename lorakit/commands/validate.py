"""`lorakit validate`: check files against the spec, listing every problem with its stable code."""

import os
import shlex

from .. import spec
from ..errors import LorakitError, opt
from ..formats import (
    a_format,
    detect_format,
    foreign_container,
    is_model,
    named_other_container,
    refuse_incomplete_folder,
)
from ..formats.peft_config import undoable
from ..io.hub import local


def validate(
    files,
    values=True,
    quick=False,
    fail_fast=False,
    quiet=False,
    for_engine=None,
    engine_version=None,
    base=None,
):
    """Validate each file. Returns {"valid": bool, "files": [{"file", "valid", "readable", "problems": [...]}]}.

    Unreadable paths (missing, directory) are reported with readable=False and code LK001; the CLI exits 2 for them.
    The header checks read no data. The value scan (NaN/Inf, alphas) streams each file's data with a progress bar;
    `quick` skips it (header only), `fail_fast` stops a file's scan at its first non-finite tensor. With
    `for_engine` (lorakit.serving.ENGINES) the question is another: would that inference server serve the adapter
    exactly? Every construct it would drop, misread or refuse is a problem (LK5xx), with its fix. With `base`: where
    every module lands in that base (LK6xx: modules that land nowhere with the nearest base name, shapes that
    differ, an initialisation that moved the base); the file's `landing` says how much of ||dW|| lands.
    """
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    if engine_version is not None and for_engine is None:
        raise LorakitError(
            f"{opt('engine_version', bare=True)} goes with --for ENGINE (it picks that engine's rules)"
        )
    if fail_fast and quick:
        raise LorakitError(
            f"{opt('fail_fast', bare=True)} stops the value scan, which {opt('quick', bare=True)} skips: give one of them"
        )
    opened = _open_base(base, quiet)
    if for_engine is not None:
        return _validate_for(files, for_engine, engine_version, opened)
    files = [local(path, "adapter", quiet) for path in files]
    results = [_validate_file(os.fspath(path), values and not quick, fail_fast, quiet) for path in files]
    for path, r in zip(files, results):
        r["checked"] = "header" if quick or not values else "header and values"
        if opened is not None and r["readable"]:
            _add_landing(r, os.fspath(path), opened, None)
    return {"valid": all(r["valid"] for r in results), "files": results}


def _open_base(base, quiet):
    if base is None:
        return None
    from ..bases import open_base
    from .args import existing, refuse_adapter_as_base

    opened = open_base(existing(local(base, "base", quiet), "base"))
    refuse_adapter_as_base(opened, "lorakit validate ADAPTER --base BASE")
    return opened


def _add_landing(result, path, base, engine, adapter=None):
    """The file's landing on `base` added to its result (problems LK601-LK603, `landing`), validity updated;
    `adapter`: the file read already (with the base)."""
    from .args import load_inputs

    try:
        adapter = adapter or load_inputs([(path, 1.0)], base)[0][1]  # the base to the readers that use it
    except LorakitError as e:
        result["problems"].append(spec.Problem(e.code or "LK001", e.message, e.tensor).as_dict())
        result["valid"] = False
        return
    found, problems = landing_problems(adapter, base, engine)
    result["problems"] += [p.as_dict() for p in problems]
    result["landing"] = {
        "modules": found.modules,
        "lands": found.modules - len(found.nowhere),
        "nowhere": len(found.nowhere),
        "nowhere_share": found.nowhere_share,
        "renamed": found.renamed,
    }
    result["valid"] = result["valid"] and not any(p.is_error for p in problems)


def landing_problems(adapter, base, engine):
    """(Landing, [Problem]) of an adapter on an opened base: every module that lands nowhere (LK601), on a tensor
    of another shape (LK602), an initialisation that moved the base (LK603); with an engine, names it would not
    match as they are (LK601)."""
    from ..engine.landing import on_base_names, shape_mismatches

    _, moved, found = on_base_names(base, adapter)
    problems = [
        spec.Problem("LK601", f"lands nowhere in the base (nearest: {n.nearest})", n.module)
        for n in found.nowhere
    ]
    problems += [spec.Problem("LK602", shapes, name) for name, shapes in shape_mismatches(base, moved)]
    if adapter.moved_base:
        how = ": merge / convert it with --initial DIR" if undoable(adapter.moved_base) else ""
        problems.append(spec.Problem("LK603", f"{adapter.moved_base}{how}"))
    if engine is not None and found.renamed:
        problems.append(spec.Problem("LK601", renamed_for_engine(found, engine)))
    return found, problems


def renamed_for_engine(found, engine):
    from ..engine.landing import renaming_note

    return (
        f"{renaming_note(found.renamed)}; {engine.name} matches module names as the base's checkpoint has them, "
        f"so these would load and change nothing: convert --base BASE --for {engine.name} writes the base's names"
    )


def _validate_file(path, values, fail_fast, quiet):
    from ..progress import progress

    other = _other_format(path)
    if isinstance(other, spec.Problem):  # a model checkpoint: not an adapter at all
        return _result(path, True, [other])
    if (
        other is not None
    ):  # another tool's adapter: valid in its own format when its reader finds nothing wrong
        return _validate_other_format(path, other)
    if os.path.isdir(
        path
    ):  # a folder no format takes: why, where it can be told (empty, PEFT weights missing)
        try:
            refuse_incomplete_folder(path)
        except LorakitError as e:
            why = f"{path}: is a directory, expected a .safetensors file; it {e.message}"
            return _result(path, False, [spec.Problem("LK001", why)])
    try:
        with progress(
            quiet=quiet, desc=f"validate {os.path.basename(path)}", unit="B", unit_scale=True
        ) as bar:
            problems, _ = spec.check_file(path, values, bar, fail_fast)
        readable = True
    except LorakitError as e:
        problems, readable = [spec.Problem("LK001", str(e))], False
    return _result(path, readable, problems)


def _other_format(path):
    """The format of an adapter in another tool's format (None for a lorakit file or anything unrecognized), or the
    problem of a model checkpoint given as an adapter."""
    if not (os.path.isfile(path) or os.path.isdir(path)):  # missing, a FIFO, a device: the spec check says so
        return None
    foreign = foreign_container(path)
    if foreign is not None and foreign[0] == "LK101":  # a GGUF model
        return spec.Problem(*foreign)
    try:
        fmt = detect_format(path)
    except LorakitError as e:  # a model, or a broken file named for another container: no safetensors checks
        return spec.Problem("LK101", e.message) if is_model(path) or named_other_container(path) else None
    return None if fmt.name == "lorakit" else fmt


def _validate_other_format(path, fmt):
    """Valid as a `fmt` adapter when its reader reads it without a problem (the way to the spec format a note);
    otherwise invalid, with what the reader finds after the way to the spec format."""
    problems, hint = _reader_problems(path), _convert_hint(path, fmt)
    if any(p.is_error for p in problems):  # warnings (LK304) leave it valid, the way to the spec a note
        problems = [spec.Problem("LK105", hint), *problems]
    return {**_result(path, True, problems), "format": fmt.name, "note": hint}


def _result(path, readable, problems):
    return {
        "file": path,
        "readable": readable,
        "valid": readable and not any(p.is_error for p in problems),
        "problems": [p.as_dict() for p in problems],
    }


def _validate_for(files, for_engine, engine_version, base=None):
    """Each file read in its own format, then checked against the engine's rules (and its landing on `base`)."""
    from .. import serving
    from ..formats import detect_format, load
    from .args import load_inputs

    engine = serving.get_engine(for_engine, engine_version)
    results = []
    for path in map(os.fspath, files):
        try:
            fmt = detect_format(path)
            if base is not None:  # read once, with the base (kohya's names are resolved against it)
                adapter = load_inputs([(path, 1.0)], base)[0][1]
            else:
                adapter = load(path, format=fmt.name, **({"values": False} if fmt.name == "lorakit" else {}))
        except LorakitError as e:
            results.append(_result(path, False, [spec.Problem(e.code or "LK001", e.message, e.tensor)]))
            continue
        found = [spec.Problem(*p[:2], p[2]) for p in serving.problems(adapter, engine, fmt.name, path)]
        results.append(
            {**_result(path, True, found), "engine": engine.name, "engine_version": engine_version}
        )
        if base is not None:
            _add_landing(results[-1], path, base, engine, adapter)
            _compare_base_copies(results[-1], adapter, base)
    return {"valid": all(r["valid"] for r in results), "for": engine.name, "files": results}


def _compare_base_copies(result, adapter, base):
    """With the base: PEFT's copies of base weights that differ from it (a resized vocabulary) are errors, LK505."""
    from ..formats.common import checked_base_copies

    try:
        checked_base_copies(adapter, adapter.base_copies, base, result["file"], result["engine"])
    except LorakitError as e:
        result["problems"].append(spec.Problem("LK505", e.message, e.tensor).as_dict())
        result["valid"] = False


def _reader_problems(path):
    """The problems the file's own reader finds (a PEFT type's config, a shape that does not fit), if any."""
    from ..formats import load

    try:
        adapter = load(path)
    except LorakitError as e:
        return [spec.Problem(e.code or "LK101", e.message, e.tensor)]
    if adapter.transforms:  # IA3, HRA, OFT, BOFT: a LoRA file holds them only as W' - W against a base
        kinds = ", ".join(sorted({t.kind for t in adapter.transforms.values()}))
        message = f"{len(adapter.transforms)} module(s) change W multiplicatively ({kinds}): convert with --base BASE"
        return [spec.Problem("LK402", message)]
    return [
        spec.Problem("LK304", n.removeprefix("WARNING: ")) for n in adapter.notes if n.startswith("WARNING")
    ]


def _convert_hint(path, fmt):
    stem = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
    out = os.path.join(os.path.dirname(os.path.normpath(path)), f"{stem}.lorakit.safetensors")
    return (
        f"{a_format(fmt.name)} adapter, not a lorakit file; to write it in the spec format: "
        f"lorakit convert {shlex.quote(path)} -o {shlex.quote(out)} --to lorakit"
    )
