"""Merge rank-16 adapters into a generated Llama-style bf16 checkpoint (>= 2 GB, sharded), side by side in the
same interleaved rounds (each run in a fresh process, timed until its output is synced to disk): `cp -r` + `sync`
(the I/O floor), lorakit with an all-linear adapter, lorakit with a q,v-only adapter (most bytes untouched), the
all-linear merge with 1 and 2 workers; wall time and CPU seconds (user + system) of each, since on a fast disk it
is the CPU that sets the pace; then PEFT's from_pretrained + merge_and_unload + save_pretrained once.
Goals (issue #40): all-linear <= 1.3x the copy, q,v-only <= 1.1x. BENCH_ROUNDS (3), BENCH_LAYERS (20), BENCH_PEFT
(1: run the PEFT anchor)."""

import json
import os
import shutil
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import measure_command, measure_python, table  # noqa: E402

from lorakit import examples  # noqa: E402
from lorakit.io import write_safetensors  # noqa: E402

LAYERS = int(os.environ.get("BENCH_LAYERS", 20))
SIZE = dict(layers=LAYERS, hidden=2048, intermediate=5632, vocab=32000, heads=16, kv_heads=4)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_base(folder):
    """Shards of ~500 MB written tensor by tensor (never the whole model in memory)."""
    os.makedirs(folder)
    shapes = examples.llama_shapes(**SIZE)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({**examples.llama_config(**SIZE), "torch_dtype": "bfloat16"}, f)
    g = torch.Generator().manual_seed(0)
    weight_map, shard, size, index, total = {}, {}, 0, 0, 0
    names = list(shapes)

    def flush():
        nonlocal shard, size, index
        index += 1
        file = f"model-{index:05d}.safetensors"
        write_safetensors(os.path.join(folder, file), shard, {"format": "pt"})
        weight_map.update({n: file for n in shard})
        shard, size = {}, 0

    for name in names:
        t = (torch.randn(shapes[name], generator=g) * 0.02).to(torch.bfloat16)
        shard[name] = t
        size += t.numel() * 2
        total += t.numel() * 2
        if size > 500e6:
            flush()
    if shard:
        flush()
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return shapes, total


ROUNDS = int(os.environ.get("BENCH_ROUNDS", 3))


