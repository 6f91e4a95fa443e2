"""Argument parsing shared by the commands (not a command itself)."""
import os
import re

from ..errors import LorakitError


def parse_weighted(spec):
    """'path:0.5' -> ('path', 0.5); a path without a numeric suffix has weight 1 (paths may contain ':')."""
    if isinstance(spec, (tuple, list)):
        return os.fspath(spec[0]), float(spec[1])
    spec = os.fspath(spec)
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return spec, 1.0


def parse_size(text):
    """'5GB', '500MB', '2GiB', '1000000' -> bytes."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(I?)B?\s*", str(text).upper())
    if not m:
        raise LorakitError(f"cannot read shard size '{text}' (e.g. 5GB, 500MB, 2GiB)")
    power = "KMGT".find(m.group(2)) + 1 if m.group(2) else 0
    return int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** power)
