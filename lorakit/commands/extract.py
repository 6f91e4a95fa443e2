"""`lorakit extract`: an adapter from the difference of two checkpoints, streamed one tensor at a time."""

import os

import torch

from ..core import Adapter, algebra, default_kind
from ..errors import LorakitError
from ..naming.embeddings import is_embedding
from ..io import check_output
from ..io.dtypes import user_dtype
from ..bases import open_base
from ..progress import progress
from ..spec import fingerprint
from ..training.lora import matches, target_list
from .args import rank_rule


def extract(
    base, tuned, output, rank=None, energy=None, targets=None, dtype="keep", seed=0, force=False, quiet=False
):
    """Extract a LoRA from tuned - base. Every tensor is reported: extracted, unchanged, replaced (changed 1-D
    tensors are stored exactly as replacements), not targeted, or only in one checkpoint."""
    if rank is None and energy is None:
        raise LorakitError("give --rank or --energy")
    rank_rule(rank=rank, energy=energy)
    check_output(output, [base, tuned], force, directory=False)
    targets = target_list(targets)
    base_ckpt = open_base(base)
    cb, ct = base_ckpt.view, open_base(tuned).view  # quantized checkpoints are read dequantized
    out_dtype = None if dtype == "keep" else user_dtype(dtype)
    adapter = Adapter(
        base_model=base_ckpt.name,
        base_fingerprint=fingerprint(base_ckpt.shapes()),
        base_identity=base_ckpt.identity,
    )
    rows, report = (
        [],
        {
            "unchanged": 0,
            "not_targeted": [],
            "only_in_tuned": [],
            "only_in_base": [],
            "shape_changed": [],
            "replaced": [],
            "not_float": [],
        },
    )
    generator = torch.Generator().manual_seed(seed)
    with progress(
        total=sum(ct.nbytes(n) for n in ct.names), quiet=quiet, desc="extract", unit="B", unit_scale=True
    ) as bar:
        for name in ct.names:
            bar.update(ct.nbytes(name))
            if name not in cb:
                report["only_in_tuned"].append(name)
                continue
            if cb.shape(name) != ct.shape(name):
                report["shape_changed"].append(name)
                continue
            raw = cb.raw(name)
            if raw is not None and raw == ct.raw(name):
                report["unchanged"] += 1
                continue
            W0, W1 = cb.get(name), ct.get(name)
            if not (W0.is_floating_point() and W1.is_floating_point()):
                report["not_float"].append(name)
                continue
            if torch.equal(W0.float(), W1.float()):
                report["unchanged"] += 1
                continue
            module_name = name[: -len(".weight")] if name.endswith(".weight") else name
            if targets and not matches(module_name, targets):
                report["not_targeted"].append(name)
                continue
            if W1.ndim < 2 or not name.endswith(".weight"):
                adapter.replacements[name] = W1.clone() if out_dtype is None else W1.to(out_dtype)
                report["replaced"].append(name)
                continue
            D = W1.float().flatten(1) - W0.float().flatten(1)
            B2, A2, stats = algebra.extract_matrix(D, rank=rank, energy=energy, generator=generator)
            kind = "embedding" if W1.ndim == 2 and is_embedding(name) else default_kind(W1.ndim)
            adapter.add(
                algebra.module_from_factors(module_name, tuple(W1.shape), kind, B2, A2, out_dtype or W1.dtype)
            )
            rows.append({"module": module_name, **stats})
    for name in cb.names:
        if name not in ct:
            report["only_in_base"].append(name)
    if not adapter.modules and not adapter.replacements:
        raise LorakitError(
            "nothing to extract: no targeted tensor differs between the checkpoints", path=tuned
        )
    adapter.provenance = {
        "operation": "extract",
        "parents": [
            {"file": os.path.basename(os.path.normpath(os.fspath(p))), "role": r}
            for p, r in ((base, "base"), (tuned, "tuned"))
        ],
        "params": {"rank": rank, "energy": energy, "targets": targets, "seed": seed},
    }
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