def write_adapters(work, shapes):
    """The all-linear adapter as a lorakit file and as a PEFT folder; a q,v-only one."""
    ad = examples.random_adapter(shapes, targets=TARGETS, rank=16, alpha=32.0, magnitude=0.01)
    ad.save(os.path.join(work, "all.safetensors"))
    examples.random_adapter(shapes, targets=["q_proj", "v_proj"], rank=16, alpha=32.0, magnitude=0.01).save(
        os.path.join(work, "qv.safetensors")
    )
    peft_dir = os.path.join(work, "peft")
    os.makedirs(peft_dir)
    write_safetensors(
        os.path.join(peft_dir, "adapter_model.safetensors"),
        {
            **{f"base_model.model.{n}.lora_A.weight": m.A for n, m in ad.modules.items()},
            **{f"base_model.model.{n}.lora_B.weight": m.B for n, m in ad.modules.items()},
        },
        {"format": "pt"},
    )
    with open(os.path.join(peft_dir, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": TARGETS}, f)
    return ad


def merge(work, adapter, threads=None):
    extra = f", threads={threads}" if threads else ""
    return measure_python(
        f"import lorakit; lorakit.merge({work + '/base'!r}, [{work + '/' + adapter!r}], {work + '/out'!r}, "
        f"quiet=True{extra})"
    )


def main():
    work = tempfile.mkdtemp(prefix="lorakit-bench-merge-")
    try:
        shapes, total = write_base(os.path.join(work, "base"))
        ad = write_adapters(work, shapes)
        contenders = {
            "cp -r + sync (I/O floor)": lambda: measure_command(f"cp -r {work}/base {work}/out"),
            "lorakit merge, all-linear adapter": lambda: merge(work, "all.safetensors"),
            "lorakit merge, q,v-only adapter": lambda: merge(work, "qv.safetensors"),
            "lorakit merge, all-linear, 1 worker": lambda: merge(work, "all.safetensors", threads=1),
            # what every fresh process pays before the first byte: Python, torch (0.8-2 s of it here, by the load), lorakit
            "start-up only (python -c 'import lorakit.engine.merge')": lambda: measure_python(
                f"import lorakit.engine.merge; os.makedirs({work + '/out'!r})"
            ),
        }
        runs = {k: [] for k in contenders}
        for _ in range(ROUNDS):  # interleaved: each round runs every contender once
            for label, run in contenders.items():
                runs[label].append(run())
                shutil.rmtree(f"{work}/out")
        median = {k: sorted(v)[len(v) // 2] for k, v in runs.items()}  # the median round by wall time
        floor = median["cp -r + sync (I/O floor)"]
        rows = [
            [
                k,
                f"{r.wall:.2f}",
                f"{r.wall / floor.wall:.2f}x",
                f"{r.cpu:.2f}",
                f"{r.cpu / floor.cpu:.2f}x",
                f"{r.rss:.0f}",
            ]
            for k, r in median.items()
        ]
        if os.environ.get("BENCH_PEFT", "1") == "1":
            r = peft_merge(work)
            rows.append(
                [
                    "PEFT from_pretrained + merge_and_unload + save_pretrained (once)",
                    f"{r.wall:.2f}",
                    f"{r.wall / floor.wall:.2f}x",
                    f"{r.cpu:.2f}",
                    f"{r.cpu / floor.cpu:.2f}x",
                    f"{r.rss:.0f}",
                ]
            )
        start = median["start-up only (python -c 'import lorakit.engine.merge')"]
        for label in ("lorakit merge, all-linear adapter", "lorakit merge, q,v-only adapter"):
            r = median[label]
            rows.append(
                [
                    f"{label}, start-up subtracted",
                    f"{r.wall - start.wall:.2f}",
                    f"{(r.wall - start.wall) / floor.wall:.2f}x",
                    f"{r.cpu - start.cpu:.2f}",
                    f"{(r.cpu - start.cpu) / floor.cpu:.2f}x",
                    "",
                ]
            )
        table(
            f"merge rank-16 adapters into a {total / 1e9:.2f} GB bf16 Llama-style checkpoint ({LAYERS} layers, "
            f"{len(os.listdir(work + '/base')) - 2} shards, {os.cpu_count()} CPUs), median of {ROUNDS} interleaved rounds",
            ["run", "wall s", "vs cp", "CPU s", "CPU vs cp", "peak RSS MiB"],
            rows,
        )
        check(work, ad)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def peft_merge(work):
    return measure_python(
        "import torch, transformers, peft\n"
        f"m = transformers.AutoModelForCausalLM.from_pretrained({work + '/base'!r}, dtype=torch.bfloat16)\n"
        f"m = peft.PeftModel.from_pretrained(m, {work + '/peft'!r}).merge_and_unload()\n"
        f"m.save_pretrained({work + '/peft_out'!r})"
    )


def check(work, ad):
    """The same result: one merged tensor against the fp64 merge."""
    import lorakit
    from lorakit.io import Checkpoint

    lorakit.merge(f"{work}/base", [f"{work}/all.safetensors"], f"{work}/out", quiet=True)
    name = "model.layers.0.mlp.down_proj"
    ref = Checkpoint(f"{work}/base").get(name + ".weight").double() + ad.modules[name].delta(torch.float64)
    error = float((Checkpoint(f"{work}/out").get(name + ".weight").double() - ref).abs().max())
    print(f"{name}: max |merged - fp64 reference| {error:.2e} (bf16 rounding)")


if __name__ == "__main__":
    main()
