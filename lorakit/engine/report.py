"""What a merge reports beyond its counts: notes on what the fingerprint cannot see, tied embeddings, skipped
tensors, the container's own notes, and the survival of each requantized module."""

import os

from ..errors import listed, opt
from ..naming import natural_key
from ..naming.embeddings import HEAD, is_embedding
from ..quant.requant import weighted


def merge_notes(base, loaded, plan, job, options):
    notes = embedding_notes(base, plan) + base_notes(base, loaded) + base.notes(plan.tensors, job, options)
    notes += unread_options(job, options)
    empty = [
        path for path, ad, _ in loaded if not (ad.modules or ad.replacements or ad.deltas or ad.transforms)
    ]
    if empty:
        notes.append(
            f"{len(empty)} adapter(s) hold no module or tensor, so they change nothing: {listed(empty)}"
        )
    if plan.skipped:
        notes.append(
            f"skipped {len(plan.skipped)} adapter tensor(s) not in the base (--skip-unmatched): {listed(plan.skipped)}"
        )
    if plan.elsewhere:
        notes.append(
            f"{len(plan.elsewhere)} module(s) for another file of the model (the base has none of their part: a "
            f"text encoder's or the diffusion model's) not merged; merge them into that file: {listed(plan.elsewhere)}"
        )
    notes += plan.notes
    if plan.vocab_size is not None:
        notes.append(
            f"added tokens: the embedding and head grown to {plan.vocab_size} rows, vocab_size set in config.json, "
            f"the tokenizer files of {plan.tokenizer_from} copied"
        )
    widened = [
        (n, p) for n, p in plan.tensors.items() if p.padded_shape is not None and p.replacement is None
    ]
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
        notes += [f"{label}: {n}" for n in ad.notes if n.startswith("WARNING")]  # what reading it found
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


def unread_options(job, options):
    """Notes for the options only quantized modules read, given where none is (said, not refused: a script may pass
    one strategy to every base it merges)."""
    quantized = bool(job.view.quantized)
    unread = [
        (
            options.strategy != "auto" and not job.requantizes,
            f"{opt('strategy', bare=True)} {options.strategy}",
        ),
        (options.onto != "dequantized" and not quantized, f"{opt('onto', bare=True)} {options.onto}"),
        (options.full_precision_base is not None and not quantized, opt("full_precision_base", bare=True)),
    ]
    why = (
        "--dtype writes every quantized module in full precision"
        if quantized
        else "the base has no quantized module"
    )
    return [f"{name} was not used: {why}" for given, name in unread if given]


def strategy_label(strategy, rows):
    """The strategy asked for; for auto, what it chose: 'auto: rescale x 180, keep x 30'."""
    if strategy != "auto" or not rows:
        return strategy
    chosen = {}
    for r in rows.values():
        chosen[r["strategy"]] = chosen.get(r["strategy"], 0) + 1
    return "auto: " + ", ".join(
        f"{s} x {n}" for s, n in sorted(chosen.items(), key=lambda kv: (-kv[1], kv[0]))
    )


