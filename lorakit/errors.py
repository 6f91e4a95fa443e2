"""One exception type for every bad input: the CLI prints its message on one line and exits 2."""


class LorakitError(Exception):
    """A user-facing error. `str(err)` is a single line naming the file, the tensor and what is wrong."""

    def __init__(self, message, *, path=None, tensor=None, code=None):
        self.path, self.tensor, self.code, self.message = path, tensor, code, message
        parts = []
        if path is not None:
            parts.append(str(path))
        if tensor is not None:
            parts.append(f"tensor '{tensor}'")
        prefix = ": ".join(parts)
        tag = f"[{code}] " if code else ""
        super().__init__(f"{prefix}: {tag}{message}" if prefix else f"{tag}{message}")


def with_path(error, path):
    """The same error, naming `path` when it names no file yet (a core check raised it, a reader knows the file)."""
    if error.path is not None:
        return error
    return LorakitError(error.message, path=path, tensor=error.tensor, code=error.code)


# what parsing code raises on a layout it did not foresee; reported as a malformed file (one line naming it), never as
# an internal error
MALFORMED = (
    KeyError,
    ValueError,
    TypeError,
    IndexError,
    AttributeError,
    RuntimeError,
    OverflowError,
    RecursionError,
    ZeroDivisionError,
    EOFError,
    StopIteration,
)


# set by the CLI: messages name options as the caller spells them (--force on the command line, force=True in Python)
CLI = {"active": False}


def opt(name, flag=False, bare=False):
    """An option as the caller spells it: '--ignore-fingerprint' / 'ignore_fingerprint=True', '--alpha' /
    'alpha=...', or bare (for 'rank must be >= 1'): '--rank' / 'rank'."""
    if CLI["active"]:
        return "--" + name.replace("_", "-")
    return name if bare else f"{name}=True" if flag else f"{name}=..."


def missing(path, what=None):
    """'no such file or folder' (a Hugging Face hub id never gets here: lorakit.io.hub resolves or explains it)."""
    return LorakitError(f"{what + ': ' if what else ''}no such file or folder", path=path)


def listed(names, limit=20, sep=", "):
    """The first `limit` names joined, and how many more there are."""
    names = list(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return sep.join(names[:limit]) + more
