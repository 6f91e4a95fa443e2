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


# ----------------------------------------------------------------------------- QLoRA: a quantized base (#28, #41)
# Generated Llamas (bf16 on disk: 103M with a small vocabulary, so the linear layers dominate, and 501M) and
# SmolLM2-135M-Instruct (its GGUF's weights as a bf16 folder); NF4 with double quantization on load, LoRA rank 16 on
# every linear layer: lorakit train --quantize nf4 against PEFT + transformers + bitsandbytes (load_in_4bit) at the
# same compute dtype, and against lorakit's own --dtype bf16 run of the dense base.
Q_MODELS = {
    "103M": dict(layers=12, hidden=768, intermediate=2816, vocab=4000, heads=12, kv_heads=4),
    "501M": dict(layers=16, hidden=1536, intermediate=4096, vocab=32000, heads=12, kv_heads=4),
    "SmolLM2-135M": None,
}
Q_STEPS, Q_BATCH, Q_SEQ = 5, 2, 128
Q_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"

QLORA_PEFT = """
import json, time, numpy as np, torch, transformers, peft
dev = {device!r}
compute = getattr(torch, {compute!r})
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
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=compute == torch.bfloat16):
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
                            "linear": linear, "base": base_bytes / params, "compute": {compute!r}}}))
"""

QLORA_LORAKIT = """
import json, torch, lorakit
r = lorakit.train({base!r}, {data!r}, {out!r}, rank={rank}, alpha={rank}*2, targets={targets!r}, steps={steps},
                  batch={batch}, seq_len={seq}, eval_every=0, device={device!r}, force=True, quiet=True,
                  quantize={quantize!r}, dtype={dtype!r})
hwm = int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]) / 1024
gpu = torch.cuda.max_memory_allocated() / 2**20 if {device!r} == "cuda" else 0
params = {params}
linear = r["frozen_bytes"] / r["frozen_weights"] if r["frozen_weights"] else float("nan")
print("RESULT", json.dumps({{"tokens_per_s": r["tokens_per_s"], "rss": hwm, "gpu": gpu, "linear": linear,
                            "base": r["memory_estimate"]["base"] / params, "compute": r["compute_dtype"],
                            "weights": r["frozen_weights"]}}))
"""


def qlora_base(name, d):
    """(folder, parameters, vocabulary) of a model of Q_MODELS in bf16 under `d`."""
    folder = os.path.join(d, name)
    size = Q_MODELS[name]
    if size is not None:
        tensors = examples.write_llama_checkpoint(folder, dtype=torch.bfloat16, **size)
        return folder, sum(t.numel() for t in tensors.values()), size["vocab"]
    from bench_quant_quality import reference_folder

    fp32, _, tensors, config = reference_folder(os.path.join(d, "smollm2"))
    os.makedirs(folder)
    json.dump({**config, "torch_dtype": "bfloat16"}, open(os.path.join(folder, "config.json"), "w"))
    examples.write_sharded(folder, {k: v.to(torch.bfloat16) for k, v in tensors.items()})
    return folder, sum(t.numel() for t in tensors.values()), config["vocab_size"]