def survival_summary(handler, strategy, job, notes, calibrated=False):
    """The quantized merge's verdict first (how much of the adapter's effect the merged modules keep, next to no
    adapter and the adapter at run time), then the means and every module's row in natural order."""
    rows = job.survival
    summary = {
        "format": handler.name,
        "strategy": "dequantized (--dtype)" if job.dequantize_out else strategy_label(strategy, rows),
        "modules": [{"module": k, **rows[k]} for k in sorted(rows, key=natural_key)],
    }
    if job.coherence is not None:
        summary["coherence"] = {"z": round(job.coherence.z, 2), "bias_weight": job.coherence.bias_weight}
    if not rows:
        return summary
    for key in ("probe_error_random", "probe_error_aligned", "retention", "noise", "codes_changed"):
        summary[f"mean_{key}"] = sum(r[key] for r in rows.values()) / len(rows)
    # a coherent adapter's noise does not add up across modules as its dropped part does: each module's error is
    # its weighted score over the weight (keep: 1), as auto chose by it
    weight = job.coherence.bias_weight if job.coherence is not None else 1.0
    error = (sum(weighted(r, weight) / weight for r in rows.values()) / len(rows)) ** 0.5
    summary["verdict"] = {
        # RMS over modules and probe kinds of ||E x|| / ||dW x|| (a coherent adapter's noise weighed as auto did)
        "output_error": error,
        "no_adapter": 1.0,
        "runtime": 0.0,
        "effect_kept": max(0.0, 1.0 - error),
        "kept_old_codes": sum(r["strategy"] == "keep" for r in rows.values()),
    }
    if summary["verdict"]["effect_kept"] < 0.5:
        notes.append(grid_cannot_hold(handler.name, summary, calibrated))
    dropped = [m for m in summary["modules"] if m["strategy"] == "keep" and m.get("relative_delta", 0) > 1]
    # the mean above counts each module once: a delta beyond the weight itself, dropped, is said apart
    if dropped:
        worst = max(dropped, key=lambda m: m["relative_delta"])
        notes.append(
            f"WARNING: {len(dropped)} module(s) whose delta is larger than the weight itself kept their old codes "
            f"(no candidate came nearer W + dW: the {handler.name} grid cannot hold it), so the adapter is dropped "
            f"there: {worst['module']} (||dW||/||W|| {worst['relative_delta']:.3g})"
        )
    return summary


def grid_cannot_hold(fmt, summary, calibrated):
    """The warning in words, with the ways out that fit this base; no strategy is recommended (this merge measured
    only the ones it tried)."""
    v = summary["verdict"]
    kept = f"{v['kept_old_codes']} of {len(summary['modules'])} modules kept their old codes, "
    return (
        f"WARNING: the {fmt} grid cannot hold this adapter: the merged modules keep {100 * v['effect_kept']:.0f}% "
        f"of its effect (output error on probes {v['output_error']:.2f} of the adapter's own; no adapter 1.00, "
        f"the adapter at run time 0.00; {kept if v['kept_old_codes'] else ''}strategy {summary['strategy']}). "
        "Ways out: " + ways_out(fmt, summary, calibrated)
    )


def ways_out(fmt, summary, calibrated):
    """What a user can do instead of this quantized merge, the ways that fit this base joined in one phrase."""
    kinds = sorted({m.get("type") for m in summary["modules"] if m.get("type")})
    ways = [
        f"serve the adapter at run time (lorakit convert ADAPTER -o OUT --for {'llama.cpp' if fmt == 'gguf' else 'vllm'})"
    ]
    if not summary["strategy"].startswith("dequantized"):
        ways.append("a full-precision output (--dtype bf16)")
    if fmt == "gguf" and any(k not in ("Q8_0", "F16", "BF16", "F32") for k in kinds):
        ways.append("a finer type (a Q8_0 base)")
    elif fmt in ("gptq", "awq", "nf4", "mxfp4"):
        ways.append("a finer format (an 8-bit base: int8, fp8)")
    if not calibrated:
        ways.append("--calibration DATA (the layers' own inputs)")
    return "; ".join(ways)


def model_worse(summary):
    """The warning when --calibration's model-level figures show the merged model further from the adapted one than
    the base without the adapter (None otherwise): per-module choices cannot promise that, modules act together
    (benchmarks/check_partial_merge.py: one module merged exactly, alone, can move the model away). Equal figures
    are every code kept, which the grid's own warning says."""
    if summary.get("kl") is None or summary["kl"] <= summary["kl_no_adapter"]:
        return None
    return (
        f"WARNING: the merged model is further from the adapted model than the base without the adapter: KL "
        f"{summary['kl']:.3e} per token against {summary['kl_no_adapter']:.3e} on {summary['kl_tokens']} held-out "
        f"calibration tokens (strategy {summary['strategy']}): this merge makes the model worse than not merging. "
        "Ways out: " + ways_out(summary["format"], summary, calibrated=True)
    )
