"""`lorakit train`: a minimal LoRA fine-tune of a Llama-family checkpoint, read top to bottom (nanoGPT style).

Data -> model (frozen base, LoRA factors in fp32) -> AdamW with warmup + cosine -> held-out eval -> adapter in the
spec format, with the settings in its provenance. Under torchrun the same command runs DistributedDataParallel:
`--batch` is the global batch, split evenly over the processes.
"""

import math
import os
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from ..errors import LorakitError
from ..io.dtypes import user_dtype
from ..bases import open_base
from ..progress import progress
from ..devices import device_memory, pick_device
from ..spec import fingerprint
from ..options import parse_size
from ..render import human_size
from . import lora, native
from .data import get_batch, load_data, split
from .frozen import FrozenLinear
from .memory import peak, steady_heap
from .memory import plan as memory_plan
from .model import LlamaForCausalLM


# ----------------------------------------------------------------------------- training


def compute_dtype(dtype, dev, codes):
    """--dtype auto: bf16 on a GPU; on a CPU, bf16 where the frozen linear layers are codes (QLoRA's compute dtype:
    fp32 adds nothing to 4- or 8-bit weights but doubles the activations) and the CPU has bf16 instructions
    (AVX512-BF16 / AMX; measured 1.6x fp32's tokens/s), fp32 otherwise."""
    if dtype != "auto":
        return user_dtype(dtype)
    if dev.type == "cuda":
        return torch.bfloat16
    bf16_cpu = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return torch.bfloat16 if dev.type == "cpu" and codes and bf16_cpu else torch.float32


def load_model(base, dev, dtype, quantize, checkpointing):
    """The frozen model: a quantized base's linear layers kept as their codes, or quantized on load (--quantize)."""
    if quantize and base.quantized:
        raise LorakitError(
            f"--quantize {quantize}: the base is already quantized ({base.view.handler.name}); training keeps "
            "its own codes, so leave --quantize out",
            path=base.path,
        )
    model = LlamaForCausalLM.from_pretrained(base, dtype=dtype, device=dev, quantize=quantize)
    model.checkpointing = checkpointing
    return model


def kernel_notes(model):
    """Said where 4-bit layers dequantize in pure torch for want of the C kernel (slower, the same weights)."""
    if any(getattr(m, "lut", None) is not None for m in model.modules()) and native.kernel() is None:
        return [
            "4-bit codes dequantized by pure torch (about 4x slower than the C kernel, which needs a CPU with "
            "AVX-512 and a working C compiler: CC, else cc)"
        ]
    return []


def codes_record(base, quantize):
    """Which codes the frozen linear layers were: the base's own format, made on load (--quantize), or none."""
    if base.quantized:
        return {"format": base.view.handler.name, "source": "base"}
    return {"format": quantize, "source": "quantized on load"} if quantize else None


def frozen_record(model):
    """How many linear layers are kept as codes, their weights and the bytes they hold."""
    layers = [m for m in model.modules() if isinstance(m, FrozenLinear)]
    return {
        "frozen_layers": len(layers),
        "frozen_weights": sum(m.out_features * m.in_features for m in layers),
        "frozen_bytes": sum(m.stored_bytes() for m in layers),
    }


def fits(model, batch, seq_len, checkpointing, dtype, max_memory, dev):
    """The memory estimate of one process (MemoryPlan); refused before the first step when over --max-memory, or
    without it over all the memory the device has (it could only end killed for want of memory)."""
    estimate = memory_plan(model, batch, seq_len, checkpointing, dtype)
    limit = parse_size(max_memory, "--max-memory")
    over = f"--max-memory {max_memory}"
    if limit is None:
        limit = device_memory(dev)
        over = f"all {human_size(limit)} of memory {'this GPU' if dev.type == 'cuda' else 'this machine'} has"
    if limit is not None and estimate.total > limit:
        gb = {k: human_size(v) for k, v in estimate.record().items()}
        raise LorakitError(
            f"training needs about {gb['total']} a process (base {gb['base']}, LoRA and AdamW "
            f"{gb['trainable']}, activations {gb['activations']}, the dequantization workspace {gb['workspace']}), over "
            f"{over}: use --quantize nf4, --checkpointing, or a smaller --batch / --seq-len"
        )
    return estimate


