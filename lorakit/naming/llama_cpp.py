"""Hugging Face <-> llama.cpp tensor names, and llama.cpp's Q/K row permutation."""

import re
from dataclasses import replace

from ..errors import LorakitError

HEADS_KEY, KV_HEADS_KEY = "{arch}.attention.head_count", "{arch}.attention.head_count_kv"

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
NORM_MAP = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "model.norm": "output_norm",
}
# a model's config.json fields from a GGUF's KVs ({arch} filled in), for the architectures lorakit's model runs
CONFIG_KEYS = {
    "hidden_size": "{arch}.embedding_length",
    "intermediate_size": "{arch}.feed_forward_length",
    "num_hidden_layers": "{arch}.block_count",
    "num_attention_heads": HEADS_KEY,
    "num_key_value_heads": KV_HEADS_KEY,
    "rms_norm_eps": "{arch}.attention.layer_norm_rms_epsilon",
    "rope_theta": "{arch}.rope.freq_base",
}


# per-expert Hugging Face modules (Qwen-MoE / DeepSeek / OLMoE style, Mixtral's) and llama.cpp's 3-D expert tensors
EXPERT_MODULE = re.compile(
    r"model\.layers\.(\d+)\.(mlp|block_sparse_moe)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)"
)
EXPERT_PROJ = {
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",
    "w1": "gate",
    "w3": "up",
    "w2": "down",
}
MIXTRAL_PROJ = {"gate": "w1", "up": "w3", "down": "w2"}


def expert_of(module):
    """(llama.cpp's 3-D tensor stem 'blk.N.ffn_gate_exps', the expert's index) of a per-expert module, else None."""
    m = EXPERT_MODULE.fullmatch(module)
    return (f"blk.{m[1]}.ffn_{EXPERT_PROJ[m[4]]}_exps", int(m[3])) if m else None


def expert_module(stem, e, mixtral=False):
    """Expert e of a 3-D tensor 'blk.N.ffn_gate_exps' as a Hugging Face per-expert module (Mixtral's w1/w3/w2 names
    when `mixtral`), else None for another name."""
    m = re.fullmatch(r"blk\.(\d+)\.ffn_(gate|up|down)_exps", stem)
    if m is None:
        return None
    if mixtral:
        return f"model.layers.{m[1]}.block_sparse_moe.experts.{e}.{MIXTRAL_PROJ[m[2]]}"
    return f"model.layers.{m[1]}.mlp.experts.{e}.{m[2]}_proj"


def to_gguf_name(module):
    if module in GLOBAL_MAP:
        return GLOBAL_MAP[module]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", module)
    if m and m[2] in LAYER_MAP:
        return f"blk.{m[1]}.{LAYER_MAP[m[2]]}"
    raise LorakitError(
        "no llama.cpp tensor name for this module (Llama family: attention, MLP, embeddings, lm_head)",
        tensor=module,
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


def tensor_name(weight):
    """The GGUF tensor of a Hugging Face Llama-family weight name (model.layers.0.input_layernorm.weight ->
    blk.0.attn_norm.weight), None for one llama.cpp does not name."""
    stem, _, suffix = weight.rpartition(".")
    if stem in NORM_MAP:
        return f"{NORM_MAP[stem]}.{suffix}"
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", stem)
    if m and m[2] in NORM_MAP:
        return f"blk.{m[1]}.{NORM_MAP[m[2]]}.{suffix}"
    try:
        return f"{to_gguf_name(stem)}.{suffix}"
    except LorakitError:
        return None


def hf_config(kv, vocab_size, tied):
    """A config.json for a GGUF model (llama and qwen2 architectures: what lorakit's model runs), from its KVs."""
    arch = kv.get("general.architecture")
    if arch not in ("llama", "qwen2"):
        raise LorakitError(f"GGUF architecture '{arch}' is not one lorakit's model implements (llama, qwen2)")
    config = {"model_type": arch, "vocab_size": vocab_size, "tie_word_embeddings": tied}
    for field, key in CONFIG_KEYS.items():
        if key.format(arch=arch) in kv:
            config[field] = kv[key.format(arch=arch)]
    return config


def row_order(weight, kv, rows):
    """The Hugging Face order of a GGUF tensor's `rows` rows as indices into the stored ones (llama.cpp permutes
    llama's Q/K rows), or None where they are the same."""
    import torch

    arch, n_head, n_kv = gguf_base_fields(kv)
    if arch != "llama" or not weight.endswith(
        ("attn_q.weight", "attn_k.weight", "attn_q.bias", "attn_k.bias")
    ):
        return None
    if n_head is None:
        raise LorakitError(f"llama.cpp permutes Q/K rows and the GGUF has no {HEADS_KEY.format(arch=arch)}")
    return unpermute(torch.arange(rows), n_head, n_kv if ".attn_k." in weight else None)


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


def gguf_base_fields(kv):
    """(architecture, n_head, n_head_kv) from a GGUF model's KVs; None for None. Head counts stored per layer (arrays)
    count as unknown."""
    if kv is None:
        return None
    arch = kv.get("general.architecture")

    def count(key):
        v = kv.get(key.format(arch=arch))
        return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None

    n_head = count(HEADS_KEY)
    return arch, n_head, count(KV_HEADS_KEY) or n_head


def gguf_modules(adapter, kv, base, to_gguf=True):
    """The adapter in the terms of a GGUF base (its KVs `kv`, its path `base`) when to_gguf, or back: llama.cpp's
    tensor names (blk.N.attn_q, token_embd, output) and, for the llama architecture, Q/K rows in llama.cpp's order
    (the factors' rows: exact). Names with no counterpart are kept (the merge plan reports them). The fingerprint and
    identity describe another container's names: dropped."""
    arch, n_head, n_kv = gguf_base_fields(kv)
    out = replace(adapter, modules={}, replacements={}, deltas={}, base_fingerprint=None, base_identity=None)

    def renamed(name):
        """(the other side's name, or the name itself; row order function or None)."""
        if to_gguf:
            try:
                g = to_gguf_name(name)
            except LorakitError:
                return name, None
        else:
            g = name
            name = from_gguf_name(g)
            if name is None:
                return g, None
        if g.endswith(("attn_q", "attn_k")) and arch == "llama":
            if n_head is None:
                raise LorakitError(
                    "llama.cpp permutes Q/K rows and the GGUF base has no head count "
                    f"({HEADS_KEY.format(arch=arch)})",
                    path=base,
                    tensor=g,
                )
            kv, order = n_kv if g.endswith("attn_k") else None, permute if to_gguf else unpermute
            return (
                g if to_gguf else name
            ), lambda rows: None if rows is None else order(rows, n_head, kv).contiguous()
        return (g if to_gguf else name), None

    for m in adapter.modules.values():
        name, rows = renamed(m.name)
        if rows is not None:
            try:
                m = replace(
                    m,
                    B=rows(m.B),
                    bias=rows(m.bias),
                    magnitude=rows(m.magnitude) if m.dora_axis in (None, 0) else m.magnitude,
                )
            except LorakitError as e:  # before any shape check: say what it means
                raise LorakitError(
                    f"{e.message} of the adapter's B {list(m.B.shape)}: it does not fit this base's attention "
                    "heads (an adapter made for another model?)",
                    path=base,
                    tensor=m.name,
                ) from None
        out.add(replace(m, name=name))
    for table in ("replacements", "deltas"):
        for full, t in getattr(adapter, table).items():
            stem, _, suffix = full.rpartition(".")
            name, rows = renamed(stem)
            getattr(out, table)[f"{name}.{suffix}"] = rows(t) if rows is not None else t
    return out