def qlora_model(name, d):
    """Each side's best of two interleaved runs on one model."""
    base, params, vocab = qlora_base(name, d)
    data = os.path.join(d, "data.npy")
    np.save(data, np.random.default_rng(0).integers(0, vocab, 100_000, dtype=np.uint16))
    kw = dict(base=base, data=data, rank=16, targets=Q_TARGETS, steps=Q_STEPS, batch=Q_BATCH, seq=Q_SEQ)
    kw.update(device=DEVICE, out=os.path.join(d, "a.safetensors"), params=params)
    ours = lambda quantize, dtype: QLORA_LORAKIT.format(quantize=quantize, dtype=dtype, **kw)  # noqa: E731
    auto = run(ours("nf4", "auto"))["compute"]  # the compute dtype lorakit picks here for codes
    sides = {
        f"PEFT + bitsandbytes NF4 ({auto})": QLORA_PEFT.format(compute=auto, **kw),
        "lorakit train --quantize nf4": ours("nf4", "auto"),
        "lorakit train --dtype bf16 (dense base)": ours(None, "bfloat16"),
    }
    if auto != "float32":
        sides["PEFT + bitsandbytes NF4 (float32)"] = QLORA_PEFT.format(compute="float32", **kw)
        sides["lorakit train --quantize nf4 --dtype float32"] = ours("nf4", "float32")
    results = {side: [] for side in sides}
    for _ in range(2):  # interleaved, best of two each
        for side, code in sides.items():
            results[side].append(run(code))
    return params, {k: max(v, key=lambda r: r["tokens_per_s"]) for k, v in results.items()}


def qlora_rows(best):
    mem = "gpu" if DEVICE == "cuda" else "rss"
    anchors = {r["compute"]: r for k, r in best.items() if k.startswith("PEFT")}
    rows = []
    for side, r in best.items():
        anchor = anchors.get(r["compute"], anchors.get("bfloat16"))
        rows.append(
            [side, r["compute"], f"{r['linear']:.3f}", f"{r['base']:.3f}", f"{r[mem]:.0f}"]
            + [f"{r[mem] / anchor[mem]:.2f}", f"{r['tokens_per_s']:.0f}"]
            + [f"{r['tokens_per_s'] / anchor['tokens_per_s']:.2f}x"]
        )
    nf4, dense = best["lorakit train --quantize nf4"], best["lorakit train --dtype bf16 (dense base)"]
    own = nf4["weights"] * (2 - nf4["linear"]) / 2**20  # the linear weights' own saving, bf16 -> codes (MiB)
    saved = dense[mem] - nf4[mem]
    return (
        rows,
        f"--quantize nf4 peaks {saved:.0f} MiB under --dtype bf16: {saved / own:.0%} of the {own:.0f} MiB the codes save (goal >= 60%)",
    )


def qlora():
    mem = "GPU" if DEVICE == "cuda" else "RSS"
    header = [
        "what",
        "compute",
        "linear layers B/weight",
        "whole base B/param",
        f"peak MiB ({mem})",
        "vs PEFT",
    ]
    header += ["tokens/s", "vs PEFT"]
    for name in Q_MODELS:
        with tempfile.TemporaryDirectory() as d:
            params, best = qlora_model(name, d)
        rows, summary = qlora_rows(best)
        table(
            f"QLoRA: {name} ({params / 1e6:.0f}M parameters), rank 16 on every linear layer, batch {Q_BATCH} x "
            f"{Q_SEQ}, {Q_STEPS - 1} timed steps, {DEVICE}; vs PEFT: the PEFT row of the same compute dtype",
            header,
            rows,
        )
        print(summary)


# ----------------------------------------------------------------------------- one frozen layer (#41)
LAYER_SHAPES = [(1536, 1536), (4096, 1536), (1536, 4096)]  # [out, in]: the 501M model's attention and MLP


