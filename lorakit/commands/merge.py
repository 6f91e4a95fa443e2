"""`lorakit merge`: adapters into a base checkpoint, streamed tensor by tensor with bounded memory (the engine is
lorakit.engine; this checks the arguments and reports)."""

import os

from ..errors import LorakitError, opt
from ..engine.gguf import GGUFWriter, output_files
from ..io import Checkpoint, atomic_output, atomic_outputs, check_output, read_config
from ..io.gguf import GGUFCheckpoint, is_gguf
from ..io.dtypes import user_dtype
from ..progress import progress
from ..quant import STRATEGIES
from .args import existing, in_range, load_inputs, parse_size, paths, weighted_inputs


def merge(
    base,
    adapters,
    output,
    dtype="keep",
    unmerge=False,
    shard_size=None,
    threads=None,
    force=False,
    quiet=False,
    ignore_fingerprint=False,
    strategy="feedback",
    full_precision_base=None,
    onto="dequantized",
    seed=0,
    skip_unmatched=False,
):
    """Merge adapters (`path` or `path:weight`) into `base`: W' = W + sum_i w_i * scale_i * B_i @ A_i, in fp32,
    rounded once. Writes `output` in the base's layout (file or folder). Quantized bases (FP8, INT8, GPTQ, AWQ,
    NF4) are written back in their format with `strategy` (lorakit.quant.STRATEGIES), or dequantized with `dtype`;
    the report then says how much of each adapter module survived. `skip_unmatched`: adapter tensors the base does not
    have are skipped and listed in the report (an error otherwise). Returns a report."""
    from ..engine import pipeline
    from ..engine.plan import plan_merge
    from ..quant.view import WeightView

    _large_buffers_back_to_os()
    base = os.fspath(existing(base, "BASE"))
    existing(full_precision_base, "full_precision_base")
    inputs = weighted_inputs(adapters)
    in_range("threads", threads, 1, integer=True)
    if strategy not in STRATEGIES:
        raise LorakitError(f"unknown strategy '{strategy}' (choose from {', '.join(STRATEGIES)})")
    if onto not in ("dequantized", "original"):
        raise LorakitError(f"--onto is 'dequantized' or 'original', not '{onto}'")
    check_output(output, [base, full_precision_base, *paths(inputs)], force)
    _refuse_adapter_as_base(base)
    if os.path.isfile(os.path.join(base, "model_index.json")):
        return _merge_pipeline(
            base,
            inputs,
            output,
            force,
            skip_unmatched,
            dict(
                dtype=dtype,
                unmerge=unmerge,
                shard_size=shard_size,
                threads=threads,
                quiet=quiet,
                ignore_fingerprint=ignore_fingerprint,
                strategy=strategy,
                onto=onto,
                seed=seed,
            ),
        )
    view = WeightView(base)  # quantized modules seen as their full-precision weights
    gguf = isinstance(view.ckpt, GGUFCheckpoint)
    if gguf and view.ckpt.kv.get("general.type") == "adapter":
        raise LorakitError(
            "BASE is a llama.cpp LoRA adapter (general.type = adapter), not a model: did you swap BASE "
            "and ADAPTER? (lorakit merge BASE ADAPTER[:WEIGHT]... -o OUT)",
            path=base,
        )
    loaded = load_inputs(inputs, base)  # names resolved against the base (kohya's are lossy)
    if gguf:  # llama.cpp's tensor names and Q/K row order
        from ..formats.gguf_lora import gguf_modules

        loaded = [(p, gguf_modules(ad, view.ckpt.kv, base), w) for p, ad, w in loaded]
        if os.fspath(output).endswith(".safetensors"):
            raise LorakitError(
                "the base is GGUF, so the output is GGUF: -o names a .safetensors file", path=output
            )
    # a single file's config.json is the one beside it; a GGUF's own KVs are its config
    config = None if gguf else read_config(base if os.path.isdir(base) else os.path.dirname(base))
    plans, untie_embed, skipped = plan_merge(
        view,
        loaded,
        unmerge,
        bool(config and config.get("tie_word_embeddings")),
        ignore_fingerprint,
        skip_unmatched,
    )
    if skipped and not any(p.touched for p in plans.values()):
        raise LorakitError(
            f"none of the adapter tensors is in the base ({len(skipped)} skipped, e.g. {skipped[0]}): "
            "is this the right base?",
            path=base,
        )
    target_dtype = user_dtype(dtype) if dtype not in (None, "keep") else None
    full = _full_precision(full_precision_base, gguf)
    dequantize = _gguf_dequantized(view, plans, target_dtype) if gguf else None
    job = pipeline.MergeJob(
        view, plans, -1.0 if unmerge else 1.0, target_dtype, strategy, full, onto, seed, dequantize
    )
    if job.requantizes and (strategy == "original" or onto == "original") and full is None:
        raise LorakitError("--strategy original and --onto original need --full-precision-base", path=base)
    if gguf:
        if shard_size is not None:
            raise LorakitError(
                f"{opt('shard_size')} re-shards safetensors folders; a GGUF output keeps the base's splits",
                path=base,
            )
        outputs = output_files(output, len(view.ckpt.files))
        for path in outputs:
            check_output(path, [base, full_precision_base, *paths(inputs), *view.ckpt.files], force)
        writer = GGUFWriter(job, outputs)
        destination = atomic_outputs(outputs, force=force)
    else:
        writer = pipeline.SafetensorsWriter(job, base, untie_embed, parse_size(shard_size))
        if writer.folder and os.fspath(output).endswith(".safetensors"):
            raise LorakitError(
                "the base is a folder, so the output is a folder (shards, index, config.json, "
                "tokenizer): -o names a .safetensors file; give a folder name",
                path=output,
            )
        destination = atomic_output(output, force=force, directory=writer.folder)
    total = writer.total
    with (
        destination as tmp,
        progress(total=total, quiet=quiet, desc="merge", unit="B", unit_scale=True) as bar,
    ):
        try:
            pipeline.run(job, writer, tmp, threads or default_threads(), bar)
        except OSError as e:
            raise LorakitError(f"cannot write the output: {e.strerror or e}", path=output) from None
    notes = _embedding_notes(view, plans, config) + _base_notes(base, view, loaded)
    if gguf:
        for key, row in job.survival.items():  # each survival row says the tensor's GGML type
            row["type"] = view.ckpt.entry(f"{key}.weight").dtype
        notes += _gguf_notes(view, plans, job, dtype)
    if skipped:
        notes.append(
            f"skipped {len(skipped)} adapter tensor(s) not in the base (--skip-unmatched): {_listed(skipped)}"
        )
    if untie_embed:
        notes.append(
            f"tied embeddings: the adapter changes {untie_embed} / lm_head.weight; both were written and "
            "tie_word_embeddings set to false in config.json"
        )
    report = {
        "output": os.fspath(output),
        "base": base,
        "adapters": [{"file": p, "weight": w} for p, _, w in loaded],
        "unmerge": unmerge,
        "tensor_count": sum(len(s) for _, s in writer.shards),
        "merged_count": sum(p.touched for p in plans.values()),
        "shard_count": len(writer.shards) if writer.folder or gguf else 1,
        "bytes": total,
        "dtype": dtype or "keep",
        "skipped": skipped,
        "notes": notes,
    }
    if gguf:
        report["files"] = [spec[0] for spec in writer.shards]
    if view.quantized:
        report["quantization"] = _survival_summary(
            view.handler, strategy, job.survival, job.dequantize_out, notes
        )
    return report