def learning_rate(step, steps, lr, warmup):
    """Linear warmup, then cosine decay to lr / 10."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(
    base,
    data,
    output,
    rank=16,
    alpha=32.0,
    targets="q_proj,v_proj",
    steps=100,
    lr=2e-4,
    batch=8,
    seq_len=256,
    grad_accum=1,
    eval_every=50,
    warmup=None,
    device="auto",
    dtype="auto",
    seed=0,
    format="lorakit",
    resume=None,
    quantize=None,
    checkpointing=False,
    max_memory=None,
    force=False,
    quiet=False,
):
    """Train a LoRA adapter on `base` (a Hugging Face Llama-family folder); returns a report, writes `output`."""
    # distributed set-up (torchrun sets these); one process otherwise
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank_id = int(os.environ.get("RANK", 0))
    dev = pick_device(device)
    if dev.type == "cpu":
        steady_heap()
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

    # everything is checked before the first step: config, data, targets
    base = open_base(base)  # headers and config.json read once, for the model and the adapter's record
    base.hf_config()  # a folder without config.json is told so before its shards are read
    base_dtype = compute_dtype(dtype, dev, codes=bool(quantize) or base.quantized)
    model = load_model(base, dev, base_dtype, quantize, checkpointing)
    kind, tokens = load_data(data, model.config.vocab_size, base)
    train_data, val_data = split(kind, tokens, seq_len)
    torch.manual_seed(seed)  # the factors' initialization: the same in every process and every run
    names = lora.inject(model, targets, rank=rank, alpha=alpha)
    if resume:
        from ..formats import load

        start = load(resume)
        if start.transforms:  # IA3, HRA, OFT: no LoRA factors to start from
            raise LorakitError(
                "--resume takes a LoRA adapter, not a multiplicative one", path=resume, code="LK508"
            )
        lora.load_into(model, start)
    per_rank = batch // world
    memory = fits(model, per_rank, seq_len, checkpointing, base_dtype, max_memory, dev)
    params = [p for p in model.parameters() if p.requires_grad]
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    warmup = max(1, steps // 10) if warmup is None else warmup
    autocast = torch.autocast(dev.type, dtype=base_dtype, enabled=base_dtype != torch.float32)
    generator = torch.Generator().manual_seed(seed)  # the same batches on every process: each takes its slice

    def loss_of(x, y, module):
        with autocast:
            logits = module(x.to(dev))
        return F.cross_entropy(logits.float().flatten(0, 1), y.to(dev).flatten(), ignore_index=-100)

    @torch.no_grad()
    def evaluate(batches=4):
        g = torch.Generator().manual_seed(seed + 1)
        return (
            sum(loss_of(*get_batch(kind, val_data, batch, seq_len, g), model).item() for _ in range(batches))
            / batches
        )

    eval_before = evaluate()  # the base's own held-out loss (every B starts at zero): what training must beat
    losses, evals, seen, tokens_step0, t0 = [], [], 0, 0, time.perf_counter()
    bar = progress(range(steps), quiet=quiet or not master, desc="train")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr, warmup)
        total = 0.0
        for micro in range(grad_accum):
            x, y = get_batch(kind, train_data, batch, seq_len, generator)
            x, y = (
                x[rank_id * per_rank : (rank_id + 1) * per_rank],
                y[rank_id * per_rank : (rank_id + 1) * per_rank],
            )
            sync = world == 1 or micro == grad_accum - 1
            with net.no_sync() if not sync else nullcontext():
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

    report = {
        "output": os.fspath(output),
        "base": os.fspath(base),
        "module_count": len(names),
        "notes": (kernel_notes(model) if dev.type == "cpu" else []) + worse_note(eval_before, eval_loss, lr),
        "steps": steps,
        "tokens": seen + tokens_step0,
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "losses": losses,
        "eval_loss": eval_loss,
        "eval_loss_before": eval_before,
        "evals": evals,
        "tokens_per_s": seen / elapsed if seen else tokens_step0 / elapsed,
        "device": str(dev),
        "compute_dtype": str(base_dtype).replace("torch.", ""),
        "processes": world,
        "base_codes": codes_record(base, quantize),
        **frozen_record(model),
        "memory_estimate": memory.record(),
        "peak_memory": peak(dev),
    }
    if master:
        adapter = lora.extract(model)
        adapter.base_model = base.name
        adapter.base_fingerprint, adapter.base_identity = fingerprint(base.shapes()), base.identity
        adapter.provenance = {
            "operation": "train",
            "parents": [{"file": os.path.basename(os.fspath(data)), "role": "data"}],
            "params": {
                "rank": rank,
                "alpha": alpha,
                "targets": targets,
                "steps": steps,
                "lr": lr,
                "batch": batch,
                "seq_len": seq_len,
                "grad_accum": grad_accum,
                "warmup": warmup,
                "seed": seed,
                "dtype": str(base_dtype),
                "processes": world,
                "quantize": quantize,
                "checkpointing": checkpointing,
            },
            "base_codes": report["base_codes"],
            "final_loss": losses[-1],
            "eval_loss": eval_loss,
        }
        adapter.save(output, format=format, force=force)
    if world > 1:
        torch.distributed.barrier()
    return report


def worse_note(before, after, lr):
    """Said plainly when training made the held-out loss worse than the base's own."""
    if after <= before:  # (a NaN is not: said too)
        return []
    return [
        f"training made the held-out loss WORSE: {before:.4f} before, {after:.4f} after; the adapter does not help "
        f"on this data as trained (a lower --lr than {lr:g}, more data, or fewer steps)"
    ]
