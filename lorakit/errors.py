"""One exception type for every bad input: the CLI prints its message on one line and exits 2."""


class LorakitError(Exception):
    """A user-facing error. `str(err)` is a single line naming the file, the tensor and what is wrong."""

    def __init__(self, message, *, path=None, tensor=None, code=None):
        self.path, self.tensor, self.code = path, tensor, code
        parts = []
        if path is not None:
            parts.append(str(path))
        if tensor is not None:
            parts.append(f"tensor '{tensor}'")
        prefix = ": ".join(parts)
        tag = f"[{code}] " if code else ""
        super().__init__(f"{prefix}: {tag}{message}" if prefix else f"{tag}{message}")
