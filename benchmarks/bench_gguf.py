"""Merging into GGUF bases (llama.cpp) at the size users work at.

A Llama-style GGUF (BENCH_LAYERS layers, default 4, x hidden 4096 x intermediate 11008, vocab 32000: 1.07B
parameters) with every 2-D weight in Q8_0 (1.14 GB) and in Q4_K (0.60 GB), norms F32; a rank-16 all-linear adapter
with Hugging Face names at ||dW|| / ||W|| = 1e-2 on every module. For each type, interleaved rounds of:
- `cp` + `sync` of the base (the floor: a merge writes a file of the same size);
- `lorakit merge` with the default `feedback` and with `same-grid` (nearest code on the stored grid: the baseline
  of what survives), each in a fresh process until its output is synced to disk, peak RSS of the process.
Then the survival report of each: retention (goal: >= 90% for Q8_0 with the default) and the output error on probes
in the adapter's input subspace relative to ||dW x|| (the error the adapter's own inputs see), next to same-grid's.
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


def merge_code(base, ad, out, strategy):
    return (
        f"import json, lorakit\nr = lorakit.merge({base!r}, [{ad!r}], {out!r}, strategy={strategy!r}, quiet=True, "
        f"force=True)\njson.dump(r['quantization'], open({out + '.json'!r}, 'w'))"
    )


def main():
    work = tempfile.mkdtemp(prefix="lorakit-bench-gguf-", dir=os.environ.get("BENCH_DIR"))
    try:
        ad = f"{work}/adapter.safetensors"
        adapter(ad)
        speed, survival = [], []
        for kind in ("Q8_0", "Q4_K"):
            base = f"{work}/model-{kind}.gguf"
            build(base, kind)
            size = os.path.getsize(base)
            times = {"cp + sync": [], "feedback": [], "same-grid": []}
            rss = {}
            for _ in range(ROUNDS):  # interleaved: each round runs every contender once
                shutil.rmtree(f"{work}/copy.gguf", ignore_errors=True)
                t, r = measure_command(f"cp {base} {work}/copy.gguf")
                times["cp + sync"].append(t)
                rss["cp + sync"] = r
                os.remove(f"{work}/copy.gguf")
                for strategy in ("feedback", "same-grid"):
                    out = f"{work}/out-{strategy}.gguf"
                    t, r = measure_python(merge_code(base, ad, out, strategy))
                    times[strategy].append(t)
                    rss[strategy] = max(rss.get(strategy, 0), r)
                    assert os.path.getsize(out) == size
            floor = min(times["cp + sync"])
            for name, ts in times.items():
                speed.append(
                    (
                        kind,
                        f"{size / 1e9:.2f} GB",
                        name,
                        f"{min(ts):.2f} s",
                        f"{min(ts) / floor:.2f}x",
                        f"{rss[name]:.0f} MiB",
                    )
                )
            reports = {s: json.load(open(f"{work}/out-{s}.gguf.json")) for s in ("feedback", "same-grid")}
            for s, q in reports.items():
                rows = q["modules"]
                survival.append(
                    (
                        kind,
                        s,
                        f"{100 * q['mean_retention']:.1f}%",
                        f"{100 * min(r['retention'] for r in rows):.1f}%",
                        f"{q['mean_noise']:.3f}",
                        f"{q['mean_probe_error_aligned']:.4f}",
                        f"{q['mean_probe_error_aligned'] / reports['same-grid']['mean_probe_error_aligned']:.2f}x",
                        f"{q['mean_probe_error_random']:.3f}",
                        f"{100 * q['mean_codes_changed']:.1f}%",
                    )
                )
            os.remove(base)
        table(
            f"merge into a GGUF base ({LAYERS} layers x {HIDDEN} x {INTER}, rank {RANK} all-linear), best of "
            f"{ROUNDS} interleaved rounds, each until synced to disk",
            ["type", "base", "what", "wall", "vs cp + sync", "peak RSS"],
            speed,
        )
        table(
            f"survival at ||dW||/||W|| = {REL:g} (means over {LAYERS * len(DIMS)} tensors)",
            [
                "type",
                "strategy",
                "retention",
                "min retention",
                "noise",
                "aligned err",
                "vs same-grid",
                "random err",
                "codes changed",
            ],
            survival,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
