"""A Llama-family decoder in one file: RMSNorm, RoPE, grouped-query attention through scaled_dot_product_attention,
SwiGLU. Module names mirror Hugging Face's (model.layers.0.self_attn.q_proj ...), so a checkpoint loads by name and
an adapter trained here merges into that checkpoint directly. Loads Llama / Mistral / Qwen2-style folders
(config.json + safetensors, sharded or not) and gives the same logits as transformers."""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..errors import LorakitError, with_path
from ..bases import open_base
from .frozen import FrozenLinear
from .frozen import quantize as frozen_codes
from .frozen import share_workspace
from .weights import Weights


MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    head_dim: int = None

    @classmethod
    def from_dict(cls, c):
        """The config of a Llama / Mistral / Qwen2 config.json; anything else is refused (a Granite or Gemma config
        has the same keys but other math)."""
        if c.get("model_type") not in MODEL_TYPES:
            raise LorakitError(
                f"model_type '{c.get('model_type')}' is not one lorakit's model implements "
                f"({', '.join(MODEL_TYPES)})"
            )
        for key in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        ):
            if not isinstance(c.get(key), int) or isinstance(c.get(key), bool) or c[key] < 1:
                raise LorakitError(f"'{key}' must be a positive integer, got {c.get(key)!r}")
        if c.get("hidden_act", "silu") != "silu":
            raise LorakitError(f"hidden_act {c['hidden_act']} is not SwiGLU/silu")
        scaling = c.get("rope_scaling") or {}
        if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
            raise LorakitError(
                f"rope_scaling {scaling.get('rope_type', scaling.get('type'))} is not supported"
            )
        rope = c.get("rope_theta") or (c.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        qwen2 = c.get("model_type") == "qwen2"
        kv = c.get("num_key_value_heads") or c["num_attention_heads"]
        if (
            not isinstance(kv, int)
            or c["num_attention_heads"] % kv
            or (not c.get("head_dim") and c["hidden_size"] % c["num_attention_heads"])
        ):
            raise LorakitError(
                "the head counts do not divide: num_attention_heads "
                f"{c['num_attention_heads']}, num_key_value_heads {kv}, hidden_size {c['hidden_size']}"
            )
        return cls(
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_hidden_layers=c["num_hidden_layers"],
            num_attention_heads=c["num_attention_heads"],
            num_key_value_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
            rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            rope_theta=rope,
            tie_word_embeddings=c.get("tie_word_embeddings", False),
            attention_bias=c.get("attention_bias", qwen2),
            mlp_bias=c.get("mlp_bias", False),
            head_dim=c.get("head_dim"),
        )

    @property
    def dim_head(self):
        return self.head_dim or self.hidden_size // self.num_attention_heads


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope(positions, dim, theta, dtype):
    """cos, sin of shape [T, dim] (the two halves repeated, as transformers' rotate_half expects)."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float().to(positions.device) / dim)
    )
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        d, hd = c.hidden_size, c.dim_head
        self.q_proj = nn.Linear(d, c.num_attention_heads * hd, bias=c.attention_bias)
        self.k_proj = nn.Linear(d, c.num_key_value_heads * hd, bias=c.attention_bias)
        self.v_proj = nn.Linear(d, c.num_key_value_heads * hd, bias=c.attention_bias)
        self.o_proj = nn.Linear(c.num_attention_heads * hd, d, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        hd, nh, nkv = self.c.dim_head, self.c.num_attention_heads, self.c.num_key_value_heads
        q = self.q_proj(x).view(B, T, nh, hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, nkv, hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, nkv, hd).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=nkv != nh)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, nh * hd))


class MLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.checkpointing = False  # gradient checkpointing per block (--checkpointing)
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, ids):
        x = self.model.embed_tokens(ids)
        cos, sin = rope(
            torch.arange(ids.shape[1], device=ids.device),
            self.config.dim_head,
            self.config.rope_theta,
            x.dtype,
        )
        for block in self.model.layers:
            # checkpointing: the block is recomputed in backward, so only its input is kept
            if self.checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin)
        return self.lm_head(self.model.norm(x))

    @classmethod
    def from_pretrained(cls, folder, dtype=torch.float32, device="cpu", quantize=None):
        """Load a Llama / Mistral / Qwen2 model: a Hugging Face folder (sharded or not, any quantized format lorakit
        reads) or a llama.cpp GGUF, as a path or an opened Base. The blocks' linear layers of a quantized base stay
        as their codes (FrozenLinear), and `quantize` (nf4, int8, fp8) makes codes of a full-precision base's; every
        other weight is loaded in `dtype`."""
        weights = Weights(open_base(folder))
        try:
            config = LlamaConfig.from_dict(weights.config)
        except LorakitError as e:
            raise with_path(e, weights.config_path()) from None
        with torch.device("meta"):
            model = cls(config)
        frozen = set(freeze_linears(model, weights, quantize, dtype, device))
        state = {}
        for name, p in model.state_dict(keep_vars=True).items():
            if name.rpartition(".")[0] in frozen:
                continue
            if name not in weights:
                if name == "lm_head.weight" and config.tie_word_embeddings:
                    continue
                raise LorakitError(
                    "the checkpoint has no tensor for this parameter", path=weights.base.path, tensor=name
                )
            t = weights.get(name)
            if tuple(t.shape) != tuple(p.shape):
                raise LorakitError(
                    f"shape {list(t.shape)}, the config says {list(p.shape)}",
                    path=weights.base.path,
                    tensor=name,
                )
            state[name] = t.to(device=device, dtype=dtype)
        model.load_state_dict(state, strict=False, assign=True)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        share_workspace(model)
        return model.eval()


def freeze_linears(model, weights, quantize, dtype, device):
    """Swap every linear layer of the blocks whose weight is quantized (or is to be: `quantize`) for a FrozenLinear
    of its codes; returns their names. The embeddings and the head stay in `dtype`, as in QLoRA."""
    frozen = []
    for name, layer in list(model.named_modules()):
        if not (isinstance(layer, nn.Linear) and name.startswith("model.layers.")):
            continue
        weight = name + ".weight"
        if weight not in weights:
            continue  # reported by the caller, with the other missing tensors
        stored = weights.stored(weight)
        if stored is None and quantize:
            stored = frozen_codes(weights.get(weight), quantize)
        if stored is None:
            continue
        if tuple(stored.codes.shape) != (layer.out_features, layer.in_features):
            raise LorakitError(
                f"shape {list(stored.codes.shape)}, the config says {[layer.out_features, layer.in_features]}",
                path=weights.base.path,
                tensor=weight,
            )
        bias = weights.get(name + ".bias") if layer.bias is not None else None
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, FrozenLinear(stored, bias, dtype).to(device))
        frozen.append(name)
    return frozen


def dequantized(base):
    """(config.json, {Hugging Face name: fp32 tensor}) of every weight lorakit's model loads from `base`, quantized
    ones dequantized: a base as the full-precision folder it stands for (the head left out when tied)."""
    weights = Weights(base)
    config = {k: v for k, v in weights.config.items() if k != "quantization_config"}
    with torch.device("meta"):
        names = list(LlamaForCausalLM(LlamaConfig.from_dict(config)).state_dict())
    return config, {n: weights.get(n).float().contiguous() for n in names if n in weights}
