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
