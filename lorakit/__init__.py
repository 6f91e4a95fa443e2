"""lorakit: LoRA adapters, exactly.

    ad = lorakit.load("adapter.safetensors")   # any format, detected from the content
    ad.save("out.safetensors")                 # the lorakit spec format (or format="peft", "kohya", ...)

One function per CLI command, with the same name and parameters (`lorakit merge` is `lorakit.merge()`): inspect,
validate, convert, combine, resize, diff, extract, merge, train, demo. Each returns its report as a dict (what
`--json` prints) and raises LorakitError, a one-line message naming the file and tensor, on bad input. Adapter and
Module are the in-memory model. Attributes are imported lazily: `import lorakit` does not import torch.
"""

from ._version import __version__

_LAZY = {
    "load": ("lorakit.formats", "load"),
    "Adapter": ("lorakit.core", "Adapter"),
    "Module": ("lorakit.core", "Module"),
    "LorakitError": ("lorakit.errors", "LorakitError"),
    "inspect": ("lorakit.commands.inspect", "inspect"),
    "validate": ("lorakit.commands.validate", "validate"),
    "demo": ("lorakit.commands.demo", "demo"),
    "combine": ("lorakit.commands.algebra", "combine"),
    "resize": ("lorakit.commands.algebra", "resize"),
    "diff": ("lorakit.commands.algebra", "diff"),
    "extract": ("lorakit.commands.extract", "extract"),
    "merge": ("lorakit.commands.merge", "merge"),
    "convert": ("lorakit.commands.convert", "convert"),
    "train": ("lorakit.commands.train", "train"),
}

__all__ = ["__version__", *_LAZY]


def __dir__():
    return sorted(__all__)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lorakit' has no attribute '{name}'")
