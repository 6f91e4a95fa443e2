"""kohya names resolved without a base: the dots sd-scripts / musubi-tuner turned into underscores put back from the
model families' own name tables (Flux, HunyuanVideo, SD3, Wan, Qwen-Image; CLIP and T5 text encoders), as
diffusers' converters do. A name two families spell alike but map differently is decided by the other names of the
file; a file that still fits more than one family, or a name no table has, is the caller's to refuse."""

import functools
import re
from dataclasses import dataclass

from .dit import DIT_TABLE, dit_key, family_layers
from .dit_tables import DIT, QWEN_IMAGE_BLOCK, QWEN_IMAGE_GLOBAL
from .kohya import mangle

CLIP_LAYERS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "mlp.fc1",
    "mlp.fc2",
)
T5_LAYERS = (
    *(f"layer.0.SelfAttention.{p}" for p in "qkvo"),
    "layer.1.DenseReluDense.wi",
    "layer.1.DenseReluDense.wi_0",
    "layer.1.DenseReluDense.wi_1",
    "layer.1.DenseReluDense.wo",
)
# which diffusers component a kohya text encoder prefix is, by family (sd-scripts: Flux te1 CLIP-L, te3 T5)
TEXT_ENCODERS = {
    "flux": {"lora_te1": "text_encoder", "lora_te3": "text_encoder_2"},
    "sd3": {"lora_te1": "text_encoder", "lora_te2": "text_encoder_2", "lora_te3": "text_encoder_3"},
    None: {"lora_te": "text_encoder", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2"},
}


@dataclass(frozen=True)
class Resolved:
    """What unmangle made of a file's kohya names."""

    names: (
        dict  # kohya lora_name -> dotted module name (a DiT's original path; text encoders under a component)
    )
    family: str  # the DiT family the transformer names fit, or None
    unknown: list  # lora_names no table has
    ambiguous: tuple  # (the families the names fit equally, e.g. ("flux", "hunyuan_video")) or ()


@functools.cache
def family_patterns():
    """family -> [(compiled regex of the mangled name, dotted pattern with {n})]; built on first use, not at import
    (every command imports the format readers, few resolve kohya names without a base)."""
    out = {family: {original for original, _, _ in family_layers(family)} for family in DIT}
    out["qwen_image"] = {f"transformer_blocks.{{n}}.{p}" for p in QWEN_IMAGE_BLOCK} | set(QWEN_IMAGE_GLOBAL)
    return {
        family: [
            (re.compile(re.escape(mangle("lora_unet", p)).replace(r"\{n\}", r"(\d+)")), p) for p in paths
        ]
        for family, paths in out.items()
    }


def _text_encoder(lora_name):
    """(kohya prefix, dotted path under the component) of a CLIP / T5 text encoder name, or None."""
    m = re.fullmatch(r"(lora_te\d?)_text_model_encoder_layers_(\d+)_(.+)", lora_name)
    if m:
        layer = next((l for l in CLIP_LAYERS if l.replace(".", "_") == m[3]), None)
        return (m[1], f"text_model.encoder.layers.{m[2]}.{layer}") if layer else None
    m = re.fullmatch(r"(lora_te\d?)_encoder_block_(\d+)_(.+)", lora_name)
    if m:
        layer = next((l for l in T5_LAYERS if l.replace(".", "_") == m[3]), None)
        return (m[1], f"encoder.block.{m[2]}.{layer}") if layer else None
    return None


def _targets(family, path):
    """The diffusers layers a family's original path becomes (Qwen-Image's names are diffusers')."""
    if family == "qwen_image":
        return path
    key, n = dit_key(path)
    return tuple(target.format(n=n) for target, _ in DIT_TABLE.get(key, ()))


def _dit_candidates(lora_name):
    """{family: dotted path} of the DiT families whose tables spell this kohya name."""
    out = {}
    for family, patterns in family_patterns().items():
        for regex, pattern in patterns:
            m = regex.fullmatch(lora_name)
            if m:
                out[family] = pattern.format(n=m[1]) if m.groups() else pattern
                break
    return out


def unmangle(lora_names):
    """Resolve kohya lora_names (lora_unet_*, lora_te*_*) with no base; see the module docstring."""
    candidates = {n: _dit_candidates(n) for n in lora_names if n.startswith("lora_unet_")}
    votes = {}
    for found in candidates.values():
        for family in found:
            votes[family] = votes.get(family, 0) + 1
    best = max(votes.values(), default=0)
    leaders = tuple(sorted(f for f, v in votes.items() if v == best))
    family = leaders[0] if len(leaders) == 1 else None
    names, unknown, conflicts = {}, [], []
    for name, found in candidates.items():
        if family in found:
            names[name] = found[family]
        elif family is None and found and len({_targets(f, p) for f, p in found.items()}) == 1:
            names[name] = next(iter(found.values()))  # spelled apart, the same diffusers layers
        else:
            (conflicts if family is None and found else unknown).append(name)
    components = TEXT_ENCODERS.get(family, TEXT_ENCODERS[None])
    for name in lora_names:
        if name.startswith("lora_unet_"):
            continue
        te = _text_encoder(name)
        component = components.get(te[0]) if te else None
        if component:
            names[name] = f"{component}.{te[1]}"
        else:
            unknown.append(name)
    return Resolved(names, family, sorted(unknown + conflicts), leaders if conflicts else ())