def _merge_pipeline(base, inputs, output, force, skip_unmatched, options):
    """A diffusers pipeline folder: each component folder (unet/, transformer/, text_encoder/...) merged with the
    modules under its name, everything else copied; one atomic output folder."""
    import shutil
    from ..core import Adapter
    from ..formats.diffusers import split_components

    loaded = load_inputs(inputs, base)  # kohya names resolve to unet.*, text_encoder.*, ...
    parts, skipped = {}, []
    for path, ad, w in loaded:
        split, outside = split_components(ad)
        if outside and os.path.isdir(os.path.join(base, "transformer")):
            # original DiT names (BFL, Wan, ...): the transformer's plan cuts them into its diffusers tensors
            split.setdefault("transformer", Adapter()).modules.update(
                {n: m for n, m in ad.modules.items() if f"{n}.weight" in outside}
            )
            outside = [n for n in outside if n[: -len(".weight")] not in ad.modules]
        skipped += outside
        for c, sub in split.items():
            if os.path.isdir(os.path.join(base, c)):
                parts.setdefault(c, []).append((sub, w))
            else:
                skipped += [f"{n}.weight" for n in sub.modules] + list(sub.replacements) + list(sub.deltas)
    if skipped and not skip_unmatched:
        raise LorakitError(
            f"{len(skipped)} adapter tensor(s) are in no component of the pipeline: "
            f"{', '.join(skipped[:6])} ({opt('skip_unmatched', True)} merges the rest)",
            path=base,
        )
    if not parts:
        raise LorakitError("none of the adapter tensors is in a component of the pipeline", path=base)
    reports = {}
    with atomic_output(output, force=force, directory=True) as tmp:
        for entry in sorted(os.listdir(base)):
            src, dst = os.path.join(base, entry), os.path.join(tmp, entry)
            if entry in parts:
                reports[entry] = merge(src, parts[entry], dst, skip_unmatched=skip_unmatched, **options)
            elif os.path.isdir(src):
                shutil.copytree(src, dst)
            else:
                shutil.copy2(src, dst)
    notes = [f"{c}: {n}" for c, r in reports.items() for n in r["notes"]]
    if skipped:
        notes.append(f"skipped {len(skipped)} adapter tensor(s) in no component: {_listed(skipped)}")
    return {
        "output": os.fspath(output),
        "base": base,
        "adapters": [{"file": p, "weight": w} for p, _, w in loaded],
        "unmerge": options["unmerge"],
        "components": {c: r["merged_count"] for c, r in reports.items()},
        "tensor_count": sum(r["tensor_count"] for r in reports.values()),
        "merged_count": sum(r["merged_count"] for r in reports.values()),
        "shard_count": sum(r["shard_count"] for r in reports.values()),
        "bytes": sum(r["bytes"] for r in reports.values()),
        "dtype": options["dtype"] or "keep",
        "skipped": skipped + [s for r in reports.values() for s in r["skipped"]],
        "notes": notes,
    }


