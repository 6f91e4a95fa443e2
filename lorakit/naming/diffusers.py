"""diffusers pipelines: the components whose LoRA keys carry them as prefix, the names only original DiT
layouts have, and original single-file names -> diffusers names."""

import re

from .dit import dit_diffusers, qwen_image_path
from .ldm import ldm_unet_to_diffusers

# the components of a diffusers pipeline whose LoRA keys carry them as prefix
COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "prior", "decoder")


# names only the original (non-diffusers) layouts of DiT models have (BFL Flux / HunyuanVideo blocks, Wan's attention
# and FFN): a `transformer.` prefix in front of these is diffusion-pipe's, not a diffusers component
ORIGINAL = re.compile(
    r"(^|\.)(double_blocks|single_blocks|joint_blocks|final_layer|img_in|txt_in|vector_in|time_in|"
    r"guidance_in)\.|"
    r"\.(self_attn|cross_attn)\.[qkvo]\.|_attn_(qkv|proj)\.|\.ffn\.[02]\."
)


def component(key):
    """The diffusers component a key starts with (unet, text_encoder, ...), or None."""
    head = key.split(".", 1)[0]
    return head if head in COMPONENTS else None


def diffusers_names(shapes, family=None):
    """Original single-file module names -> their diffusers names, one per slice of a fused tensor:
    {module: [(diffusers name, row start, row stop, halves swapped)]} for the modules of `shapes` ({module: (out,
    in)}) that have one: the DiT families (Flux, HunyuanVideo, SD3, Wan: the inverse of fused_aliases), SD1/SD2
    UNets and SDXL's (LDM names; `family` from ldm_unet_family), Qwen-Image (diffusers' names, bare or under
    `diffusion_model.`) and the CLIP text encoders of SD1 and SDXL."""
    out = {}
    # Qwen-Image's names are diffusers' own; its img_in / txt_in would read as Flux's originals otherwise
    qwen = any("transformer_blocks." in m and qwen_image_path(m) for m in shapes)
    for module, (rows, cols) in shapes.items():
        layer = (
            module[len("model.diffusion_model.") :] if module.startswith("model.diffusion_model.") else None
        )
        if layer is not None and family in ("sd1", "sdxl") and ldm_unet_to_diffusers(layer):
            out[module] = [(f"unet.{ldm_unet_to_diffusers(layer)}", 0, rows, False)]
        elif family is None and qwen and (path := qwen_image_path(module)):
            if module != f"transformer.{path}":
                out[module] = [(f"transformer.{path}", 0, rows, False)]
        elif family is None and (dit := dit_diffusers(module, rows, cols)):
            out[module] = [(f"transformer.{path}", *rest) for path, *rest in dit]
        else:
            for original, component in (
                ("cond_stage_model.transformer.", "text_encoder."),
                ("conditioner.embedders.0.transformer.", "text_encoder."),
            ):
                if module.startswith(original + "text_model."):
                    out[module] = [(component + module[len(original) :], 0, rows, False)]
    return out
