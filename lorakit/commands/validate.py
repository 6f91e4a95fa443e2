"""`lorakit validate`: check files against the spec, listing every problem with its stable code."""

import os
import shlex

from .. import spec
from ..errors import LorakitError
from ..formats import foreign_container


def validate(files, values=True, quick=False, fail_fast=False, quiet=False):
    """Validate each file. Returns {"valid": bool, "files": [{"file", "valid", "readable", "problems": [...]}]}.

    Unreadable paths (missing, directory) are reported with readable=False and code LK001; the CLI exits 2 for them.
    The header checks read no data. The value scan (NaN/Inf, alphas) streams each file's data with a progress bar;
    `quick` skips it (header only), `fail_fast` stops a file's scan at its first non-finite tensor.
    """
    from ..progress import progress

    if isinstance(files, (str, os.PathLike)):
        files = [files]
    results = []
    for path in files:
        path = os.fspath(path)
        try:
            with progress(
                quiet=quiet, desc=f"validate {os.path.basename(path)}", unit="B", unit_scale=True
            ) as bar:
                problems, _ = spec.check_file(path, values and not quick, bar, fail_fast)
            readable = True
        except LorakitError as e:
            hint = _other_format_hint(path) if os.path.isdir(path) else None  # a PEFT or diffusers folder
            problems, readable = (
                ([spec.Problem("LK105", hint)], True) if hint else ([spec.Problem("LK001", str(e))], False)
            )
        foreign = foreign_container(path) if readable else None
        if (
            foreign is not None
        ):  # another container: an adapter (convert it) or a model (not an adapter at all)
            code, message = foreign
            problems = [spec.Problem(code, message or _other_format_hint(path))]
        if readable and any(p.code == "LK105" for p in problems):
            hint = _other_format_hint(path)
            if hint:  # another tool's adapter: one line saying so, and what its own reader finds wrong
                problems = [spec.Problem("LK105", hint), *_reader_problems(path)]
        results.append(
            {
                "file": path,
                "readable": readable,
                "valid": readable and not any(p.is_error for p in problems),
                "checked": "header" if quick or not values else "header and values",
                "problems": [p.as_dict() for p in problems],
            }
        )
    return {"valid": all(r["valid"] for r in results), "files": results}


def _reader_problems(path):
    """The coded problem the file's own reader finds (a PEFT type's config, a shape that does not fit), if any."""
    from ..formats import load

    try:
        adapter = load(path)
    except LorakitError as e:
        return [spec.Problem(e.code, e.message, e.tensor)] if e.code else []
    if adapter.transforms:  # IA3, HRA, OFT, BOFT: a LoRA file holds them only as W' - W against a base
        kinds = ", ".join(sorted({t.kind for t in adapter.transforms.values()}))
        message = f"{len(adapter.transforms)} module(s) change W multiplicatively ({kinds}): convert with --base BASE"
        return [spec.Problem("LK402", message)]
    return []


def _other_format_hint(path):
    from ..formats import detect_format

    try:
        fmt = detect_format(path)
    except LorakitError:
        return None
    stem = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
    out = os.path.join(os.path.dirname(os.path.normpath(path)), f"{stem}.lorakit.safetensors")
    return (
        f"this is a {fmt.name} adapter, not a lorakit file; to write it in the spec format: "
        f"lorakit convert {shlex.quote(path)} -o {shlex.quote(out)} --to lorakit"
    )
