"""Built-in examples and fixtures: small Llama-style base checkpoints (full precision or quantized) and adapters for
them. Used by `demo`, the tests and the benchmarks; nothing else in the library depends on this file."""

import json
import os

import torch

from .core import Adapter, Module
from .errors import LorakitError
from .io.dtypes import dtype_name, st_dtype
from .io.safetensors import Entry
from .quant import requant
from .quant.fp8 import FP8Block, FP8Channel
from .quant.gptq_awq import AWQ, GPTQ
from .quant.int8 import Int8Channel
from .quant.nf4 import NF4, NF4_LEVELS
from .spec import fingerprint

LINEAR_TARGETS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def llama_shapes(layers=2, hidden=64, intermediate=128, vocab=256, heads=4, kv_heads=2, tie=False):
    """Tensor name -> shape of a Llama-family checkpoint (Hugging Face names)."""
    head_dim = hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (heads * head_dim, hidden),
                p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
                p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
                p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
                p + "mlp.gate_proj.weight": (intermediate, hidden),
                p + "mlp.up_proj.weight": (intermediate, hidden),
                p + "mlp.down_proj.weight": (hidden, intermediate),
                p + "input_layernorm.weight": (hidden,),
                p + "post_attention_layernorm.weight": (hidden,),
            }
        )
    if not tie:
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def llama_config(layers=2, hidden=64, intermediate=128, vocab=256, heads=4, kv_heads=2, tie=False):
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": tie,
        "hidden_act": "silu",
    }


