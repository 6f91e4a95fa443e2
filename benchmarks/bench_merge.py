"""Merge a rank-16 all-linear adapter into a generated Llama-style bf16 checkpoint (>= 2 GB, sharded).
Side by side in one run: cp -r (the I/O floor), lorakit merge, PEFT from_pretrained + merge_and_unload +
save_pretrained. Goals: lorakit within 1.5x of the copy, >= 3x faster than PEFT, peak RSS <= 1/5 of PEFT's."""

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


def main():
    work = tempfile.mkdtemp(prefix="lorakit-bench-merge-")
    try:
        base = os.path.join(work, "base")
        shapes, total = write_base(base)
        ad = examples.random_adapter(shapes, targets=TARGETS, rank=16, alpha=32.0, magnitude=0.01)
        adapter = os.path.join(work, "adapter.safetensors")
        ad.save(adapter)
        # the same adapter as a PEFT folder, for PEFT's own loader
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
            json.dump(
                {
                    "peft_type": "LORA",
                    "r": 16,
                    "lora_alpha": 32,
                    "target_modules": TARGETS,
                    "task_type": "CAUSAL_LM",
                    "base_model_name_or_path": base,
                },
                f,
            )
        rows = []
        t_cp, rss_cp = measure_command(f"cp -r {base} {work}/copy")
        rows.append(["cp -r (I/O floor)", t_cp, rss_cp])
        t_lk, rss_lk = measure_python(
            f"import lorakit; lorakit.merge({base!r}, [{adapter!r}], {work + '/lk'!r}, quiet=True)"
        )
        rows.append(["lorakit merge", t_lk, rss_lk])
        t_pf, rss_pf = measure_python(
            "import torch, transformers, peft\n"
            f"m = transformers.AutoModelForCausalLM.from_pretrained({base!r}, dtype=torch.bfloat16)\n"
            f"m = peft.PeftModel.from_pretrained(m, {peft_dir!r}).merge_and_unload()\n"
            f"m.save_pretrained({work + '/peft_out'!r})"
        )
        rows.append(["PEFT from_pretrained + merge_and_unload + save_pretrained", t_pf, rss_pf])
        table(
            f"merge a rank-16 all-linear adapter into a {total / 1e9:.2f} GB bf16 Llama-style checkpoint "
            f"({LAYERS} layers, {os.cpu_count()} CPUs)",
            ["what", "wall s", "vs cp", "peak RSS MiB", "RSS vs PEFT"],
            [[w, f"{t:.2f}", f"{t / t_cp:.2f}x", f"{r:.0f}", f"{r / rss_pf:.3f}"] for w, t, r in rows],
        )
        print(
            f"\nlorakit is {t_pf / t_lk:.1f}x faster than PEFT, within {t_lk / t_cp:.2f}x of cp, "
            f"peak RSS {rss_lk / rss_pf:.3f} of PEFT's"
        )
        # same result: one merged tensor of each against the fp64 merge
        from lorakit.io import Checkpoint

        name = "model.layers.0.mlp.down_proj"
        ref = Checkpoint(base).get(name + ".weight").double() + ad.modules[name].delta(torch.float64)
        errors = [
            float((Checkpoint(f"{work}/{out}").get(name + ".weight").double() - ref).abs().max())
            for out in ("lk", "peft_out")
        ]
        print(f"{name}: max |merged - fp64 reference| lorakit {errors[0]:.2e}, PEFT {errors[1]:.2e}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
