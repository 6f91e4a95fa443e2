"""Merging into GGUF bases (llama.cpp) at the size users work at, against llama.cpp's own way.

A Llama-style GGUF (BENCH_LAYERS layers, default 4, x hidden 4096 x intermediate 11008, vocab 32000: 1.07B
parameters) with every 2-D weight in Q8_0 (1.14 GB) and in Q4_K (0.60 GB), norms F32; a rank-16 all-linear adapter
with Hugging Face names at ||dW|| / ||W|| = 1e-2 on every module. For each type, interleaved rounds of (each in a
fresh process, timed until its output is synced to disk):
- `cp` + `sync` of the base (the floor: a merge writes a file of the same size);
- `lorakit merge` (the default strategy), types kept;
- llama.cpp's way (LLAMA_CPP: its build's bin folder): `llama-export-lora` (the LoRA, converted once by
  `lorakit convert --to gguf`, merged into the base: merged tensors come out F16) then `llama-quantize
  --allow-requantize` back to the type (Q8_0, Q4_K_M), both timed; skipped with a note where LLAMA_CPP is not set.
Then the survival report of lorakit's merge (retention, codes changed).
"""

import json
import os
import shutil
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import measure_command, measure_python, table  # noqa: E402

from lorakit.core import Adapter, Module  # noqa: E402
from lorakit.examples import quantize_gguf  # noqa: E402

LAYERS = int(os.environ.get("BENCH_LAYERS", 4))
HIDDEN, INTER, VOCAB, HEADS, KV_HEADS = 4096, 11008, 32000, 32, 8
KVD = HIDDEN // HEADS * KV_HEADS
DIMS = {
    "attn_q": (HIDDEN, HIDDEN, "self_attn.q_proj"),
    "attn_k": (KVD, HIDDEN, "self_attn.k_proj"),
    "attn_v": (KVD, HIDDEN, "self_attn.v_proj"),
    "attn_output": (HIDDEN, HIDDEN, "self_attn.o_proj"),
    "ffn_gate": (INTER, HIDDEN, "mlp.gate_proj"),
    "ffn_up": (INTER, HIDDEN, "mlp.up_proj"),
    "ffn_down": (HIDDEN, INTER, "mlp.down_proj"),
}
SIGMA, REL, RANK, ROUNDS = 0.02, 1e-2, 16, int(os.environ.get("BENCH_ROUNDS", 2))