def random_tensors(shapes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if len(shape) == 1:  # norms: near 1
            out[name] = (1 + 0.1 * torch.randn(shape, generator=g)).to(dtype)
        else:
            out[name] = (torch.randn(shape, generator=g) / shape[-1] ** 0.5).to(dtype)
    return out


def write_llama_checkpoint(folder, dtype=torch.float32, seed=0, shards=1, **size):
    """A Hugging Face style folder (config.json + model.safetensors, or `shards` files with an index) with random
    weights. Returns the tensors."""
    os.makedirs(folder, exist_ok=True)
    tensors = random_tensors(llama_shapes(**size), dtype, seed)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({**llama_config(**size), "torch_dtype": dtype_name(dtype)}, f, indent=2)
    write_sharded(folder, tensors, shards)
    return tensors


def write_quantized_llama(folder, fmt, seed=0, group_size=32, **size):
    """A random Llama folder whose blocks' linear weights are stored in a quantized format (`quantize`'s fmt),
    with its quantization_config. Returns the full-precision tensors it was quantized from."""
    tensors = random_tensors(llama_shapes(**size), torch.float32, seed)
    write_quantized(folder, tensors, llama_config(**size), fmt, group_size)
    return tensors


def write_quantized(folder, tensors, config, fmt, group_size=128):
    """A Hugging Face folder of a Llama-family model's tensors with the blocks' linear weights quantized to `fmt`
    (nearest rounding, `quantize`) and the quantization_config added to `config`."""
    os.makedirs(folder, exist_ok=True)
    stored = {}
    for name, t in tensors.items():
        module = name[: -len(".weight")]
        if name.startswith("model.layers.") and module.endswith(LINEAR_TARGETS):
            stored.update({f"{module}.{k}": v for k, v in quantize(t, fmt, group_size).items()})
        else:
            stored[name] = t
    config = {**config, "quantization_config": quantization_config(fmt, group_size)}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    write_sharded(folder, stored)


def write_sharded(folder, tensors, shards=1):
    """Save tensors as model.safetensors, or as `shards` files plus model.safetensors.index.json."""
    from .io import write_safetensors

    names = list(tensors)
    if shards == 1:
        write_safetensors(os.path.join(folder, "model.safetensors"), tensors, {"format": "pt"})
        return
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i * per : (i + 1) * per]}
        write_safetensors(os.path.join(folder, file), part, {"format": "pt"})
        weight_map.update({n: file for n in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def write_permutation_task(folder, vocab=64, tokens=8000, seed=0):
    """The built-in synthetic task (demo, tests): a tiny random Llama in `folder`/base and a token stream in
    `folder`/data.npy where every token is followed by a fixed permutation of itself: learnable by a LoRA, not known
    to the base. Returns (base folder, data file)."""
    import numpy as np

    base, data = os.path.join(folder, "base"), os.path.join(folder, "data.npy")
    write_llama_checkpoint(base, vocab=vocab, hidden=64, intermediate=128, layers=2, seed=seed)
    rng = np.random.default_rng(seed)
    perm, stream = rng.permutation(vocab), [0]
    for _ in range(tokens):
        stream.append(int(perm[stream[-1]]))
    np.save(data, np.array(stream, dtype=np.uint16))
    return base, data


def random_adapter(
    shapes,
    targets=("q_proj", "v_proj"),
    rank=4,
    alpha=8.0,
    dtype=torch.float32,
    seed=0,
    magnitude=1.0,
    base_model=None,
):
    """A LoRA adapter on every 2-D weight whose name contains one of `targets` (B nonzero, unlike at init)."""
    g = torch.Generator().manual_seed(seed)
    ad = Adapter(
        base_model=base_model,
        base_fingerprint=fingerprint(shapes),
        provenance={"operation": "example", "params": {"seed": seed, "rank": rank}},
    )
    for name, shape in sorted(shapes.items()):
        if len(shape) == 2 and name.endswith(".weight") and any(t in name for t in targets):
            out, inp = shape
            A = torch.randn(rank, inp, generator=g) / inp**0.5
            B = magnitude * torch.randn(out, rank, generator=g) / rank**0.5
            ad.add(Module(name[: -len(".weight")], A.to(dtype), B.to(dtype), alpha=alpha))
    return ad


class TensorDict:
    """A dict of tensors with the little of the Checkpoint interface the quantized formats use."""

    def __init__(self, tensors, kinds=None):
        """kinds: name -> (GGML type, shape) for packed GGUF blocks (bytes as uint8)."""
        self.tensors, self.path = tensors, "<memory>"
        self.where = dict.fromkeys(tensors, "<memory>")
        self._entries = {
            k: Entry(
                k, *(kinds or {}).get(k, (st_dtype(v.dtype), tuple(v.shape))), 0, v.numel() * v.element_size()
            )
            for k, v in tensors.items()
        }

    def __contains__(self, name):
        return name in self.tensors

    def get(self, name):
        return self.tensors[name]

    def entry(self, name):
        return self._entries[name]


def quantize(W, fmt, group_size=128, bits=4):
    """Quantize a weight [out, in] into a format's stored tensors (names relative to the module: 'weight',
    'weight_scale', 'qweight', ...): for building quantized example checkpoints (tests, benchmarks). Nearest
    rounding, with the format's own fit and encode."""
    out, inn = W.shape
    if fmt == "fp8":
        handler, t = (
            FP8Channel(),
            {
                "weight": torch.zeros(out, inn).to(torch.float8_e4m3fn),
                "weight_scale": torch.zeros(out, 1, dtype=torch.bfloat16),
            },
        )
        members = {"weight": "weight", "weight_scale": "weight_scale"}
    elif fmt == "fp8-block":
        handler = FP8Block()
        t = {
            "weight": torch.zeros(out, inn).to(torch.float8_e4m3fn),
            "weight_scale_inv": torch.zeros(-(-out // 128), -(-inn // 128)),
        }
        members = {"weight": "weight", "weight_scale_inv": "weight_scale_inv"}
    elif fmt == "nf4":
        n, state = out * inn, {"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [out, inn]}
        handler, key = NF4(), "weight.quant_state.bitsandbytes__nf4"
        t = {
            "weight": torch.zeros((n + 1) // 2, 1, dtype=torch.uint8),
            "weight.absmax": torch.zeros(-(-n // 64)),
            "weight.quant_map": torch.tensor(NF4_LEVELS),
            key: torch.frombuffer(bytearray(json.dumps(state).encode()), dtype=torch.uint8),
        }
        members = {"weight": "weight", "state": key}
    elif fmt == "int8":
        handler, t = (
            Int8Channel(),
            {
                "weight": torch.zeros(out, inn, dtype=torch.int8),
                "weight_scale": torch.zeros(out, 1, dtype=torch.bfloat16),
            },
        )
        members = {"weight": "weight", "weight_scale": "weight_scale"}
    elif fmt in ("gptq", "awq"):
        groups, per = inn // group_size, 32 // bits
        handler = GPTQ(bits, group_size, sym=True) if fmt == "gptq" else AWQ(group_size, bits)
        t = {
            "qweight": torch.zeros(inn // per, out, dtype=torch.int32)
            if fmt == "gptq"
            else torch.zeros(inn, out // per, dtype=torch.int32),
            "qzeros": torch.zeros(groups, out // per, dtype=torch.int32),
            "scales": torch.zeros(groups, out, dtype=torch.float16),
        }
        members = {"qweight": "qweight", "qzeros": "qzeros", "scales": "scales"}
    else:
        handler, t, members = compressed_stub(W, fmt, group_size)
    ckpt = TensorDict(t)
    grid = requant.fit(handler, ckpt, members, handler.grid(ckpt, members), [(0, inn, W.float())])
    S, Z = grid.columns(0, inn)
    U = W.float() / S + Z if Z is not None else W.float() / S
    stored = handler.encode(ckpt, members, grid.codebook.round(U)[0], grid)
    return {
        **{k: v for k, v in t.items() if k not in stored},
        **stored,
    }  # NF4's quant_map and state are fixed


def compressed_stub(W, fmt, group_size):
    """(format, zeroed tensors, members) of the compressed-tensors / NVFP4 / MXFP8 layouts llm-compressor writes
    (ct-int: 4-bit symmetric groups; nvfp4: its global scale 448 x 6 / max |W|)."""
    from .quant.ct_packed import CTPacked
    from .quant.mxfp8 import MXFP8
    from .quant.nvfp4 import NVFP4

    out, inn = W.shape
    if fmt == "ct-int":
        handler = CTPacked({4})
        t = {
            "weight_packed": torch.zeros(out, -(-inn // 8), dtype=torch.int32),
            "weight_scale": torch.zeros(out, inn // group_size, dtype=torch.bfloat16),
            "weight_shape": torch.tensor([out, inn]),
        }
    elif fmt == "nvfp4":
        handler = NVFP4("compressed-tensors")
        t = {
            "weight_packed": torch.zeros(out, inn // 2, dtype=torch.uint8),
            "weight_scale": torch.zeros(out, inn // 16).to(torch.float8_e4m3fn),
            "weight_global_scale": (448.0 * 6.0 / W.abs().amax().float().clamp(min=1e-12)).reshape(1),
        }
    elif fmt == "mxfp8":
        handler = MXFP8()
        t = {
            "weight": torch.zeros(out, inn).to(torch.float8_e4m3fn),
            "weight_scale": torch.zeros(out, inn // 32, dtype=torch.uint8),
        }
    else:
        raise LorakitError(
            f"cannot quantize to '{fmt}' (fp8, fp8-block, int8, gptq, awq, nf4, ct-int, nvfp4, mxfp8)"
        )
    return handler, t, {k: k for k in t}


def quantize_gguf(W, kind):
    """A weight [out, in] as the bytes of a GGML block type (`kind`: Q8_0 ... Q6_K): a min/max fit of every
    sub-block with the format's own fit (--strategy rescale's), nearest codes. For GGUF fixtures (tests,
    benchmarks)."""
    from .quant.gguf import TYPES, GGUFBlocks

    t, (out, inn) = TYPES[kind], W.shape
    ckpt = TensorDict(
        {"w": torch.zeros(out * (inn // t.block) * t.size, dtype=torch.uint8)}, {"w": (kind, (out, inn))}
    )
    blocks = W.float().reshape(out, -1, t.sub)
    fmt = GGUFBlocks()
    grid = fmt.fit(ckpt, {"weight": "w"}, blocks.amin(-1).T, blocks.amax(-1).T)
    S, Z = grid.columns(0, inn)
    codes, _ = grid.codebook.round(W.float() / S + Z if Z is not None else W.float() / S)
    return fmt.encode(ckpt, {"weight": "w"}, codes, grid)["w"]


def quantization_config(fmt, group_size=128, bits=4):
    """The config.json `quantization_config` that goes with `quantize`'s tensors."""
    return {
        "fp8": {"quant_method": "compressed-tensors", "format": "float-quantized"},
        "fp8-block": {"quant_method": "fp8", "weight_block_size": [128, 128], "fmt": "e4m3"},
        "nf4": {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
        "int8": {"quant_method": "compressed-tensors", "format": "int-quantized"},
        "gptq": {
            "quant_method": "gptq",
            "bits": bits,
            "group_size": group_size,
            "sym": True,
            "desc_act": False,
            "checkpoint_format": "gptq",
        },
        "awq": {
            "quant_method": "awq",
            "bits": bits,
            "group_size": group_size,
            "version": "gemm",
            "zero_point": True,
        },
        "ct-int": compressed_tensors_config("pack-quantized", num_bits=4, type="int", group_size=group_size),
        "nvfp4": compressed_tensors_config(
            "nvfp4-pack-quantized", num_bits=4, type="float", group_size=16, strategy="tensor_group"
        ),
        "mxfp8": compressed_tensors_config(
            "mxfp8-quantized", num_bits=8, type="float", group_size=32, scale_dtype="torch.uint8"
        ),
    }[fmt]


def compressed_tensors_config(fmt, **weights):
    """A compressed-tensors quantization_config of one group over every Linear but lm_head, as llm-compressor
    writes it."""
    weights = {"symmetric": True, "strategy": "group", "dynamic": False, **weights}
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "format": fmt}},
        "ignore": ["lm_head"],
    }
