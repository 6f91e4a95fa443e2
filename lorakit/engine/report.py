"""What a merge reports beyond its counts: notes on what the fingerprint cannot see, tied embeddings, skipped
tensors, the container's own notes, and the survival of each requantized module."""

import os

from ..errors import listed
from ..naming.embeddings import HEAD, is_embedding


def merge_notes(base, loaded, plan, job, options):
    notes = embedding_notes(base, plan) + base_notes(base, loaded) + base.notes(plan.tensors, job, options)
    if plan.skipped:
        notes.append(
            f"skipped {len(plan.skipped)} adapter tensor(s) not in the base (--skip-unmatched): {listed(plan.skipped)}"
        )
    if plan.elsewhere:
        notes.append(
            f"{len(plan.elsewhere)} module(s) for another file of the model (the base has none of their part: a "
            f"text encoder's or the diffusion model's) not merged; merge them into that file: {listed(plan.elsewhere)}"
        )
    widened = [(n, p) for n, p in plan.tensors.items() if p.padded_shape is not None]
    for name, p in widened:
        notes.append(
            f"{name} widened from {list(base.shape(p.source))} to {list(p.padded_shape)} (zero-padded, as ComfyUI "
            "pads it for control LoRAs); a config that lists the model's input channels must say so too"
        )
    if plan.untie:
        notes.append(
            f"tied embeddings: the adapter changes {plan.untie} / lm_head.weight; both were written and "
            "tie_word_embeddings set to false in config.json"
        )
    return notes


def base_notes(base, loaded):
    """What the fingerprint cannot see (it checks names and shapes only): an adapter recording another base name, or
    another base identity (the same shapes with other weights: the instruct model instead of the base)."""
    notes = []
    for label, ad, _ in loaded:
        if ad.base_identity and ad.base_identity != base.identity:
            notes.append(
                f"WARNING: {label} was made on a base with other weights (its base identity differs: same tensor "
                "names and shapes, other values or dtype; e.g. an instruct model instead of its base). Merged anyway"
            )
        if ad.base_model and _short(ad.base_model) != _short(base.name):
            notes.append(f"{label} records the base '{ad.base_model}'; merging into '{base.name}'")
        notes += codes_notes(label, ad, base)
    return notes


def codes_notes(label, ad, base):
    """An adapter trained on a quantized base (lorakit train records the codes it saw) merged into other weights."""
    codes = (ad.provenance or {}).get("base_codes")
    if not isinstance(codes, dict) or not codes.get("format"):
        return []
    fmt = base.view.handler.name if base.quantized else None
    if codes.get("source") == "quantized on load" and fmt is None:
        return [
            f"{label} was trained on {codes['format']} codes of this base made on load (train --quantize); "
            "merged into its full-precision weights, as QLoRA adapters are"
        ]
    if codes.get("source") == "base" and codes["format"] != fmt:
        return [
            f"{label} was trained on a {codes['format']} base; merging into "
            f"{'a ' + fmt if fmt else 'a full-precision'} one, whose weights it did not see"
        ]
    return []


def _short(name):
    return os.path.basename(os.path.normpath(str(name))).lower()


def embedding_notes(base, plan):
    """An adapter on the embedding of a base whose tying cannot be checked (no config.json, no lm_head.weight): the
    merged embedding may or may not be the output head too; say so rather than guess."""
    touched = [n for n, p in plan.tensors.items() if p.touched and is_embedding(n)]
    if touched and base.config is None and base.kv is None and HEAD not in base:
        return [
            f"WARNING: the adapter changes {touched[0]} and the base has no config.json and no {HEAD}: if the "
            "model ties its output head to the embedding, the head changes too (put config.json beside the file "
            "to have tied embeddings untied and the head written)"
        ]
    return []


def strategy_label(strategy, rows):
    """The strategy asked for; for auto, what it chose: 'auto: rescale x 180, same-grid x 30'."""
    if strategy != "auto" or not rows:
        return strategy
    chosen = {}
    for r in rows.values():
        chosen[r["strategy"]] = chosen.get(r["strategy"], 0) + 1
    return "auto: " + ", ".join(f"{s} x {n}" for s, n in sorted(chosen.items(), key=lambda kv: -kv[1]))


def survival_summary(handler, strategy, job, notes):
    rows = job.survival
    summary = {
        "format": handler.name,
        "strategy": "dequantized (--dtype)" if job.dequantize_out else strategy_label(strategy, rows),
        "modules": [{"module": k, **rows[k]} for k in sorted(rows)],
    }
    if rows:
        for key in ("probe_error_random", "probe_error_aligned", "retention", "noise", "codes_changed"):
            summary[f"mean_{key}"] = sum(r[key] for r in rows.values()) / len(rows)
        if summary["mean_retention"] < 0.5:
            notes.append(
                f"WARNING: only {100 * summary['mean_retention']:.0f}% of the adapter survived requantization "
                f"to {handler.name} with --strategy {strategy}. Better here: --strategy auto (the default), "
                "--calibration DATA, --strategy original with --full-precision-base, or a full-precision output "
                "with --dtype bf16"
            )
    return summary
