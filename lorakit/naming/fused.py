"""Slices of fused tensors: other tools' names for the rows of an original single file's fused tensors (OpenCLIP
in_proj, DiT qkv / linear1), and the other way round for a base in diffusers' layout."""

import re

from .dit import DIT_TABLE, dit_diffusers, dit_key, halves_swapped
from .kohya import mangle

# HF CLIP layer -> (OpenCLIP tensor, which third of in_proj or None)
OPENCLIP = {
    "self_attn.q_proj": ("attn.in_proj_weight", 0),
    "self_attn.k_proj": ("attn.in_proj_weight", 1),
    "self_attn.v_proj": ("attn.in_proj_weight", 2),
    "self_attn.out_proj": ("attn.out_proj.weight", None),
    "mlp.fc1": ("mlp.c_fc.weight", None),
    "mlp.fc2": ("mlp.c_proj.weight", None),
}
# (OpenCLIP text encoder in a single file, its kohya prefix, its diffusers component)
OPENCLIP_ENCODERS = (
    ("conditioner.embedders.1.model.transformer.resblocks.", "lora_te2", "text_encoder_2"),
    ("cond_stage_model.model.transformer.resblocks.", "lora_te", "text_encoder"),
)


def fused_aliases(shapes):
    """Other tools' module names for the tensors of an original single-file checkpoint, including slices of fused
    tensors: {alias: (base tensor, row start, row stop, halves swapped)}. Aliases are the diffusers names (dotted,
    under their component) and their kohya manglings; a LoRA on `to_q` of a model whose file stores a fused qkv lands
    on its rows. Covers the OpenCLIP text encoders (SDXL's second, SD2's) and the DiT families of DIT (Flux,
    HunyuanVideo, SD3, Wan; any model prefix)."""
    out = {}

    def add(path, prefixes, tensor, start, stop, swap=False):
        for kohya, component in prefixes:
            out[f"{component}.{path}"] = out[mangle(kohya, path)] = (tensor, start, stop, swap)

    for name, shape in shapes.items():
        for base_prefix, kohya, component in OPENCLIP_ENCODERS:
            m = re.fullmatch(re.escape(base_prefix) + r"(\d+)\.attn\.in_proj_weight", name)
            if m:
                for layer, (tensor, part) in OPENCLIP.items():
                    full = f"{base_prefix}{m[1]}.{tensor}"
                    if full in shapes:
                        rows = shapes[full][0]
                        start, stop = (
                            (0, rows) if part is None else (part * rows // 3, (part + 1) * rows // 3)
                        )
                        add(
                            f"text_model.encoder.layers.{m[1]}.{layer}",
                            [(kohya, component)],
                            full,
                            start,
                            stop,
                        )
        if name.endswith(".weight") and len(shape) >= 2:
            for path, start, stop, swap in dit_diffusers(name[: -len(".weight")], shape[0], shape[1]) or []:
                add(path, [("lora_transformer", "transformer")], name, start, stop, swap)
    return out


def split_aliases(shapes):
    """The other way round from fused_aliases: for a base in diffusers' layout (a transformer folder, or a pipeline
    component with `transformer.` in front), the original DiT names of its tensors, a fused one as the diffusers
    tensors it is cut into: {original name, or its kohya / ComfyUI spelling: [(base tensor, row start, row stop,
    halves swapped)]}, each slice's rows given by its tensor."""
    inverse = {}  # diffusers path pattern -> [(original path pattern, part)]: proj_out is head.head in Wan
    for original, targets in DIT_TABLE.items():
        for target, part in targets:
            inverse.setdefault(target, []).append((original, part))
    parts = {}  # original module -> {part: (tensor, rows, swap)}
    for name, shape in shapes.items():
        if not name.endswith(".weight") or len(shape) < 2:
            continue
        stem = name[: -len(".weight")]
        path = stem[len("transformer.") :] if stem.startswith("transformer.") else stem
        key, n = dit_key(path)
        for original, part in inverse.get(key, ()):
            swap = halves_swapped(original, shape[0], shape[1])
            parts.setdefault(original.format(n=n), {})[part or 0] = (name, shape[0], swap)
    out = {}
    for original, pieces in parts.items():
        slices, start = [], 0
        for part in sorted(pieces):
            tensor, rows, swap = pieces[part]
            slices.append((tensor, start, start + rows, swap))
            start += rows
        for spelling in (
            original,
            f"diffusion_model.{original}",
            mangle("lora_unet", original),
            mangle("lora_transformer", original),
        ):
            out[spelling] = slices
    return out
