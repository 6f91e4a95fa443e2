"""Hugging Face <-> llama.cpp tensor names, and llama.cpp's Q/K row permutation."""

import re

from ..errors import LorakitError

LAYER_MAP = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
GLOBAL_MAP = {"model.embed_tokens": "token_embd", "lm_head": "output"}


def to_gguf_name(module):
    if module in GLOBAL_MAP:
        return GLOBAL_MAP[module]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", module)
    if m and m[2] in LAYER_MAP:
        return f"blk.{m[1]}.{LAYER_MAP[m[2]]}"
    raise LorakitError(
        f"no llama.cpp tensor name for module '{module}' (Llama family: attention, MLP, embeddings, lm_head)"
    )


def from_gguf_name(name):
    inverse = {v: k for k, v in GLOBAL_MAP.items()}
    if name in inverse:
        return inverse[name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    layer = {v: k for k, v in LAYER_MAP.items()}
    if m and m[2] in layer:
        return f"model.layers.{m[1]}.{layer[m[2]]}"
    return None


def _heads_fit(rows, n_head):
    if isinstance(n_head, bool) or not isinstance(n_head, int) or n_head < 1 or rows.shape[0] % (2 * n_head):
        raise LorakitError(
            f"head count {n_head!r} does not divide the {rows.shape[0]} rows into rotary halves"
        )


def permute(rows, n_head, n_head_kv=None):
    """llama.cpp's Q/K row order: within each head, interleave the two rotary halves (convert_hf_to_gguf)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    _heads_fit(rows, n_head)
    return (
        rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:])
        .swapaxes(1, 2)
        .reshape(rows.shape)
    )


def unpermute(rows, n_head, n_head_kv=None):
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    _heads_fit(rows, n_head)
    return (
        rows.reshape(n_head, rows.shape[0] // n_head // 2, 2, *rows.shape[1:])
        .swapaxes(1, 2)
        .reshape(rows.shape)
    )
