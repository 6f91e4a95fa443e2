"""`lorakit convert`: read any format, write any writable one; every key consumed or reported."""
import os

from ..errors import LorakitError
from ..formats import REGISTRY, detect_format, get_format


def convert(input, output, to, from_=None, base=None, alpha=None, allow_unknown=False, force=False, **options):
    """Convert an adapter between formats. Returns a report with what the reader and writer did."""
    src = get_format(from_) if from_ else detect_format(os.fspath(input))
    dst = get_format(to)
    if src.read is None:
        raise LorakitError(f"format '{src.name}' cannot be read", path=input)
    if dst.write is None:
        writable = ", ".join(sorted(n for n, f in REGISTRY.items() if f.write))
        raise LorakitError(f"format '{dst.name}' cannot be written (writable: {writable})")
    adapter = src.read(os.fspath(input), base=base, alpha=alpha, allow_unknown=allow_unknown, **options)
    adapter.provenance = {**adapter.provenance, "operation": "convert",
                          "parents": [{"file": os.path.basename(os.path.normpath(os.fspath(input))),
                                       "format": src.name}]}
    dst.write(adapter, os.fspath(output), force=force, base=base, **options)
    return {"input": os.fspath(input), "output": os.fspath(output), "from": src.name, "to": dst.name,
            "modules": len(adapter.modules), "replacements": len(adapter.replacements), "notes": adapter.notes}
