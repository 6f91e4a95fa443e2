"""What a training process will hold at its peak, estimated before the first step (--max-memory), and measured.

The base and the trainable state are counted exactly from the model's tensors; activations by what autograd saves
per token in each block (the inputs of every matmul, norm and activation), with or without checkpointing, plus the
logits and the largest weight a FrozenLinear dequantizes for a step."""

from dataclasses import asdict, dataclass

import torch

from .frozen import FrozenLinear

ADAM_BYTES = 16  # per trainable fp32 parameter: the value, its gradient and AdamW's two moments


@dataclass
class MemoryPlan:
    codes: int  # the frozen linear layers kept as codes: codes, scales, tables (bytes)
    weights: int  # the frozen model's full-precision tensors: embeddings, head, norms, unquantized layers
    trainable: int  # LoRA factors, gradients, AdamW state
    activations: int
    workspace: int  # a dequantized weight in the compute dtype and its temporaries (frozen.Workspace)

    @property
    def base(self):
        return self.codes + self.weights

    @property
    def total(self):
        return self.base + self.trainable + self.activations + self.workspace

    def record(self):
        return {**asdict(self), "base": self.base, "total": self.total}


def _bytes(tensors):
    seen, total = set(), 0
    for t in tensors:
        if t is not None and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def plan(model, batch, seq_len, checkpointing, dtype):
    """The estimate for one process training `model` on batches of `batch` x `seq_len` tokens."""
    layers = [m for m in model.modules() if isinstance(m, FrozenLinear)]
    codes = [t for m in layers for t in m.buffers()]
    held = {t.data_ptr() for t in codes}
    frozen = [t for t in model.parameters() if not t.requires_grad] + list(model.buffers())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    c, size = model.config, torch.finfo(dtype).bits // 8
    tokens = batch * seq_len
    kv = c.num_key_value_heads * c.dim_head
    per_block = (  # saved for backward per token: norm inputs, q/k/v, attention output, the MLP's three
        4 * c.hidden_size + c.num_attention_heads * c.dim_head * 3 + 2 * kv + 4 * c.intermediate_size
    )
    blocks = c.num_hidden_layers
    kept = tokens * size * (c.hidden_size * blocks + per_block if checkpointing else per_block * blocks)
    logits = tokens * c.vocab_size * (size + 8)  # the logits, their fp32 copy and its gradient
    largest = max((m.out_features * m.in_features for m in layers), default=0)
    weights = _bytes(t for t in frozen if t.data_ptr() not in held)
    return MemoryPlan(_bytes(codes), weights, trainable * ADAM_BYTES, kept + logits, largest * (size + 8))


def peak(device):
    """The process's measured peak (bytes): the CUDA allocator's, else the resident set's high-water mark."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MAPPED_FROM = 4 << 20


def steady_heap():
    """Blocks of 4 MiB and more are mapped and unmapped (glibc; elsewhere nothing changes). glibc's default raises
    that threshold up to 32 MiB each time a large block is freed, after which steps leave holes in the heap: the peak
    of identical `train --quantize nf4` runs of a 501M model ranged over 1.40 to 1.88 GiB, 1.39 GiB with this at the
    same speed (1 MiB cost 8%, 128 KiB 35%, in page faults); a dense fp32 run of bench_train: 0.89 of the peak at
    0.96-0.99 of the speed, activations of 4 MiB and more being mapped afresh each step."""
    import ctypes

    try:
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, MAPPED_FROM)
    except (OSError, AttributeError):  # not glibc: its allocator is left as it is
        pass
