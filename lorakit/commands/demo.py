"""`lorakit demo`: a new user's first minute. A tiny Llama-style base in a temp folder, a LoRA trained on a built-in
synthetic task in seconds on the CPU, then validated, inspected and merged, and the merged model checked."""

import os
import tempfile


def demo(keep=None, quiet=False, echo=print):
    """Run the demo; returns a dict of what it made and found. Its files go to `keep`, or to a temporary folder that
    is removed at the end."""
    if keep:
        _check_keep(os.fspath(keep))
        return _demo(keep, quiet, echo)
    with tempfile.TemporaryDirectory(prefix="lorakit-demo-") as folder:
        return _demo(folder, quiet, echo)


MADE = {"base", "data.npy", "adapter.safetensors", "merged"}  # what the demo writes into its folder


def _check_keep(folder):
    """--keep takes a new or empty folder, or one an earlier demo made (its files are replaced): never a file, nor a
    folder with other files in it."""
    from ..errors import LorakitError

    if os.path.lexists(folder) and not os.path.isdir(folder):
        raise LorakitError(
            "is not a folder: --keep takes a folder (new, empty, or an earlier demo's)", path=folder
        )
    others = sorted(set(os.listdir(folder)) - MADE) if os.path.isdir(folder) else []
    if others:
        raise LorakitError(
            f"holds other files ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}): the demo writes "
            f"{', '.join(sorted(MADE))} into it; give a new or empty folder",
            path=folder,
        )


def _demo(folder, quiet, echo):

    from .. import examples
    from ..render import inspect_text, merge_text, train_text, validate_text
    from .inspect import inspect
    from .merge import merge
    from .train import train
    from .validate import validate

    os.makedirs(folder, exist_ok=True)
    base, data = examples.write_permutation_task(folder)
    adapter_path = os.path.join(folder, "adapter.safetensors")
    targets = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    echo(f"# a tiny Llama-style base in {base} and a synthetic next-token task in {data}\n")
    echo(
        f"$ lorakit train --base base --data data.npy -o adapter.safetensors --rank 8 --targets {targets} "
        "--steps 120 --lr 3e-3 --batch 16 --seq-len 32"
    )
    trained = train(
        base,
        data,
        adapter_path,
        rank=8,
        alpha=16,
        targets=targets,
        steps=120,
        lr=3e-3,
        batch=16,
        seq_len=32,
        eval_every=40,
        force=True,
        quiet=quiet,
    )
    echo(train_text(trained))

    echo("\n$ lorakit validate adapter.safetensors")
    report = validate([adapter_path])
    echo(validate_text(report))
    echo("\n$ lorakit inspect adapter.safetensors --spectrum --base base")
    summary = inspect(adapter_path, spectrum=True, base=base, quiet=True)
    echo(inspect_text(summary))

    merged_dir = os.path.join(folder, "merged")
    echo("\n$ lorakit merge base adapter.safetensors -o merged")
    merged = merge(base, [adapter_path], merged_dir, force=True, quiet=True)
    echo(merge_text(merged))

    diff = _max_logit_difference(base, merged_dir, adapter_path, targets)
    echo(f"\n# merged model vs base + adapter: max |logits difference| = {diff:.2e}")
    return {
        "folder": folder,
        "base": base,
        "adapter": adapter_path,
        "valid": report["valid"],
        "train": trained,
        "inspect": summary,
        "merge": merged,
        "max_logit_diff": diff,
    }


def _max_logit_difference(base, merged_dir, adapter_path, targets):
    """The merged checkpoint computes what base + adapter computes: the largest logit difference on random ids."""
    import torch

    from ..formats import load
    from ..training import lora
    from ..training.model import LlamaForCausalLM

    ids = torch.randint(0, 64, (1, 24), generator=torch.Generator().manual_seed(0))
    model = LlamaForCausalLM.from_pretrained(base)
    lora.inject(model, targets, rank=8, alpha=16)
    lora.load_into(model, load(adapter_path))
    with torch.no_grad():
        return (LlamaForCausalLM.from_pretrained(merged_dir)(ids) - model(ids)).abs().max().item()
