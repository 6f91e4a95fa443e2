"""Training throughput and peak memory: lorakit train against PEFT + transformers on the same model, data, batch,
rank and steps, each in a fresh process (CPU here; on a GPU when one is present). Goal: >= PEFT's tokens/s at no
more memory."""

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import table  # noqa: E402

from lorakit import examples  # noqa: E402

SIZE = dict(layers=4, hidden=512, intermediate=1376, vocab=8000, heads=8, kv_heads=4)
STEPS, BATCH, SEQ, RANK, TARGETS = 20, 8, 128, 16, "q_proj,v_proj"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

PEFT_RUN = """
import json, time, resource, numpy as np, torch, transformers, peft
dev = {device!r}
dtype = torch.bfloat16 if dev == "cuda" else torch.float32
model = transformers.LlamaForCausalLM.from_pretrained({base!r}, dtype=dtype).to(dev)
model = peft.get_peft_model(model, peft.LoraConfig(r={rank}, lora_alpha={rank}*2, target_modules={targets!r}.split(","),
                                                   lora_dropout=0.0))
data = torch.from_numpy(np.load({data!r}).astype(np.int64))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
g = torch.Generator().manual_seed(0)
def batch():
    s = torch.randint(len(data) - {seq} - 1, ({batch},), generator=g)
    x = torch.stack([data[i:i + {seq}] for i in s]); y = torch.stack([data[i + 1:i + 1 + {seq}] for i in s])
    return x.to(dev), y.to(dev)
def step():
    x, y = batch()
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
        logits = model(input_ids=x).logits
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
step()  # warm-up step, not timed (lorakit also times from its second step)
if dev == "cuda": torch.cuda.synchronize()
t0 = time.perf_counter()
for _ in range({steps}):
    step()
if dev == "cuda": torch.cuda.synchronize()
t = time.perf_counter() - t0
hwm = int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]) / 1024
gpu = torch.cuda.max_memory_allocated() / 2**20 if dev == "cuda" else 0
print("RESULT", json.dumps({{"tokens_per_s": {steps} * {batch} * {seq} / t, "rss": hwm, "gpu": gpu}}))
"""

LORAKIT_RUN = """
import json, torch, lorakit
r = lorakit.train({base!r}, {data!r}, {out!r}, rank={rank}, alpha={rank}*2, targets={targets!r}, steps={steps},
                  batch={batch}, seq_len={seq}, eval_every=0, device={device!r}, force=True, quiet=True)
hwm = int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]) / 1024
gpu = torch.cuda.max_memory_allocated() / 2**20 if {device!r} == "cuda" else 0
print("RESULT", json.dumps({{"tokens_per_s": r["tokens_per_s"], "rss": hwm, "gpu": gpu}}))
"""


def run(code):
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads([x for x in out.splitlines() if x.startswith("RESULT")][-1][7:])


def dense():
    """lorakit train against PEFT + transformers on a full-precision base."""
    with tempfile.TemporaryDirectory() as d:
        base = os.path.join(d, "base")
        examples.write_llama_checkpoint(base, **SIZE)
        data = os.path.join(d, "data.npy")
        np.save(data, np.random.default_rng(0).integers(0, SIZE["vocab"], 200_000, dtype=np.uint16))
        kw = dict(
            base=base, data=data, rank=RANK, targets=TARGETS, steps=STEPS, batch=BATCH, seq=SEQ, device=DEVICE
        )
        runs = [
            (run(PEFT_RUN.format(**kw)), run(LORAKIT_RUN.format(out=os.path.join(d, "a.safetensors"), **kw)))
            for _ in range(2)
        ]  # alternated, best of two each: less noise from the machine
        peft_r = max((r[0] for r in runs), key=lambda r: r["tokens_per_s"])
        ours = max((r[1] for r in runs), key=lambda r: r["tokens_per_s"])
        mem = "gpu" if DEVICE == "cuda" else "rss"
        rows = [
            ["PEFT + transformers", f"{peft_r['tokens_per_s']:.0f}", "1.00x", f"{peft_r[mem]:.0f}", "1.00"],
            [
                "lorakit train",
                f"{ours['tokens_per_s']:.0f}",
                f"{ours['tokens_per_s'] / peft_r['tokens_per_s']:.2f}x",
                f"{ours[mem]:.0f}",
                f"{ours[mem] / peft_r[mem]:.2f}",
            ],
        ]
        table(
            f"train rank {RANK} on {TARGETS}, Llama {SIZE['layers']} layers x {SIZE['hidden']}, batch {BATCH} x {SEQ} "
            f"tokens, {STEPS} steps, {DEVICE}",
            [
                "what",
                "tokens/s",
                "vs PEFT",
                "peak MiB (" + ("GPU" if DEVICE == "cuda" else "RSS") + ")",
                "mem vs PEFT",
            ],
            rows,
        )


# ----------------------------------------------------------------------------- QLoRA: a quantized base (#28)
# A >= 500M-parameter Llama (bf16 on disk), NF4 with double quantization on load, LoRA on every linear layer:
# lorakit train --quantize nf4 against PEFT + transformers + bitsandbytes (load_in_4bit) and lorakit's dense run.
Q_SIZE = dict(layers=16, hidden=1536, intermediate=4096, vocab=32000, heads=12, kv_heads=4)
Q_STEPS, Q_BATCH, Q_SEQ = 4, 2, 128
Q_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"

