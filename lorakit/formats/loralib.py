"""microsoft/LoRA (loralib) `.pt` files: the state dict `lora_state_dict` saves: `<module>.lora_A` [r, in],
`<module>.lora_B` [out, r] (Embedding: lora_A [r, num], lora_B [dim, r], delta transposed); optional biases.
No alpha is stored: the caller gives it. Loaded with torch.load(weights_only=True) only: never arbitrary objects."""

import zipfile

import torch

from ..core import Adapter, Module
from ..errors import LorakitError, opt
from .common import check_rank, refuse_unknown, t_contig


def load_state_dict(path):
    """A flat name -> tensor dict from a torch pickle, refusing anything but plain tensors."""
    import pickle

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile) as e:
        reason = str(e).splitlines()[0][:160]
        raise LorakitError(
            f"not a plain tensor state dict (refusing to unpickle arbitrary objects: {reason})", path=path
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise LorakitError("the pickle is not a flat {name: tensor} state dict", path=path)
    return obj


def detect(probe):
    if probe.magic(2) not in (b"PK", b"\x80\x02"):
        return False
    try:
        keys = load_state_dict(probe.path).keys()
    except LorakitError:
        return True  # a torch pickle we will refuse with a clear message when read
    return any(k.endswith((".lora_A", ".lora_B")) for k in keys)


def read(path, alpha=None, base=None, allow_unknown=False):
    tensors = load_state_dict(path)
    if alpha is None:
        raise LorakitError(
            f"loralib files do not store alpha (scale = alpha / r): pass {opt('alpha')}", path=path
        )
    shapes = base.shapes() if base is not None else None
    parts, replacements, unknown, notes = {}, {}, [], []
    for key, t in tensors.items():
        module, _, part = key.rpartition(".")
        if part in ("lora_A", "lora_B"):
            parts.setdefault(module, {})[part] = t
        elif part == "bias":
            replacements[key] = t
        else:
            unknown.append(key)
    refuse_unknown(path, unknown, allow_unknown, notes)
    ad = Adapter(
        source_format="loralib", notes=notes, provenance={"source_format": "loralib", "alpha": alpha}
    )
    for module, p in sorted(parts.items()):
        if set(p) != {"lora_A", "lora_B"}:
            raise LorakitError(f"module has {' and '.join(p)} only (wrong pairing)", path=path, tensor=module)
        A, B = p["lora_A"], p["lora_B"]
        check_rank(path, module, A, B)
        if A.ndim != 2 or B.ndim != 2:
            raise LorakitError(
                "only Linear and Embedding LoRA layers are supported", path=path, tensor=module
            )
        weight = shapes.get(f"{module}.weight") if shapes else None
        if weight is not None and tuple(weight) == (A.shape[1], B.shape[0]) != (B.shape[0], A.shape[1]):
            ad.add(Module(module, t_contig(B), t_contig(A), alpha=alpha, kind="embedding"))
        else:
            ad.add(Module(module, A, B, alpha=alpha))
        if weight is None and shapes is not None:
            notes.append(f"{module}.weight is not in the base")
    ad.replacements = replacements
    return ad
