"""DiT original names (BFL Flux, HunyuanVideo, SD3, Wan) -> diffusers names, slices of fused tensors included."""

import re

from .dit_tables import DIT, DIT_PREFIXES, FINAL_NORM, FLUX_NORMS, QWEN_IMAGE_BLOCK, QWEN_IMAGE_GLOBAL


# diffusion-pipe keeps the original names under `transformer.` (HunyuanVideo, Qwen-Image)
WITH_DIFFUSION_PIPE = ("transformer.", *DIT_PREFIXES)


def family_layers(family):
    """(original path pattern, diffusers path pattern, part of a fused tensor or None) of one DiT family: block
    paths with {n} for the block number; the final norm where the family has a final layer."""
    blocks, globals_ = DIT[family]
    for original, diffusers, layers in blocks:
        for layer, (source, part) in layers.items():
            yield f"{original}.{{n}}.{source}", f"{diffusers}.{{n}}.{layer}", part
    for layer, source in globals_.items():
        yield source, layer, None
    if "final_layer.linear" in globals_.values():
        yield FINAL_NORM, "norm_out.linear", None


def _dit_table():
    """original path pattern -> [(diffusers path pattern, part)], over every family."""
    table = {}
    for family in DIT:
        for original, diffusers, part in family_layers(family):
            entry = table.setdefault(original, [])
            if (diffusers, part) not in entry:
                entry.append((diffusers, part))
    return {k: sorted(v, key=lambda e: e[1] or 0) for k, v in table.items()}


DIT_TABLE = _dit_table()


def dit_key(path):
    """(the table's pattern for a DiT path, its block number or None): blocks.3.attn1.to_q -> blocks.{n}.attn1.to_q."""
    m = re.fullmatch(r"([a-z_]*blocks)\.(\d+)\.(.+)", path)
    return (f"{m[1]}.{{n}}.{m[3]}", m[2]) if m else (path, None)


def halves_swapped(original, rows, cols):
    """AdaLayerNormContinuous (diffusers [scale, shift], original [shift, scale]): the final norm, and SD3's last
    context block, the one of 2 chunks (shift and scale only)."""
    return original == FINAL_NORM or (
        original.endswith("context_block.adaLN_modulation.1") and rows == 2 * cols
    )


def qwen_image_path(module):
    """A Qwen-Image module (any of DIT_PREFIXES, or diffusion-pipe's `transformer.`) -> its path under
    `transformer.`, or None: Qwen-Image's original names are diffusers'."""
    for prefix in WITH_DIFFUSION_PIPE:
        if module.startswith(prefix):
            path = module[len(prefix) :]
            m = re.fullmatch(r"transformer_blocks\.\d+\.(.+)", path)
            if (m and m[1] in QWEN_IMAGE_BLOCK) or path in QWEN_IMAGE_GLOBAL:
                return path
    return None


def dit_norm_diffusers(tensor):
    """A Flux RMSNorm scale under its original name (any of DIT_PREFIXES) -> its diffusers tensor under
    `transformer.`, or None."""
    for prefix in DIT_PREFIXES:
        if tensor.startswith(prefix):
            key, n = dit_key(tensor[len(prefix) :])
            if key in FLUX_NORMS:
                return "transformer." + FLUX_NORMS[key].format(n=n)
    return None


def dit_diffusers(module, rows, cols):
    """A DiT module under its original name (any of DIT_PREFIXES) -> [(diffusers path under `transformer.`, row start,
    row stop, halves swapped)], one per slice of a fused tensor; None when it has no diffusers name. diffusion-pipe's
    `transformer.` prefix in front of an original name is taken too (HunyuanVideo)."""
    for prefix in WITH_DIFFUSION_PIPE:
        if not module.startswith(prefix):
            continue
        path = module[len(prefix) :]
        key, n = dit_key(path)
        targets = DIT_TABLE.get(key)
        if not targets:
            continue
        if len(targets) == 1:
            sizes = [rows]
        else:
            sizes = [rows // 3] * 3 if len(targets) == 3 else [cols] * 3 + [rows - 3 * cols]
        swap = halves_swapped(path, rows, cols)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        return [
            (target.format(n=n), starts[i], starts[i] + sizes[i], swap)
            for i, (target, _) in enumerate(targets)
        ]
    return None