def _full_precision(path, gguf):
    """--full-precision-base: a checkpoint with the base's tensor names (for a GGUF base, the F16 / F32 / BF16 GGUF it
    was quantized from: llama.cpp's names and row order)."""
    if not path:
        return None
    if gguf != is_gguf(path):
        raise LorakitError(
            "--full-precision-base must name its tensors as the base does: "
            + (
                "a GGUF base takes the F16 / F32 / BF16 GGUF it was quantized from"
                if gguf
                else "a safetensors checkpoint for a safetensors base"
            ),
            path=path,
        )
    return GGUFCheckpoint(path) if gguf else Checkpoint(path)


def _gguf_dequantized(view, plans, target_dtype):
    """A GGUF base's merged tensors whose GGML type has no codec here (IQ*, TQ*, ...): written in --dtype, as
    llama.cpp's export-lora writes F16; an error naming the tensor and its type without it."""
    from ..quant.gguf import TYPES, no_codec

    keys = sorted(
        k
        for k, p in plans.items()
        if p.touched and k in view.quantized and view.ckpt.entry(k).dtype not in TYPES
    )
    if keys and target_dtype is None:
        raise no_codec(view.path, keys[0], view.ckpt.entry(keys[0]).dtype, len(keys))
    return set(keys)


def _gguf_notes(view, plans, job, dtype):
    notes = []
    if job.dequantized:
        shown = [f"{k} ({view.ckpt.entry(k).dtype})" for k in sorted(job.dequantized)]
        notes.append(
            f"{len(shown)} merged tensor(s) of GGML types without a codec written in {dtype} "
            f"({opt('dtype')}), as llama.cpp's export-lora does: {_listed(shown)}"
        )
    elif job.target_dtype is not None:
        notes.append(
            f"{opt('dtype')} {dtype} applies to merged tensors of GGML types without a codec: there are none, "
            "every tensor kept its type"
        )
    if plans.get("token_embd.weight") and plans["token_embd.weight"].touched and "output.weight" not in view:
        notes.append(
            "the base has no output.weight: llama.cpp uses token_embd as the output head, so the merged "
            "embedding is the head too (as in a model with tied embeddings)"
        )
    return notes


