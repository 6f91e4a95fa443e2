"""Quantize-aware merge, in two parts.

1. Survival: a Llama-style checkpoint (hidden 1024) quantized by this script into FP8, INT8, GPTQ int4, AWQ int4 (and
   FP8 128x128 blocks, NF4, compressed-tensors int4, NVFP4, MXFP8); a rank-16 all-linear adapter at ||dW|| / ||W|| = 1e-3, 1e-2, 1e-1; retention, noise and
   probe output error of every strategy next to the same-grid baseline (PEFT's method). Goal: the default keeps
   >= 90% of a 1e-2 delta with aligned probe error <= half the same-grid baseline's.
2. Speed and memory at the size users work at: 2 layers x hidden 4096 x intermediate 11008 (405M quantized
   parameters, the rest bf16), every writable format and every strategy but `original`, each timed until its output
   is on disk, next to lorakit's own `--dtype bf16` merge of the same checkpoint in the same run. Goals: <= 1.5x that
   for FP8 / INT8 / MXFP8, <= 2.5x for int4 / NF4 / NVFP4; peak RSS <= 1 GiB.
Set BENCH_PART=1 or 2 to run one part, BENCH_ROUNDS for the rounds of part 2 (2), BENCH_FORMATS for a subset."""

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

SIZE = dict(
    layers=int(os.environ.get("BENCH_LAYERS", 2)),
    hidden=1024,
    intermediate=2816,
    vocab=8000,
    heads=8,
    kv_heads=4,
)
FORMATS = tuple(
    os.environ.get("BENCH_FORMATS", "fp8,int8,gptq,awq,fp8-block,nf4,ct-int,nvfp4,mxfp8").split(",")
)
BIG = dict(layers=2, hidden=4096, intermediate=11008, vocab=32000, heads=32, kv_heads=8)
TIMED = tuple(os.environ.get("BENCH_STRATEGIES", "auto,feedback,same-grid,stochastic,rescale").split(","))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", 2))  # part 2: interleaved rounds, best time of each
GOALS = {"fp8": 1.5, "fp8-block": 1.5, "int8": 1.5, "mxfp8": 1.5, "gptq": 2.5, "awq": 2.5, "nf4": 2.5}
GOALS.update({"ct-int": 2.5, "nvfp4": 2.5})
RELS = (1e-3, 1e-2, 1e-1)
STRATEGIES = ("same-grid", "feedback", "stochastic", "rescale", "original")


def build(work, size=SIZE, formats=FORMATS, full_file=True):
    shapes = examples.llama_shapes(**size)
    full = examples.random_tensors(shapes, torch.float32, seed=0)
    config = examples.llama_config(**size)
    if full_file:
        os.makedirs(f"{work}/full")
        json.dump(config, open(f"{work}/full/config.json", "w"))
        write_safetensors(f"{work}/full/model.safetensors", full, {"format": "pt"})
    for fmt in formats:
        os.makedirs(f"{work}/{fmt}")
        json.dump(
            {**config, "quantization_config": quantization_config(fmt)},
            open(f"{work}/{fmt}/config.json", "w"),
        )
        tensors = {}
        for name, t in full.items():
            if any(k in name for k in examples.LINEAR_TARGETS):
                module = name[: -len(".weight")]
                tensors.update({f"{module}.{k}": v for k, v in quantize(t, fmt).items()})
            else:
                tensors[name] = t.to(torch.bfloat16)
        write_safetensors(f"{work}/{fmt}/model.safetensors", tensors, {"format": "pt"})
    return full


def adapter(full, rel, path, rank=16):
    g = torch.Generator().manual_seed(1)
    ad = Adapter()
    for name, W in full.items():
        if any(k in name for k in examples.LINEAR_TARGETS):
            A = torch.randn(rank, W.shape[1], generator=g) / W.shape[1] ** 0.5
            B = torch.randn(W.shape[0], rank, generator=g)
            B *= rel * float(W.norm()) / float((B @ A).norm() * 2.0)  # scale alpha / r = 2
            ad.add(Module(name[: -len(".weight")], A, B, alpha=32.0))
    ad.save(path, force=True)


