"""Merge an expert LoRA (PEFT target_parameters on every expert's gate/up/down, plus q/v) into a generated
Qwen3-MoE-style bf16 checkpoint stored per expert (>= 1 GB, sharded), next to `cp -r` + `sync` (the I/O floor) and
to lorakit's merge of a dense checkpoint of the same size and adapter rank. Each run in a fresh process, timed until
its output is synced; rounds interleaved (BENCH_ROUNDS, default 2), best of each."""

import json
import os
import shutil
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import measure_command, measure_python, table  # noqa: E402

from lorakit.io import write_safetensors  # noqa: E402

LAYERS, HIDDEN, EXPERTS, MOE_FF, VOCAB = int(os.environ.get("BENCH_LAYERS", 8)), 2048, 32, 768, 32000
RANK, ROUNDS = 16, int(os.environ.get("BENCH_ROUNDS", 2))


def tensors_of(layer, experts):
    """One layer's tensors (attention, router, experts or a dense MLP of the same size), bf16."""
    g = torch.Generator().manual_seed(layer)
    r = lambda *s: (torch.randn(*s, generator=g) * 0.02).to(torch.bfloat16)  # noqa: E731
    p = f"model.layers.{layer}"
    out = {f"{p}.self_attn.{n}.weight": r(HIDDEN, HIDDEN) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    if experts:
        out[f"{p}.mlp.gate.weight"] = r(EXPERTS, HIDDEN)
        for e in range(EXPERTS):
            out.update(
                {f"{p}.mlp.experts.{e}.{n}.weight": r(MOE_FF, HIDDEN) for n in ("gate_proj", "up_proj")}
            )
            out[f"{p}.mlp.experts.{e}.down_proj.weight"] = r(HIDDEN, MOE_FF)
    else:  # the same parameters as one dense MLP
        ff = EXPERTS * MOE_FF
        out.update({f"{p}.mlp.{n}.weight": r(ff, HIDDEN) for n in ("gate_proj", "up_proj")})
        out[f"{p}.mlp.down_proj.weight"] = r(HIDDEN, ff)
    return out


def write_base(folder, experts):
    os.makedirs(folder)
    weight_map, total = {}, 0
    for layer in range(LAYERS):  # one shard per layer: never the whole model in memory
        shard = tensors_of(layer, experts)
        name = f"model-{layer + 1:05d}-of-{LAYERS:05d}.safetensors"
        write_safetensors(os.path.join(folder, name), shard)
        weight_map.update({k: name for k in shard})
        total += sum(t.numel() * 2 for t in shard.values())
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"model_type": "qwen3_moe" if experts else "llama", "num_experts": EXPERTS}, f)
    return total


def write_adapters(work):
    """The expert LoRA as PEFT saves it (ParamWrapper keys, fused [r E, in] / [out, r E]); the dense one with the
    same ranks on the same matrices as plain LoRA."""
    g = torch.Generator().manual_seed(7)
    r = lambda *s: torch.randn(*s, generator=g) * 0.01  # noqa: E731
    moe, dense = {}, {}
    for layer in range(LAYERS):
        p = f"base_model.model.model.layers.{layer}"
        for n in ("q_proj", "v_proj"):
            for d in (moe, dense):
                d[f"{p}.self_attn.{n}.lora_A.weight"], d[f"{p}.self_attn.{n}.lora_B.weight"] = (
                    r(RANK, HIDDEN),
                    r(HIDDEN, RANK),
                )
        moe[f"{p}.mlp.experts.base_layer.lora_A.weight"] = r(
            RANK * EXPERTS, HIDDEN
        )  # gate_up_proj [E, 2I, H]
        moe[f"{p}.mlp.experts.base_layer.lora_B.weight"] = r(2 * MOE_FF, RANK * EXPERTS)
        moe[f"{p}.mlp.experts.lora_A.weight"] = r(RANK * EXPERTS, MOE_FF)  # down_proj [E, H, I]
        moe[f"{p}.mlp.experts.lora_B.weight"] = r(HIDDEN, RANK * EXPERTS)
        for n, (o, i) in (
            ("gate_proj", (EXPERTS * MOE_FF, HIDDEN)),
            ("up_proj", (EXPERTS * MOE_FF, HIDDEN)),
            ("down_proj", (HIDDEN, EXPERTS * MOE_FF)),
        ):
            dense[f"{p}.mlp.{n}.lora_A.weight"], dense[f"{p}.mlp.{n}.lora_B.weight"] = r(RANK, i), r(o, RANK)
    config = {"peft_type": "LORA", "r": RANK, "lora_alpha": 2 * RANK, "peft_version": "0.21.2"}
    for name, tensors, extra in (
        (
            "moe_adapter",
            moe,
            {
                "target_modules": ["q_proj", "v_proj"],
                "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
            },
        ),
        (
            "dense_adapter",
            dense,
            {"target_modules": ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]},
        ),
    ):
        os.makedirs(os.path.join(work, name))
        write_safetensors(os.path.join(work, name, "adapter_model.safetensors"), tensors)
        with open(os.path.join(work, name, "adapter_config.json"), "w") as f:
            json.dump({**config, **extra}, f)


def main():
    work = tempfile.mkdtemp(prefix="lorakit-bench-moe-")
    try:
        total = write_base(os.path.join(work, "moe"), experts=True)
        write_base(os.path.join(work, "dense"), experts=False)
        write_adapters(work)
        best = {}
        for _ in range(ROUNDS):
            for label, run in (
                ("cp -r + sync (I/O floor)", lambda: measure_command(f"cp -r {work}/moe {work}/copy")),
                ("lorakit merge, MoE (per-expert checkpoint, expert LoRA)", lambda: _merge(work, "moe")),
                ("lorakit merge, dense checkpoint of the same size", lambda: _merge(work, "dense")),
            ):
                t, rss, _ = run()
                best[label] = min(best.get(label, (t, rss)), (t, rss))
                for out in ("copy", "out"):
                    shutil.rmtree(os.path.join(work, out), ignore_errors=True)
        floor = best["cp -r + sync (I/O floor)"][0]
        rows = [[k, f"{t:.2f}", f"{t / floor:.2f}x", f"{rss:.0f}"] for k, (t, rss) in best.items()]
        table(
            f"merge into a {total / 1e9:.2f} GB bf16 MoE checkpoint ({LAYERS} layers x {EXPERTS} experts, "
            f"{LAYERS * EXPERTS * 3} expert matrices, rank {RANK}), best of {ROUNDS} interleaved rounds",
            ["run", "seconds", "vs cp -r", "peak RSS MiB"],
            rows,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _merge(work, kind):
    return measure_python(
        f"import lorakit; lorakit.merge({work + '/' + kind!r}, [{work + '/' + kind + '_adapter'!r}], "
        f"{work + '/out'!r}, quiet=True)"
    )


if __name__ == "__main__":
    main()
