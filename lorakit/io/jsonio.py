"""JSON from untrusted files: duplicate keys, absurd nesting and huge numbers are errors naming the file, never a
crash or a silently dropped value."""

import json

from ..errors import LorakitError


def _no_duplicates(duplicates):
    """An object_pairs_hook: a duplicate key is an error, or (a `duplicates` list given) noted there, the first value
    kept."""

    def hook(pairs):
        seen = {}
        for key, value in pairs:
            if key in seen:
                if duplicates is None:
                    raise ValueError(f"duplicate key '{key}'")
                duplicates.append(key)
                continue
            seen[key] = value
        return seen

    return hook


def parse_json(text, path, what="file", code=None, expect=dict, duplicates=None):
    """The JSON value of `text` (str or bytes), which must be an `expect` (dict by default; None: anything).
    `duplicates`: a list that collects duplicate keys instead of refusing them."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        value = json.loads(text, object_pairs_hook=_no_duplicates(duplicates))
    except UnicodeDecodeError:
        raise LorakitError(f"{what} is not UTF-8 text", path=path, code=code) from None
    except json.JSONDecodeError as e:
        raise LorakitError(
            f"{what} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})", path=path, code=code
        ) from None
    except RecursionError:
        raise LorakitError(f"{what} is not usable JSON (nested too deeply)", path=path, code=code) from None
    except ValueError as e:  # duplicate keys, integers of thousands of digits
        raise LorakitError(f"{what} is not usable JSON ({e})", path=path, code=code) from None
    if expect is not None and not isinstance(value, expect):
        kind = {dict: "a JSON object", list: "a JSON array", str: "a JSON string"}.get(
            expect, expect.__name__
        )
        raise LorakitError(f"{what} must be {kind}, not {type(value).__name__}", path=path, code=code)
    return value


def read_json(path, what=None, expect=dict):
    """A JSON file's value."""
    try:
        with open(path, "rb") as f:
            text = f.read(100_000_000 + 1)
    except OSError as e:
        raise LorakitError(f"cannot read: {e.strerror or e}", path=path) from None
    if len(text) > 100_000_000:
        raise LorakitError("JSON file over 100 MB: refusing to parse it", path=path)
    return parse_json(text, path, what or "file", expect=expect)
