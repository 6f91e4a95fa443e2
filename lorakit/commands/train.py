"""`lorakit train`: a minimal LoRA fine-tune of a Llama-family checkpoint, read top to bottom (nanoGPT style).

Data -> model (frozen base, LoRA factors in fp32) -> AdamW with warmup + cosine -> held-out eval -> adapter in the
spec format, with the settings in its provenance. Under torchrun the same command runs DistributedDataParallel:
`--batch` is the global batch, split evenly over the processes.
"""
import json
import math
import os
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..errors import LorakitError


# ----------------------------------------------------------------------------- data
def load_data(path, vocab_size, base=None):
    """Token ids from .npy / .bin (uint16, or uint32 when the vocabulary needs it: nanoGPT's memmap convention),
    .jsonl with input_ids (optional labels or loss_mask), or .txt / .jsonl text with the base's tokenizer.json.
    Returns ("stream", 1-D tensor) or ("records", [(ids, labels)]). Every id is checked against the vocabulary."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise LorakitError("no such data file", path=path)
    if path.endswith(".npy"):
        kind, data = "stream", torch.from_numpy(np.load(path).astype(np.int64).reshape(-1))
    elif path.endswith(".bin"):
        kind, data = "stream", torch.from_numpy(
            np.memmap(path, dtype=np.uint32 if vocab_size > 65536 else np.uint16, mode="r").astype(np.int64))
    elif path.endswith(".jsonl"):
        kind, data = "records", _read_jsonl(path, base)
    elif path.endswith(".txt"):
        with open(path) as f:
            kind, data = "stream", torch.tensor(_tokenizer(base, path).encode(f.read()).ids, dtype=torch.int64)
    else:
        raise LorakitError("data must be .npy, .bin, .jsonl or .txt", path=path)
    ids = data if kind == "stream" else torch.cat([r[0] for r in data]) if data else torch.zeros(0, dtype=torch.long)
    if ids.numel() == 0:
        raise LorakitError("no tokens in the data", path=path)
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise LorakitError(f"token id {int(ids[i])} at position {i} is outside the vocabulary [0, {vocab_size})",
                           path=path)
    return kind, data


def _read_jsonl(path, base):
    records, tokenizer = [], None
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                raise LorakitError(f"line {n} is not JSON", path=path) from None
            if "input_ids" in r:
                ids = torch.tensor(r["input_ids"], dtype=torch.int64)
            elif "text" in r:
                tokenizer = tokenizer or _tokenizer(base, path)
                ids = torch.tensor(tokenizer.encode(r["text"]).ids, dtype=torch.int64)
            else:
                raise LorakitError(f"line {n} has neither input_ids nor text", path=path)
            labels = torch.tensor(r["labels"], dtype=torch.int64) if "labels" in r else ids.clone()
            if "loss_mask" in r:
                labels[torch.tensor(r["loss_mask"]) == 0] = -100
            if labels.shape != ids.shape:
                raise LorakitError(f"line {n}: labels and input_ids differ in length", path=path)
            records.append((ids, labels))
    return records


def _tokenizer(base, path):
    tok = os.path.join(base or "", "tokenizer.json")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise LorakitError("text data needs the tokenizers package (pip install tokenizers)", path=path) from None
    if not os.path.isfile(tok):
        raise LorakitError("text data needs a tokenizer.json in the base folder", path=path)
    return Tokenizer.from_file(tok)


def split(kind, data, seq_len, val_fraction=0.1):
    """Held-out tail for evaluation: the last 10% of the tokens (or records)."""
    n = len(data)
    cut = n - max(seq_len + 1 if kind == "stream" else 1, int(n * val_fraction))
    if cut < (seq_len + 1 if kind == "stream" else 1):
        raise LorakitError(f"too little data: {n} {'tokens' if kind == 'stream' else 'records'} for seq-len {seq_len} "
                           "and a held-out split")
    return data[:cut], data[cut:]


def get_batch(kind, data, batch, seq_len, generator):
    """(x, y) of [batch, seq_len]; y is x shifted by one (-100 where no loss)."""
    if kind == "stream":
        starts = torch.randint(len(data) - seq_len, (batch,), generator=generator)
        x = torch.stack([data[s:s + seq_len] for s in starts])
        y = torch.stack([data[s + 1:s + 1 + seq_len] for s in starts])
        return x, y
    picks = torch.randint(len(data), (batch,), generator=generator)
    x = torch.zeros(batch, seq_len, dtype=torch.long)
    y = torch.full((batch, seq_len), -100, dtype=torch.long)
    for row, i in enumerate(picks.tolist()):
        ids, labels = data[i]
        n = min(len(ids) - 1, seq_len)
        x[row, :n], y[row, :n] = ids[:n], labels[1:n + 1]
    return x, y


# ----------------------------------------------------------------------------- training
def pick_device(device):
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def learning_rate(step, steps, lr, warmup):
    """Linear warmup, then cosine decay to lr / 10."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(base, data, output, rank=16, alpha=32.0, targets="q_proj,v_proj", steps=100, lr=2e-4, batch=8,
          seq_len=256, grad_accum=1, eval_every=50, warmup=None, device="auto", dtype="auto", seed=0,
          format="lorakit", resume=None, force=False, quiet=False):
    """Train a LoRA adapter on `base` (a Hugging Face Llama-family folder); returns a report, writes `output`."""
    from .. import lora
    from ..checkpoint import base_model_name
    from ..quant import WeightView
    from ..dtypes import user_dtype
    from ..model import LlamaForCausalLM
    from ..spec import fingerprint

    # distributed set-up (torchrun sets these); one process otherwise
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank_id = int(os.environ.get("RANK", 0))
    dev = pick_device(device)
    if world > 1:
        import torch.distributed as dist
        if dev.type == "cuda":
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        if batch % world:
            raise LorakitError(f"--batch {batch} (the global batch) must divide by the {world} processes")
    master = rank_id == 0
    if os.path.exists(output) and not force:
        raise LorakitError("output exists (use --force to overwrite)", path=output)
    base_dtype = user_dtype(dtype) if dtype != "auto" else (torch.bfloat16 if dev.type == "cuda" else torch.float32)

    # everything is checked before the first step: config, data, targets
    model = LlamaForCausalLM.from_pretrained(base, dtype=base_dtype, device=dev)
    kind, tokens = load_data(data, model.config.vocab_size, base)
    train_data, val_data = split(kind, tokens, seq_len)
    torch.manual_seed(seed)  # the factors' initialization: the same in every process and every run
    names = lora.inject(model, targets, rank=rank, alpha=alpha)
    if resume:
        from ..formats import load
        lora.load_into(model, load(resume))
    params = [p for p in model.parameters() if p.requires_grad]
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        net = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    warmup = max(1, steps // 10) if warmup is None else warmup
    autocast = torch.autocast(dev.type, dtype=base_dtype, enabled=base_dtype != torch.float32)
    generator = torch.Generator().manual_seed(seed)  # the same batches on every process: each takes its slice
    per_rank = batch // world

    def loss_of(x, y, module):
        with autocast:
            logits = module(x.to(dev))
        return F.cross_entropy(logits.float().flatten(0, 1), y.to(dev).flatten(), ignore_index=-100)

    @torch.no_grad()
    def evaluate(batches=4):
        g = torch.Generator().manual_seed(seed + 1)
        return sum(loss_of(*get_batch(kind, val_data, batch, seq_len, g), model).item() for _ in range(batches)) / batches

    losses, evals, seen, tokens_step0, t0 = [], [], 0, 0, time.perf_counter()
    bar = tqdm(range(steps), desc="train", disable=quiet or not master)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr, warmup)
        total = 0.0
        for micro in range(grad_accum):
            x, y = get_batch(kind, train_data, batch, seq_len, generator)
            x, y = x[rank_id * per_rank:(rank_id + 1) * per_rank], y[rank_id * per_rank:(rank_id + 1) * per_rank]
            sync = world == 1 or micro == grad_accum - 1
            with (net.no_sync() if not sync else nullcontext()):
                loss = loss_of(x, y, net) / grad_accum
                loss.backward()
            total += loss.item()
            seen += x.numel() * world
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
        if step == 0 and steps > 1:  # throughput is measured after the first (warm-up) step
            t0, tokens_step0, seen = time.perf_counter(), seen, 0
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            evals.append((step + 1, evaluate()))
        bar.set_postfix(loss=f"{total:.4f}", tok_s=f"{seen / max(time.perf_counter() - t0, 1e-9):.0f}")
    elapsed = time.perf_counter() - t0
    eval_loss = evaluate()
    evals.append((steps, eval_loss))

    report = {"output": os.fspath(output), "modules": len(names), "steps": steps, "tokens": seen + tokens_step0,
              "first_loss": losses[0], "final_loss": losses[-1], "eval_loss": eval_loss, "evals": evals,
              "tokens_per_s": seen / elapsed if seen else tokens_step0 / elapsed, "device": str(dev), "processes": world}
    if master:
        adapter = lora.extract(model)
        adapter.base_model = base_model_name(base)
        adapter.base_fingerprint = fingerprint(WeightView(base).shapes())
        adapter.provenance = {"operation": "train", "parents": [{"file": os.path.basename(os.fspath(data)),
                                                                 "role": "data"}],
                              "params": {"rank": rank, "alpha": alpha, "targets": targets, "steps": steps, "lr": lr,
                                         "batch": batch, "seq_len": seq_len, "grad_accum": grad_accum,
                                         "warmup": warmup, "seed": seed, "dtype": str(base_dtype), "processes": world},
                              "final_loss": losses[-1], "eval_loss": eval_loss}
        adapter.save(output, format=format, force=force)
    if world > 1:
        torch.distributed.barrier()
    return report
