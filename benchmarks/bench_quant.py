"""Quantize-aware merge: a Llama-style checkpoint quantized by this script into FP8, INT8, GPTQ int4 and AWQ int4;
a rank-16 all-linear adapter at ||dW|| / ||W|| = 1e-3, 1e-2, 1e-1; retention, noise and probe output error of every
strategy next to the same-grid baseline (PEFT's method). Plus wall time and peak memory against a plain copy.
Goal: a default strategy keeping >= 90% of the delta with probe error <= half the same-grid baseline's for FP8 and
INT8 at 1e-2."""
import json
import os
import shutil
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import measure_command, measure_python, table  # noqa: E402

import lorakit  # noqa: E402
from lorakit import examples  # noqa: E402
from lorakit.core import Adapter, Module  # noqa: E402
from lorakit.io import write_safetensors  # noqa: E402
from lorakit.examples import quantization_config, quantize  # noqa: E402

SIZE = dict(layers=int(os.environ.get("BENCH_LAYERS", 2)), hidden=1024, intermediate=2816, vocab=8000, heads=8,
            kv_heads=4)
FORMATS = ("fp8", "int8", "gptq", "awq")
RELS = (1e-3, 1e-2, 1e-1)
STRATEGIES = ("same-grid", "feedback", "stochastic", "rescale", "original")


def build(work):
    shapes = examples.llama_shapes(**SIZE)
    full = examples.random_tensors(shapes, torch.float32, seed=0)
    os.makedirs(f"{work}/full")
    config = examples.llama_config(**SIZE)
    json.dump(config, open(f"{work}/full/config.json", "w"))
    write_safetensors(f"{work}/full/model.safetensors", full, {"format": "pt"})
    for fmt in FORMATS:
        os.makedirs(f"{work}/{fmt}")
        json.dump({**config, "quantization_config": quantization_config(fmt)}, open(f"{work}/{fmt}/config.json", "w"))
        tensors = {}
        for name, t in full.items():
            if any(k in name for k in examples.LINEAR_TARGETS):
                module = name[: -len(".weight")]
                tensors.update({f"{module}.{k}": v for k, v in quantize(t, fmt).items()})
            else:
                tensors[name] = t.to(torch.bfloat16)
        write_safetensors(f"{work}/{fmt}/model.safetensors", tensors, {"format": "pt"})
    return full


def adapter(full, rel, path):
    g = torch.Generator().manual_seed(1)
    ad = Adapter()
    for name, W in full.items():
        if any(k in name for k in examples.LINEAR_TARGETS):
            A = torch.randn(16, W.shape[1], generator=g) / W.shape[1] ** 0.5
            B = torch.randn(W.shape[0], 16, generator=g)
            B *= rel * float(W.norm()) / float((B @ A).norm() * 2.0)  # scale alpha / r = 2
            ad.add(Module(name[: -len(".weight")], A, B, alpha=32.0))
    ad.save(path, force=True)


def main():
    work = tempfile.mkdtemp(prefix="lorakit-bench-quant-")
    try:
        full = build(work)
        rows, goals = [], []
        for rel in RELS:
            adapter(full, rel, f"{work}/a.safetensors")
            for fmt in FORMATS:
                results = {}
                for strategy in STRATEGIES:
                    r = lorakit.merge(f"{work}/{fmt}", [f"{work}/a.safetensors"], f"{work}/out", strategy=strategy,
                                      full_precision_base=f"{work}/full", force=True, quiet=True,
                                      ignore_fingerprint=True)["quantization"]
                    results[strategy] = r
                base = results["same-grid"]
                for strategy, q in results.items():
                    rows.append([fmt, f"{rel:g}", strategy + (" (default)" if strategy == "feedback" else ""),
                                 f"{100 * q['mean_retention']:.1f}%", f"{q['mean_noise']:.3f}",
                                 f"{q['mean_probe_error_random']:.3f}", f"{q['mean_probe_error_aligned']:.3f}",
                                 f"{q['mean_probe_error_aligned'] / base['mean_probe_error_aligned']:.2f}x"])
                fb = results["feedback"]
                if rel == 1e-2:
                    goals.append((fmt, fb["mean_retention"], fb["mean_probe_error_aligned"] /
                                  base["mean_probe_error_aligned"], fb["mean_probe_error_random"] /
                                  base["mean_probe_error_random"]))
        table(f"survival of a rank-16 all-linear adapter ({SIZE['layers']} layers x {SIZE['hidden']})",
              ["format", "||dW||/||W||", "strategy", "retention", "noise", "probe err (random)",
               "probe err (aligned)", "aligned vs same-grid"], rows)
        print("\ngoal at 1e-2 (retention >= 90%, aligned probe error <= 0.5x same-grid):")
        for fmt, ret, ratio, ratio_rand in goals:
            ok = ret >= 0.9 and ratio <= 0.5
            print(f"  {fmt:5s} feedback: retention {100 * ret:.1f}%, aligned error {ratio:.2f}x, random-probe error "
                  f"{ratio_rand:.2f}x of same-grid -> {'met' if ok else 'NOT met'}")
        # wall time and memory of one merge against a plain copy of the quantized checkpoint
        size = sum(os.path.getsize(f"{work}/fp8/{f}") for f in os.listdir(f"{work}/fp8"))
        t_cp, rss_cp = measure_command(f"cp -r {work}/fp8 {work}/copy")
        t_lk, rss_lk = measure_python(f"import lorakit; lorakit.merge({work + '/fp8'!r}, [{work + '/a.safetensors'!r}], "
                                      f"{work + '/timed'!r}, quiet=True, ignore_fingerprint=True)")
        table(f"merge into the FP8 checkpoint ({size / 1e6:.0f} MB), default strategy",
              ["what", "wall s", "vs cp", "peak RSS MiB"],
              [["cp -r", f"{t_cp:.2f}", "1.00x", f"{rss_cp:.0f}"],
               ["lorakit merge (feedback)", f"{t_lk:.2f}", f"{t_lk / t_cp:.1f}x", f"{rss_lk:.0f}"]])
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
