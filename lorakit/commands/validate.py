"""`lorakit validate`: check files against the spec, listing every problem with its stable code."""
import os

from .. import spec
from ..errors import LorakitError


def validate(files, values=True):
    """Validate each file. Returns {"valid": bool, "files": [{"file", "valid", "readable", "problems": [...]}]}.

    Unreadable paths (missing, directory) are reported with readable=False and code LK001; the CLI exits 2 for them.
    """
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    results = []
    for path in files:
        path = os.fspath(path)
        try:
            problems, _ = spec.check_file(path, values=values)
            readable = True
        except LorakitError as e:
            problems, readable = [spec.Problem("LK001", str(e))], False
        if readable and any(p.code == "LK105" for p in problems):
            hint = _other_format_hint(path)
            if hint:
                problems.append(spec.Problem("LK105", hint))
        results.append({"file": path, "readable": readable, "valid": readable and not any(p.is_error for p in problems),
                        "problems": [p.as_dict() for p in problems]})
    return {"valid": all(r["valid"] for r in results), "files": results}


def _other_format_hint(path):
    from ..formats import detect_format
    try:
        fmt = detect_format(path)
    except LorakitError:
        return None
    return f"this is a {fmt.name} adapter: 'lorakit convert {path} --to lorakit' writes it in the spec format"