def _listed(names, limit=20):
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def default_threads():
    """Workers: one per CPU, at most 4. Full-precision tensors are big vectorized passes that memory bandwidth bounds;
    requantized modules take turns in their column loops (rounding.COLUMN_LOOPS, 30-40% of a worker's time), so more
    workers only add modules in memory: 2 layers of 4096 x 11008 FP8 on 2 CPUs, feedback 5.5 s / 555 MiB with 2
    workers, 5.7 s / 706 MiB with 4."""
    return min(4, os.cpu_count() or 1)


def _refuse_adapter_as_base(base):
    from ..formats import detect_format

    if is_gguf(
        base
    ):  # a GGUF model or a llama.cpp LoRA: merge reads its general.type with the rest of its header
        return
    try:
        fmt = detect_format(base)
    except LorakitError:
        return  # not an adapter: a model (or something WeightView will say is broken)
    raise LorakitError(
        f"BASE is a {fmt.name} adapter, not a model: did you swap BASE and ADAPTER? "
        "(lorakit merge BASE ADAPTER[:WEIGHT]... -o OUT)",
        path=base,
    )


def _base_notes(base, view, loaded):
    """What the fingerprint cannot see (it checks names and shapes only): an adapter recording another base name, or
    another base identity (the same shapes with other weights: the instruct model instead of the base)."""
    from ..io import base_model_name
    from ..spec import identity

    notes, ours = [], None
    name = base_model_name(base if os.path.isdir(base) else os.path.dirname(base) or ".")
    for path, ad, _ in loaded:
        if ad.base_identity:
            ours = ours or identity(view.ckpt)
            if ad.base_identity != ours:
                notes.append(
                    f"WARNING: {path} was made on a base with other weights (its base identity differs: same "
                    "tensor names and shapes, other values or dtype; e.g. an instruct model instead of its "
                    "base). Merged anyway"
                )
        if ad.base_model and _short(ad.base_model) != _short(name):
            notes.append(f"note: {path} records the base '{ad.base_model}'; merging into '{name}'")
    return notes


def _short(name):
    return os.path.basename(os.path.normpath(str(name))).lower()


def _embedding_notes(view, plans, config):
    """An adapter on the embedding of a base whose tying cannot be checked (no config.json, no lm_head.weight): the
    merged embedding may or may not be the output head too; say so rather than guess."""
    from ..naming.embeddings import HEAD, is_embedding

    touched = [n for n, p in plans.items() if p.touched and is_embedding(n)]
    if touched and config is None and HEAD not in view:
        return [
            f"WARNING: the adapter changes {touched[0]} and the base has no config.json and no {HEAD}: if the "
            "model ties its output head to the embedding, the head changes too (put config.json beside the file "
            "to have tied embeddings untied and the head written)"
        ]
    return []


def _large_buffers_back_to_os():
    """glibc keeps freed tensor-sized buffers in its heap once its mmap threshold has adapted upwards, so peak RSS
    grows with the number of tensors seen. A fixed 8 MiB threshold gives tensor-sized buffers back when freed (the
    tensors in flight live in BufferPools anyway) while the 2 MB fp32 row blocks stay in the heap, reused without
    page faults."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 8 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def _survival_summary(handler, strategy, rows, dequantized, notes):
    summary = {
        "format": handler.name,
        "strategy": "dequantized (--dtype)" if dequantized else strategy,
        "modules": [{"module": k, **rows[k]} for k in sorted(rows)],
    }
    if rows:
        for key in ("retention", "noise", "codes_changed", "probe_error_random", "probe_error_aligned"):
            summary[f"mean_{key}"] = sum(r[key] for r in rows.values()) / len(rows)
        if summary["mean_retention"] < 0.5:
            notes.append(
                f"WARNING: only {100 * summary['mean_retention']:.0f}% of the adapter survived requantization "
                f"to {handler.name} with --strategy {strategy}. Better here: --strategy feedback (default), "
                "--strategy original with --full-precision-base, or a full-precision output with --dtype bf16"
            )
    return summary