def layer():
    """Forward + backward (the input's gradient) of one frozen NF4 layer on 256 tokens, lorakit's FrozenLinear
    against bitsandbytes' Linear4bit (nf4, double quantization), same compute dtype; interleaved, best of 5 x 20."""
    import time

    import bitsandbytes as bnb

    from lorakit.training import frozen, loop

    compute = loop.compute_dtype("auto", torch.device(DEVICE), codes=True)
    rows = []
    for out, inn in LAYER_SHAPES:
        W = torch.randn(out, inn, generator=torch.Generator().manual_seed(0)) * 0.02
        ours = frozen.FrozenLinear(frozen.quantize(W, "nf4"), dtype=compute)
        ours.workspace = frozen.Workspace()
        theirs = bnb.nn.Linear4bit(inn, out, bias=False, compute_dtype=compute, quant_type="nf4")
        theirs.weight = bnb.nn.Params4bit(
            W.to(compute), requires_grad=False, quant_type="nf4", compress_statistics=True
        )
        theirs = theirs.to(DEVICE)  # (quantizes)
        x = torch.randn(256, inn, dtype=compute, requires_grad=True)

        def step(module):
            module(x).sum().backward()

        best = {"lorakit": float("inf"), "bitsandbytes": float("inf")}
        for _ in range(5):
            for name, module in (("lorakit", ours), ("bitsandbytes", theirs)):
                step(module)
                t0 = time.perf_counter()
                for _ in range(20):
                    step(module)
                best[name] = min(best[name], (time.perf_counter() - t0) / 20)
        ratio = best["bitsandbytes"] / best["lorakit"]
        rows.append(
            [
                f"{out} x {inn}",
                f"{best['bitsandbytes'] * 1e3:.2f}",
                f"{best['lorakit'] * 1e3:.2f}",
                f"{ratio:.2f}x",
            ]
        )
    kernel = "C kernel" if frozen.native.kernel() else "pure torch (no C kernel here)"
    table(
        f"one frozen NF4 layer, forward + backward on 256 tokens, {str(compute).replace('torch.', '')}, {DEVICE}; "
        f"lorakit: {kernel}",
        ["weight [out x in]", "bitsandbytes ms", "lorakit ms", "lorakit speed vs bitsandbytes"],
        rows,
    )


# ----------------------------------------------------------------------------- defaults that learn (#41)
DEFAULTS_FILES = ("textwrap.py", "shlex.py", "fractions.py")  # CPython's own, as a new user's first text


def defaults():
    """`lorakit train --base <SmolLM2-135M folder> --data text.txt --steps 50`, every other option its default, on a
    full-precision base and with --quantize nf4: the held-out loss before and after."""
    import sysconfig

    import transformers
    from bench_quant_quality import reference_folder

    with tempfile.TemporaryDirectory() as d:
        folder, gguf, _, _ = reference_folder(d)
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            os.path.dirname(gguf), gguf_file=os.path.basename(gguf)
        )
        tokenizer.save_pretrained(folder)  # tokenizer.json, for text data
        stdlib = sysconfig.get_paths()["stdlib"]
        text = os.path.join(d, "text.txt")
        with open(text, "w") as f:
            f.write("\n\n".join(open(os.path.join(stdlib, n)).read() for n in DEFAULTS_FILES))
        rows = []
        for quantize in (None, "nf4"):
            r = run(
                "import json, lorakit\n"
                f"r = lorakit.train({folder!r}, {text!r}, {os.path.join(d, 'a.safetensors')!r}, steps=50, "
                f"quantize={quantize!r}, force=True, quiet=True)\n"
                "print('RESULT', json.dumps(r))"
            )
            rows.append(
                [f"--quantize {quantize}" if quantize else "full-precision base", r["compute_dtype"]]
                + [
                    f"{r['eval_loss_before']:.4f}",
                    f"{r['eval_loss']:.4f}",
                    f"{r['eval_loss'] - r['eval_loss_before']:+.4f}",
                ]
                + [f"{r['tokens_per_s']:.0f}", "; ".join(r["notes"]) or "-"]
            )
    table(
        f"lorakit train, defaults, 50 steps, SmolLM2-135M-Instruct on {', '.join(DEFAULTS_FILES)} ({DEVICE})",
        ["base", "compute", "held-out before", "after", "change", "tokens/s", "notes"],
        rows,
    )


if __name__ == "__main__":  # python benchmarks/bench_train.py [dense] [layer] [qlora] [defaults]
    chosen = sys.argv[1:] or ["dense", "layer", "qlora", "defaults"]
    if "dense" in chosen:
        dense()
    if "layer" in chosen:
        layer()
    if "qlora" in chosen:
        qlora()
    if "defaults" in chosen:
        defaults()
