"""lorakit: LoRA adapters, exactly. `lorakit.load`, `Adapter.save`, and one function per CLI command.

Attributes are imported lazily so that `import lorakit` (and `lorakit --help`) does not import torch.
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


def __getattr__(name):
    if name in _LAZY:
        import importlib
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lorakit' has no attribute '{name}'")
