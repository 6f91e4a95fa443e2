"""Helpers shared by the format readers and writers (the key bookkeeping every format needs)."""

from ..errors import LorakitError, opt
from ..io import TensorFile, read_header


def open_safetensors(path):
    """(TensorFile, metadata) of a safetensors file, with a clean error for anything else."""
    header = read_header(path)
    return TensorFile(path, header), header.metadata


def refuse_unknown(path, unknown, allow_unknown, notes, what="keys"):
    """Every input key is consumed or reported: unknown keys are an error unless allow_unknown (then a note)."""
    if not unknown:
        return
    shown = ", ".join(sorted(unknown)[:8]) + (f" (+{len(unknown) - 8} more)" if len(unknown) > 8 else "")
    if not allow_unknown:
        raise LorakitError(
            f"{len(unknown)} unknown {what}: {shown} ({opt('allow_unknown', True)} to read the rest)",
            path=path,
        )
    notes.append(f"skipped {len(unknown)} unknown {what}: {shown}")


def refuse_deltas(adapter, what, path):
    """Full-tensor additive deltas (ComfyUI .diff / .diff_b) have no place in most formats: refused, never dropped."""
    if adapter.deltas:
        name = next(iter(adapter.deltas))
        raise LorakitError(
            f"{what} files hold no full-tensor deltas ({len(adapter.deltas)} here, e.g. {name}): "
            "convert to lorakit or comfyui to keep them",
            path=path,
        )


def refuse_padding(adapter, what, path):
    """A module that widens its base weight (Module.pads_base) has no place in most formats: refused, never
    written as an ordinary LoRA that a consumer would reject or misapply."""
    name = next((n for n, m in adapter.modules.items() if m.pads_base), None)
    if name is not None:
        raise LorakitError(
            f"{what} files cannot say that a LoRA widens its base weight (to {list(adapter.modules[name].shape)}): "
            "convert to lorakit, comfyui or diffusers to keep it",
            path=path,
            tensor=name,
        )


def refuse_transforms(adapter, path):
    """Multiplicative modules (PEFT IA3, HRA, OFT, BOFT) have no place in any adapter file: refused, never dropped."""
    if adapter.transforms:
        name = next(iter(adapter.transforms))
        raise LorakitError(
            f"{len(adapter.transforms)} module(s) change W multiplicatively (e.g. {name}): no adapter file holds "
            "them; merge them, or convert with --base to write W' - W as a LoRA",
            path=path,
            code="LK402",
        )


def check_rank(path, module, A, B):
    if A.shape[0] != B.shape[1]:
        raise LorakitError(
            f"down/A factor has rank {A.shape[0]} but up/B factor has rank {B.shape[1]} "
            f"(shapes {list(A.shape)} and {list(B.shape)})",
            path=path,
            tensor=module,
        )


def most_common(values):
    from collections import Counter

    return Counter(values).most_common(1)[0][0]


def t_contig(t):
    """A transposed factor, stored contiguous (safetensors writes row-major bytes)."""
    return t.transpose(0, 1).contiguous()


def fold_note(notes, what):
    notes.append(f"{what}: the scale was folded into the factors (within 1 ulp of the output dtype)")


def checked_base_copies(adapter, copies, base, path, what):
    """Notes on skipping `copies`: compared with the base when it is given (a resized vocabulary differs, and is
    refused, naming the tensor), else skipped with a note saying they were not compared."""
    if not copies:
        return []
    if base is None:
        return [
            f"skipped {len(copies)} copy(ies) of base weights PEFT saved beside their LoRA ({copies[0]}); not "
            "compared with the base (no --base)"
        ]
    for name in copies:
        copy = adapter.replacements[name]
        if name not in base or not (base.get(name).to(copy.dtype) == copy).all():
            raise LorakitError(
                f"the adapter's copy of this base weight differs from the base (a resized vocabulary?): {what} "
                "cannot hold it",
                path=path,
                tensor=name,
            )
    return [
        f"skipped {len(copies)} copy(ies) of base weights PEFT saved beside their LoRA ({copies[0]}): equal to the base"
    ]
