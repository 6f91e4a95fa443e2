"""Partial merges judged by the model (issue #36): is "no module further from W + dW" enough for "never worse than no
adapter"?

For a quantized base and adapter of bench_quant_quality, the model's KL when the adapter is merged *exactly* (the
dequantized weight + dW in fp32, no rounding at all) into some modules and dropped from the others, against two
references: the fp32 base + LoRA (the benchmark's truth, which a merge of a quantized base never sees) and the
quantized base + LoRA at run time (what lorakit can compute: the reference of `merge --calibration`'s KL). Rows: no
adapter, every module exact (the runtime LoRA), each module of KIND exact alone (the worst ones, and how many are
worse than no adapter), then lorakit's default merge (and with --calibration when CALIBRATION=1). Each KL is a
multiple of the format's floor, as in bench_quant_quality.

    BENCH_WORK=/tmp/quality LLAMA_CPP=/path/to/vendor/llama.cpp python benchmarks/check_partial_merge.py \
        Q5_K_M:random int8:random [KIND=v_proj] [CALIBRATION=1]
"""

import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_quant_quality as quality  # noqa: E402
from common import table  # noqa: E402

import lorakit  # noqa: E402
from lorakit.bases import open_base  # noqa: E402
from lorakit.training.model import LlamaForCausalLM, dequantized  # noqa: E402

KIND = os.environ.get("KIND", "v_proj")
WORST = 3  # single modules listed


def scored(model, ids, weights, references, floor):
    """KL in floors against each reference of `model` with `weights` loaded."""
    model.load_state_dict(weights, strict=False)
    with torch.no_grad():
        lp = torch.cat([model(x[None]).double().log_softmax(-1)[0] for x in ids])
    return [quality.kl(ref, lp) / floor for ref in references]


def row_tables(fmt, adapter, work, fp32, ids, setup):
    """The table rows of one format and adapter."""
    tensors, config, full_gguf, train_ids = setup
    base = quality.quantized_base(fmt, work, tensors, config, full_gguf)
    references = [quality.logprobs(fp32, ids, adapter), quality.logprobs(base, ids, adapter)]
    floor = quality.kl(quality.logprobs(fp32, ids), quality.logprobs(base, ids)) or 1.0
    old = dequantized(open_base(base))[1]
    dense = os.path.join(work, "partial-dense")
    lorakit.merge(fp32, [adapter], dense, dtype="float32", quiet=True, force=True)
    merged = dequantized(open_base(dense))[1]
    delta = {n: w - tensors[n] for n, w in merged.items() if not torch.equal(w, tensors[n])}
    exact = {n: old[n] + delta[n] for n in delta}
    model = LlamaForCausalLM.from_pretrained(fp32)
    none = scored(model, ids, old, references, floor)
    rows = [
        ("no adapter", none),
        ("every module exact (the runtime LoRA)", scored(model, ids, {**old, **exact}, references, floor)),
    ]
    singles = []
    for name in sorted(n for n in exact if f".{KIND}." in n):
        singles.append((name, scored(model, ids, {**old, name: exact[name]}, references, floor)))
    worse = [sum(s[1][i] > none[i] for s in singles) for i in range(2)]
    rows.append((f"{KIND} exact alone: worse than no adapter (of {len(singles)})", worse))
    for name, kls in sorted(singles, key=lambda s: -s[1][0])[:WORST]:
        rows.append((f"{name.removesuffix('.weight')} exact alone", kls))
    rows += lorakit_merges(base, adapter, work, fmt, model, ids, references, floor, train_ids)
    label = f"{fmt} {os.path.basename(adapter).removeprefix('lora-')}"
    return [[label, what, *(f"{v:.3g}" for v in kls)] for what, kls in rows]


def lorakit_merges(base, adapter, work, fmt, model, ids, references, floor, train_ids):
    """lorakit's default merge of the row, and its --calibration merge when CALIBRATION=1."""
    ext = ".gguf" if fmt.startswith("Q") else ""
    runs = [("lorakit merge (the default)", {})]
    if os.environ.get("CALIBRATION") == "1":
        data = os.path.join(work, "calibration.npy")
        np.save(data, train_ids.numpy())
        runs.append(("lorakit merge --calibration", {"calibration": data}))
    rows = []
    for what, options in runs:
        out = os.path.join(work, f"partial-{fmt}{ext}")
        lorakit.merge(base, [adapter], out, quiet=True, force=True, **options)
        rows.append((what, scored(model, ids, dequantized(open_base(out))[1], references, floor)))
    return rows


def main():
    import tempfile

    import transformers

    chosen = sys.argv[1:] or ["Q5_K_M:random"]
    with tempfile.TemporaryDirectory(prefix="lorakit-partial-") as work:
        work = os.environ.get("BENCH_WORK", work)
        os.makedirs(work, exist_ok=True)
        fp32, gguf, tensors, config = quality.reference_folder(work)
        folder, name = os.path.split(gguf)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
        train_ids = torch.tensor(tokenizer(quality.stdlib_text(quality.TRAIN_FILES)).input_ids)
        held = torch.tensor(tokenizer(quality.stdlib_text(quality.HELD_OUT)).input_ids)
        ids = held[: quality.EVAL_SEQS * quality.SEQ].reshape(quality.EVAL_SEQS, quality.SEQ)
        adapters = quality.make_adapters(work, fp32, train_ids)
        full_gguf = os.path.join(work, "f32.gguf")
        if any(c.startswith("Q") for c in chosen) and not os.path.exists(full_gguf):
            quality.llama_cpp("llama-quantize", "--allow-requantize", gguf, full_gguf, "F32")
        rows = []
        for spec in chosen:
            fmt, adapter = spec.split(":")
            rows += row_tables(
                fmt, adapters[adapter], work, fp32, ids, (tensors, config, full_gguf, train_ids)
            )
            print("\n".join(" | ".join(r) for r in rows), flush=True)
    table(
        "KL per token of SmolLM2-135M with the adapter merged exactly into some modules (the dequantized weight + "
        "dW in fp32) and dropped from the others, in multiples of the format's floor, against the fp32 base + LoRA "
        "(the truth) and against the quantized base + LoRA at run time (what a merge can know)",
        [
            "format, adapter",
            "modules merged",
            "KL / floor vs fp32 + LoRA",
            "KL / floor vs quantized base + LoRA",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