def build(path, kind, seed=0):
    import gguf
    from gguf.constants import GGMLQuantizationType as T

    g = torch.Generator().manual_seed(seed)
    w = gguf.GGUFWriter(path, "llama", use_temp_file=True)
    w.add_block_count(LAYERS)
    w.add_context_length(4096)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(INTER)
    w.add_uint32("llama.attention.head_count", HEADS)
    w.add_uint32("llama.attention.head_count_kv", KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)  # llama-quantize loads the hyperparameters
    w.add_rope_dimension_count(HIDDEN // HEADS)

    def add(name, shape):
        W = torch.randn(shape, generator=g) * SIGMA
        w.add_tensor(name, quantize_gguf(W, kind).numpy().reshape(shape[0], -1), raw_dtype=T[kind])

    add("token_embd.weight", (VOCAB, HIDDEN))
    for layer in range(LAYERS):
        w.add_tensor(f"blk.{layer}.attn_norm.weight", np.ones(HIDDEN, np.float32))
        w.add_tensor(f"blk.{layer}.ffn_norm.weight", np.ones(HIDDEN, np.float32))
        for part, (o, i, _) in DIMS.items():
            add(f"blk.{layer}.{part}.weight", (o, i))
    w.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    add("output.weight", (VOCAB, HIDDEN))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def adapter(path, seed=1):
    """||s B A||_F = REL ||W||_F on every module (||W||_F = SIGMA sqrt(out in))."""
    g = torch.Generator().manual_seed(seed)
    ad = Adapter()
    for layer in range(LAYERS):
        for o, i, hf in DIMS.values():
            A = torch.randn(RANK, i, generator=g) / i**0.5
            B = torch.randn(o, RANK, generator=g)
            B *= REL * SIGMA * (o * i) ** 0.5 / float((B @ A).norm())
            ad.add(Module(f"model.layers.{layer}.{hf}", A, B, alpha=float(RANK)))
    ad.save(path)


def merge_code(base, ad, out):
    return (
        f"import json, lorakit\nr = lorakit.merge({base!r}, [{ad!r}], {out!r}, quiet=True, force=True)\n"
        f"json.dump(r['quantization'], open({out + '.json'!r}, 'w'))"
    )


def llama_cpp_code(bin_dir, base, lora, out, kind):
    """export-lora then quantize, one shell command (timed together, synced at the end)."""
    target = {"Q8_0": "Q8_0", "Q4_K": "Q4_K_M"}[kind]
    return (
        f"{bin_dir}/llama-export-lora -m {base} --lora {lora} -o {out}.f16.gguf -t {os.cpu_count()} > /dev/null 2>&1 && "
        f"{bin_dir}/llama-quantize --allow-requantize {out}.f16.gguf {out} {target} {os.cpu_count()} > /dev/null 2>&1 && "
        f"rm {out}.f16.gguf"
    )


def contenders(work, base, kind, ad, bin_dir):
    runs = {
        "cp + sync (I/O floor)": lambda: measure_command(f"cp {base} {work}/copy.gguf"),
        "lorakit merge (types kept)": lambda: measure_python(
            merge_code(base, ad, f"{work}/out-lorakit.gguf")
        ),
    }
    if bin_dir:
        lora = f"{work}/lora-{kind}.gguf"
        if not os.path.exists(lora):
            import lorakit

            lorakit.convert(ad, lora, to="gguf", base=base)
        target = {"Q8_0": "Q8_0", "Q4_K": "Q4_K_M"}[kind]
        runs[f"llama-export-lora + llama-quantize --allow-requantize {target}"] = lambda: measure_command(
            llama_cpp_code(bin_dir, base, lora, f"{work}/out-llama.gguf", kind)
        )
    return runs


def main():
    work = tempfile.mkdtemp(prefix="lorakit-bench-gguf-", dir=os.environ.get("BENCH_DIR"))
    bin_dir = os.environ.get("LLAMA_CPP")
    try:
        ad = f"{work}/adapter.safetensors"
        adapter(ad)
        speed, survival = [], []
        for kind in ("Q8_0", "Q4_K"):
            base = f"{work}/model-{kind}.gguf"
            build(base, kind)
            size = os.path.getsize(base)
            runs = contenders(work, base, kind, ad, bin_dir)
            times = {k: [] for k in runs}
            for _ in range(ROUNDS):  # interleaved: each round runs every contender once
                for label, run in runs.items():
                    times[label].append(run())
                    for f in ("copy.gguf", "out-llama.gguf"):
                        if os.path.exists(f"{work}/{f}"):
                            os.remove(f"{work}/{f}")
            floor = min(times["cp + sync (I/O floor)"])
            for name, rs in times.items():
                best = min(rs)
                speed.append(
                    (
                        kind,
                        f"{size / 1e9:.2f} GB",
                        name,
                        f"{best.wall:.2f}",
                        f"{best.wall / floor.wall:.2f}x",
                        f"{best.cpu:.2f}",
                        f"{max(r.rss for r in rs):.0f}",
                    )
                )
            q = json.load(open(f"{work}/out-lorakit.gguf.json"))
            survival.append(
                (
                    kind,
                    q["strategy"],
                    f"{100 * q['mean_retention']:.1f}%",
                    f"{100 * q['mean_codes_changed']:.1f}%",
                )
            )
            os.remove(base)
        table(
            f"merge into a GGUF base ({LAYERS} layers x {HIDDEN} x {INTER}, rank {RANK} all-linear, {os.cpu_count()} "
            f"CPUs), best of {ROUNDS} interleaved rounds, each until synced to disk"
            + ("" if bin_dir else " (LLAMA_CPP not set: llama.cpp's row skipped)"),
            ["type", "base", "what", "wall s", "vs cp + sync", "CPU s", "peak RSS MiB"],
            speed,
        )
        table(
            f"lorakit's merge at ||dW||/||W|| = {REL:g} (means over {LAYERS * len(DIMS)} tensors)",
            ["type", "strategy", "retention", "codes changed"],
            survival,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
