"""Format registry: each adapter format is a reader and/or writer keyed by name, detected from file content.

A format module registers itself with `register(Format(...))`; the core never imports a format directly.
"""
import os
from dataclasses import dataclass
from typing import Callable

from ..errors import LorakitError


@dataclass
class Format:
    name: str
    detect: Callable  # (path) -> bool, looking at content, never at the file name
    read: Callable = None  # (path, **options) -> Adapter
    write: Callable = None  # (adapter, path, force=False, **options) -> None
    description: str = ""
    priority: int = 10  # detection order: lower first (the spec format before formats it could resemble)


REGISTRY = {}


def register(fmt):
    REGISTRY[fmt.name] = fmt
    return fmt


def _load_builtin():
    from . import diffusers, gguf_lora, kohya, loralib, lorakit_v1, peft  # noqa: F401  (each registers itself)


ALIASES = {"lycoris": "kohya", "sd-scripts": "kohya", "llama.cpp": "gguf", "microsoft-lora": "loralib"}


def get_format(name):
    _load_builtin()
    name = ALIASES.get(name, name)
    if name not in REGISTRY:
        raise LorakitError(f"unknown format '{name}' (known: {', '.join(sorted(REGISTRY))})")
    return REGISTRY[name]


def detect_format(path):
    """The registered format whose detector accepts the content at `path`."""
    _load_builtin()
    if not os.path.exists(path):
        raise LorakitError("no such file or folder", path=path)
    for fmt in sorted(REGISTRY.values(), key=lambda f: f.priority):
        if fmt.detect(path):
            return fmt
    if os.path.isfile(path):
        from ..io import read_header
        read_header(path)  # a broken safetensors file: raise its precise defect rather than "not recognized"
    raise LorakitError(f"not a recognized adapter (known formats: {', '.join(sorted(REGISTRY))})", path=path)


def load(path, format=None, **options):
    """Read an adapter in any registered format (auto-detected from content unless `format` is given)."""
    path = os.fspath(path)
    fmt = get_format(format) if format else detect_format(path)
    if fmt.read is None:
        raise LorakitError(f"format '{fmt.name}' cannot be read", path=path)
    return fmt.read(path, **options)
