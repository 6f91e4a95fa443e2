"""`lorakit extract`: an adapter from the difference of two checkpoints, streamed one tensor at a time."""

import os

import torch

from ..core import Adapter, algebra, default_kind
from ..errors import LorakitError
from ..naming.embeddings import is_embedding
from ..io import check_output
from ..io.dtypes import user_dtype
from ..bases import open_base
from ..options import ExtractOptions, seed_in_range, takes_options
from ..progress import progress
from ..formats import refuse_misnamed
from ..spec import fingerprint
from ..training.lora import matches, refuse_idle_targets, target_list
from .args import local, rank_rule, refuse_adapter_as_base

USAGE = "lorakit extract BASE TUNED -o OUT"  # in refusals


# what extract says of a tensor it does not turn into a module (besides the count of unchanged ones)
OUTCOMES = ("not_targeted", "only_in_tuned", "only_in_base", "shape_changed", "replaced", "not_float")


def _difference(name, cb, ct, targets):
    """Why tensor `name` of the tuned checkpoint gives no delta ('unchanged' or a key of OUTCOMES), or both
    tensors (base, tuned), read once."""
    if name not in cb:
        return "only_in_tuned"
    if cb.shape(name) != ct.shape(name):
        return "shape_changed"
    raw = cb.raw(name)
    if raw is not None and raw == ct.raw(name):
        return "unchanged"
    W0, W1 = cb.get(name), ct.get(name)
    if not (W0.is_floating_point() and W1.is_floating_point()):
        return "not_float"
    # the SVD of a non-finite difference fails, or factors it as NaN
    for W, ckpt in ((W0, cb), (W1, ct)):
        if not bool(torch.isfinite(W).all()):
            raise LorakitError("NaN or Inf values: tuned - base is not finite", path=ckpt.path, tensor=name)
    if torch.equal(W0.float(), W1.float()):
        return "unchanged"
    module_name = name[: -len(".weight")] if name.endswith(".weight") else name
    if targets and not matches(module_name, targets):
        return "not_targeted"
    return W0, W1


def _extract_module(name, W0, W1, adapter, rank, energy, out_dtype, generator):
    """The best low-rank factors of tuned - base for one weight, added to `adapter`; returns its report row."""
    module_name = name[: -len(".weight")]
    kind = "embedding" if W1.ndim == 2 and is_embedding(name) else default_kind(W1.ndim)
    D = W1.float() - W0.float()
    m, stats = algebra.module_of_delta(module_name, D, kind, out_dtype or W1.dtype, rank, energy, generator)
    adapter.add(m)
    return {"module": module_name, **stats}


def _extract_experts(name, W0, W1, base, adapter, rank, energy, out_dtype, generator):
    """One LoRA per expert of a 3-D Mixture-of-Experts tensor [E, rows, cols] (gpt-oss, Llama 4, llama.cpp's
    *_exps): each expert's slice is a linear weight of its own (experts it leaves as they were get none); report
    rows per expert."""
    rows = []
    for e in range(W1.shape[0]):
        if torch.equal(W0[e], W1[e]):
            continue
        D = W1[e].float() - W0[e].float()
        module = base.expert_module(name, e)
        m, stats = algebra.module_of_delta(
            module, D, "linear", out_dtype or W1.dtype, rank, energy, generator
        )
        adapter.add(m)
        rows.append({"module": module, **stats})
    return rows


def _outcomes(report):
    """What became of the tensors that differ in some way but gave no module, for the error that nothing did:
    ' (shape changed: a.weight; only in the tuned checkpoint: b.weight, c.weight)'."""
    words = {
        "shape_changed": "shape changed",
        "not_float": "not floating-point",
        "only_in_tuned": "only in the tuned checkpoint",
        "only_in_base": "only in the base",
        "not_targeted": "changed but not targeted",
    }
    parts = [
        f"{words[k]}: {', '.join(report[k][:3])}{f' and {len(report[k]) - 3} more' if len(report[k]) > 3 else ''}"
        for k in words
        if report[k]
    ]
    return f" ({'; '.join(parts)})" if parts else ""


