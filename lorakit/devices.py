"""Which torch device a command computes on: `auto` takes the first of its kinds this machine has; a named one is
refused in words when it is malformed or absent here (never a fall-back to another)."""

import os

from .errors import LorakitError


def pick_device(device, kinds=("cuda", "mps", "cpu")):
    """The torch.device `device` names ("auto", "cpu", "cuda", "cuda:1", "mps"), among `kinds`."""
    import torch

    if device == "auto":
        return torch.device(next(k for k in kinds if available(k)))
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        chosen = None
    if chosen is None or chosen.type not in kinds:
        raise LorakitError(
            f"--device is auto or one of {', '.join(kinds)} (cuda:N for one GPU), not '{device}'"
        )
    if not available(chosen.type):
        raise LorakitError(
            f"--device {device}: torch {torch.__version__} sees no {chosen.type.upper()} device here"
        )
    if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise LorakitError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return chosen


def available(kind):
    import torch

    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "mps":
        return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return kind == "cpu"


def device_memory(dev=None):
    """All the memory of the device (bytes; None where unknown): a CUDA device's, else (or with no device) the
    machine's RAM."""
    if dev is not None and dev.type == "cuda":
        import torch

        return torch.cuda.get_device_properties(dev).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
