"""`lorakit convert`: read any format, write any writable one; every key consumed or reported."""

import os

from ..errors import LorakitError
from ..formats import detect_format, get_format, given, load, save, takes
from ..io import check_output
from .args import existing


def convert(input, output, to, from_=None, base=None, alpha=None, allow_unknown=False, force=False):
    """Convert an adapter between formats. Returns a report with what the reader and writer did. `base` goes to the
    reader and/or the writer that use it (an error when neither does); `alpha` and `allow_unknown` to the reader."""
    input, output = os.fspath(input), os.fspath(output)
    existing(base, "base")
    check_output(output, [input, base], force)
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
    adapter.provenance = {
        **adapter.provenance,
        "operation": "convert",
        "parents": [{"file": os.path.basename(os.path.normpath(input)), "format": src.name}],
    }
    write_options = {"base": base} if base is not None and "base" in takes(dst.write) else {}
    notes = list(adapter.notes) + save(adapter, output, format=dst.name, force=force, **write_options)
    return {
        "input": input,
        "output": output,
        "from": src.name,
        "to": dst.name,
        "module_count": len(adapter.modules),
        "replacement_count": len(adapter.replacements),
        "notes": notes,
    }