QLORA_PEFT = """
import json, time, numpy as np, torch, transformers, peft
dev = {device!r}
compute = torch.bfloat16 if dev == "cuda" else torch.float32
config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                         bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)
model = transformers.LlamaForCausalLM.from_pretrained({base!r}, quantization_config=config, device_map=dev,
                                                      dtype=compute)
model = peft.get_peft_model(model, peft.LoraConfig(r={rank}, lora_alpha={rank}*2, lora_dropout=0.0,
                                                   target_modules={targets!r}.split(",")))
model.train()
def held(t):  # the bytes a frozen tensor holds: a 4-bit parameter's codes and its quantization state
    n = t.numel() * t.element_size()
    s = getattr(t, "quant_state", None)
    if s is not None:
        n += s.absmax.numel() * s.absmax.element_size()
        if s.state2 is not None:
            n += s.state2.absmax.numel() * 4 + s.state2.code.numel() * 4
    return n
frozen = [p for p in model.parameters() if not p.requires_grad]
packed = [p for p in frozen if getattr(p, "quant_state", None) is not None]
base_bytes = sum(held(p) for p in frozen) + sum(b.numel() * b.element_size() for b in model.buffers())
linear = sum(held(p) for p in packed) / sum(p.quant_state.shape.numel() for p in packed)
params = sum(p.quant_state.shape.numel() if getattr(p, "quant_state", None) is not None else p.numel() for p in frozen)
data = torch.from_numpy(np.load({data!r}).astype(np.int64))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
g = torch.Generator().manual_seed(0)
def step():
    s = torch.randint(len(data) - {seq} - 1, ({batch},), generator=g)
    x = torch.stack([data[i:i + {seq}] for i in s]).to(dev)
    y = torch.stack([data[i + 1:i + 1 + {seq}] for i in s]).to(dev)
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
        logits = model(input_ids=x).logits
    torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten()).backward()
    opt.step(); opt.zero_grad(set_to_none=True)
step()
if dev == "cuda": torch.cuda.synchronize()
t0 = time.perf_counter()
for _ in range({steps} - 1):
    step()
if dev == "cuda": torch.cuda.synchronize()
t = time.perf_counter() - t0
hwm = int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]) / 1024
gpu = torch.cuda.max_memory_allocated() / 2**20 if dev == "cuda" else 0
print("RESULT", json.dumps({{"tokens_per_s": ({steps} - 1) * {batch} * {seq} / t, "rss": hwm, "gpu": gpu,
                            "linear": linear, "base": base_bytes / params}}))
"""

QLORA_LORAKIT = """
import json, torch, lorakit
r = lorakit.train({base!r}, {data!r}, {out!r}, rank={rank}, alpha={rank}*2, targets={targets!r}, steps={steps},
                  batch={batch}, seq_len={seq}, eval_every=0, device={device!r}, force=True, quiet=True,
                  quantize={quantize!r})
hwm = int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]) / 1024
gpu = torch.cuda.max_memory_allocated() / 2**20 if {device!r} == "cuda" else 0
params = {params}
linear = r["frozen_bytes"] / r["frozen_weights"] if r["frozen_weights"] else float("nan")
print("RESULT", json.dumps({{"tokens_per_s": r["tokens_per_s"], "rss": hwm, "gpu": gpu, "linear": linear,
                            "base": r["memory_estimate"]["base"] / params}}))
"""


def qlora():
    with tempfile.TemporaryDirectory() as d:
        base = os.path.join(d, "base")
        tensors = examples.write_llama_checkpoint(base, dtype=torch.bfloat16, **Q_SIZE)
        params = sum(t.numel() for t in tensors.values())
        del tensors
        data = os.path.join(d, "data.npy")
        np.save(data, np.random.default_rng(0).integers(0, Q_SIZE["vocab"], 100_000, dtype=np.uint16))
        kw = dict(base=base, data=data, rank=16, targets=Q_TARGETS, steps=Q_STEPS, batch=Q_BATCH, seq=Q_SEQ)
        kw.update(device=DEVICE, out=os.path.join(d, "a.safetensors"), params=params)
        sides = {
            "PEFT + bitsandbytes NF4": QLORA_PEFT.format(**kw),
            "lorakit train --quantize nf4": QLORA_LORAKIT.format(quantize="nf4", **kw),
            "lorakit train (dense base)": QLORA_LORAKIT.format(quantize=None, **kw),
        }
        results = {name: [] for name in sides}
        for _ in range(2):  # interleaved, best of two each
            for name, code in sides.items():
                results[name].append(run(code))
    best = {k: max(v, key=lambda r: r["tokens_per_s"]) for k, v in results.items()}
    anchor = best["PEFT + bitsandbytes NF4"]
    mem = "gpu" if DEVICE == "cuda" else "rss"
    rows = [
        [
            name,
            f"{r['linear']:.3f}",
            f"{r['base']:.3f}",
            f"{r[mem]:.0f}",
            f"{r[mem] / anchor[mem]:.2f}",
            f"{r['tokens_per_s']:.0f}",
            f"{r['tokens_per_s'] / anchor['tokens_per_s']:.2f}x",
        ]
        for name, r in best.items()
    ]
    table(
        f"QLoRA: {params / 1e6:.0f}M-parameter Llama ({Q_SIZE['layers']} x {Q_SIZE['hidden']}), rank 16 on every "
        f"linear layer, batch {Q_BATCH} x {Q_SEQ}, {Q_STEPS - 1} timed steps, {DEVICE}",
        [
            "what",
            "linear layers B/weight",
            "whole base B/param",
            "peak MiB (" + ("GPU" if DEVICE == "cuda" else "RSS") + ")",
            "vs PEFT",
            "tokens/s",
            "vs PEFT",
        ],
        rows,
    )


if __name__ == "__main__":  # python benchmarks/bench_train.py [dense] [qlora]
    chosen = sys.argv[1:] or ["dense", "qlora"]
    if "dense" in chosen:
        dense()
    if "qlora" in chosen:
        qlora()