def survival(work):
    full = build(work)
    rows, goals = [], []
    for rel in RELS:
        adapter(full, rel, f"{work}/a.safetensors")
        for fmt in FORMATS:
            results = {}
            for strategy in STRATEGIES:
                if fmt == "nf4" and strategy == "original":
                    continue
                r = lorakit.merge(
                    f"{work}/{fmt}",
                    [f"{work}/a.safetensors"],
                    f"{work}/out",
                    strategy=strategy,
                    full_precision_base=f"{work}/full",
                    force=True,
                    quiet=True,
                    ignore_fingerprint=True,
                )["quantization"]
                results[strategy] = r
            base = results["same-grid"]
            for strategy, q in results.items():
                rows.append(
                    [
                        fmt,
                        f"{rel:g}",
                        strategy + (" (default)" if strategy == "feedback" else ""),
                        f"{100 * q['mean_retention']:.1f}%",
                        f"{q['mean_noise']:.3f}",
                        f"{q['mean_probe_error_random']:.3f}",
                        f"{q['mean_probe_error_aligned']:.3f}",
                        f"{q['mean_probe_error_aligned'] / base['mean_probe_error_aligned']:.2f}x",
                    ]
                )
            fb = results["feedback"]
            if rel == 1e-2:
                goals.append(
                    (
                        fmt,
                        fb["mean_retention"],
                        fb["mean_probe_error_aligned"] / base["mean_probe_error_aligned"],
                        fb["mean_probe_error_random"] / base["mean_probe_error_random"],
                    )
                )
    table(
        f"survival of a rank-16 all-linear adapter ({SIZE['layers']} layers x {SIZE['hidden']})",
        [
            "format",
            "||dW||/||W||",
            "strategy",
            "retention",
            "noise",
            "probe err (random)",
            "probe err (aligned)",
            "aligned vs same-grid",
        ],
        rows,
    )
    print("\ngoal at 1e-2 (retention >= 90%, aligned probe error <= 0.5x same-grid):")
    for fmt, ret, ratio, ratio_rand in goals:
        ok = ret >= 0.9 and ratio <= 0.5
        print(
            f"  {fmt:9s} feedback: retention {100 * ret:.1f}%, aligned error {ratio:.2f}x, random-probe error "
            f"{ratio_rand:.2f}x of same-grid -> {'met' if ok else 'NOT met'}"
        )


def speed(work):
    full = build(work, BIG, full_file=False)
    adapter(full, 1e-2, f"{work}/a.safetensors")
    del full
    first = FORMATS[0]
    size = sum(os.path.getsize(f"{work}/{first}/{f}") for f in os.listdir(f"{work}/{first}"))
    rows, verdicts = [], []
    t_cp, rss_cp, _ = measure_command(f"cp -r {work}/{first} {work}/copy")
    shutil.rmtree(f"{work}/copy")
    rows.append([first, "cp -r (I/O floor)", f"{t_cp:.2f}", "", f"{rss_cp:.0f}"])

    def timed(fmt, extra):
        t, rss, _ = measure_python(
            f"import lorakit; lorakit.merge({work + '/' + fmt!r}, [{work + '/a.safetensors'!r}], "
            f"{work + '/out'!r}, quiet=True, force=True, {extra})"
        )
        shutil.rmtree(f"{work}/out", ignore_errors=True)
        return t, rss

    # rounds interleaved (every format and strategy once per round): the best time of each, the highest peak RSS
    runs = {}
    for _ in range(ROUNDS):
        for fmt in FORMATS:
            for what in ["dtype='bf16'"] + [f"strategy={s!r}" for s in TIMED]:
                runs.setdefault((fmt, what), []).append(timed(fmt, what))
    best = {k: (min(t for t, _ in v), max(r for _, r in v)) for k, v in runs.items()}
    for fmt in FORMATS:
        t_bf16, rss_bf16 = best[(fmt, "dtype='bf16'")]
        rows.append(
            [fmt, "--dtype bf16 (dequantize, merge, write bf16)", f"{t_bf16:.2f}", "1.00x", f"{rss_bf16:.0f}"]
        )
        for strategy in TIMED:
            t, rss = best[(fmt, f"strategy={strategy!r}")]
            rows.append([fmt, f"--strategy {strategy}", f"{t:.2f}", f"{t / t_bf16:.2f}x", f"{rss:.0f}"])
            verdicts.append((fmt, strategy, t / t_bf16, rss))
    table(
        f"merge a rank-16 all-linear adapter into {BIG['layers']} layers x {BIG['hidden']} x "
        f"{BIG['intermediate']} quantized checkpoints ({first} one: {size / 1e9:.2f} GB), {os.cpu_count()} CPUs, "
        f"best of {ROUNDS} interleaved rounds",
        ["format", "what", "wall s", "vs --dtype bf16", "peak RSS MiB"],
        rows,
    )
    print(
        "\ngoals (wall <= 1.5x --dtype bf16 for FP8/INT8/MXFP8, <= 2.5x for int4/NF4/NVFP4; peak RSS <= 1024 MiB):"
    )
    for fmt, strategy, ratio, rss in verdicts:
        ok = ratio <= GOALS[fmt] and rss <= 1024
        print(f"  {fmt:9s} {strategy:10s} {ratio:.2f}x, {rss:.0f} MiB -> {'met' if ok else 'NOT met'}")


def main():
    part = os.environ.get("BENCH_PART")
    for number, run in (("1", survival), ("2", speed)):
        if part in (None, number):
            work = tempfile.mkdtemp(prefix="lorakit-bench-quant-")
            try:
                run(work)
            finally:
                shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
