"""The one call from the core outwards, by name: Adapter.save writes through the format registry, which the core
does not import (it is looked up when the first adapter is saved). Torch-free."""

import importlib

WRITERS = "lorakit.formats"  # the module whose save(adapter, path, format, force, **options) writes adapters


def save_adapter(adapter, path, **options):
    return importlib.import_module(WRITERS).save(adapter, path, **options)