def _check_options(rank, energy, seed):
    """Refuse (never clamp) what extract's options cannot be (ExtractOptions leaves it to the command)."""
    if rank is None and energy is None:
        raise LorakitError("give --rank or --energy")
    rank_rule(rank=rank, energy=energy)
    seed_in_range(seed)


def _opened(base, tuned, targets):
    """The two checkpoints opened; an adapter given for either refused (there is nothing to extract from it), and
    a target pattern that names no tensor of them."""
    opened = open_base(base), open_base(tuned)
    for role, ckpt in zip(("BASE", "TUNED"), opened):
        refuse_adapter_as_base(
            ckpt, USAGE, role, "extract compares two model checkpoints (merge an adapter first)"
        )
    if targets:
        names = [n.removesuffix(".weight") for n in opened[1].view.names]
        refuse_idle_targets(targets, names, "tensor of the checkpoints")
    return opened


@takes_options(ExtractOptions, unpack=True)
def extract(base, tuned, output, *, rank, energy, targets, seed, dtype, force, quiet):
    """Extract a LoRA from tuned - base. Every tensor is reported: extracted, unchanged, replaced (changed 1-D
    tensors are stored exactly as replacements), not targeted, or only in one checkpoint."""
    _check_options(rank, energy, seed)
    base, tuned = local(base, "base", quiet), local(tuned, "base", quiet)
    check_output(output, [base, tuned], force, directory=False)
    refuse_misnamed("lorakit", output)  # now, not after the SVDs
    targets = target_list(targets)
    base_ckpt, tuned_ckpt = _opened(base, tuned, targets)
    cb, ct = base_ckpt.view, tuned_ckpt.view  # quantized checkpoints are read dequantized
    out_dtype = None if dtype == "keep" else user_dtype(dtype)
    adapter = Adapter(
        base_model=base_ckpt.name,
        base_fingerprint=fingerprint(base_ckpt.shapes()),
        base_identity=base_ckpt.identity,
    )
    rows, report = [], {"unchanged": 0, **{k: [] for k in OUTCOMES}}
    generator = torch.Generator().manual_seed(seed)
    total = sum(ct.nbytes(n) for n in ct.names)
    with progress(total=total, quiet=quiet, desc="extract", unit="B", unit_scale=True) as bar:
        for name in ct.names:
            bar.update(ct.nbytes(name))
            outcome = _difference(name, cb, ct, targets)
            if outcome == "unchanged":
                report["unchanged"] += 1
            elif isinstance(outcome, str):
                report[outcome].append(name)
            elif outcome[1].ndim == 3 and base_ckpt.expert_module(name, 0) is not None:
                rows += _extract_experts(
                    name, *outcome, base_ckpt, adapter, rank, energy, out_dtype, generator
                )
            elif outcome[1].ndim < 2 or not name.endswith(".weight"):
                W1 = outcome[1]
                adapter.replacements[name] = W1.clone() if out_dtype is None else W1.to(out_dtype)
                report["replaced"].append(name)
            else:
                rows.append(_extract_module(name, *outcome, adapter, rank, energy, out_dtype, generator))
    for name in cb.names:
        if name not in ct:
            report["only_in_base"].append(name)
    if not adapter.modules and not adapter.replacements:
        raise LorakitError(
            "nothing to extract: no targeted tensor differs between the checkpoints" + _outcomes(report),
            path=tuned,
        )
    adapter.provenance = _provenance(base, tuned, rank, energy, targets, seed)
    adapter = base_ckpt.from_base_names(adapter)  # a GGUF's llama.cpp names back to Hugging Face's
    adapter.save(output, force=force)
    kept = [r["energy_kept"] for r in rows]
    return {
        "output": os.fspath(output),
        "base": os.fspath(base),
        "tuned": os.fspath(tuned),
        "module_count": len(rows),
        "modules": rows,
        "notes": [],
        **report,
        "mean_energy_kept": sum(kept) / len(kept) if kept else 1.0,
    }


def _provenance(base, tuned, rank, energy, targets, seed):
    return {
        "operation": "extract",
        "parents": [
            {"file": os.path.basename(os.path.normpath(os.fspath(p))), "role": r}
            for p, r in ((base, "base"), (tuned, "tuned"))
        ],
        "params": {"rank": rank, "energy": energy, "targets": targets, "seed": seed},
    }
