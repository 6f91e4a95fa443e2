"""SD1/SD2 and SDXL original (LDM) UNet paths <-> diffusers UNet paths, and which family a set of LDM names is."""

import re


def ldm_unet_to_diffusers(path):
    """Original (LDM) UNet module path (input_blocks...) -> diffusers path (down_blocks...), or None. SD1/SD2 and
    SDXL share the arithmetic (three blocks per level, the upsampler last in a level); SDXL adds label_emb."""
    resnet = {
        "in_layers.0": "norm1",
        "in_layers.2": "conv1",
        "emb_layers.1": "time_emb_proj",
        "out_layers.0": "norm2",
        "out_layers.3": "conv2",
        "skip_connection": "conv_shortcut",
    }
    fixed = {
        "input_blocks.0.0": "conv_in",
        "out.0": "conv_norm_out",
        "out.2": "conv_out",
        "time_embed.0": "time_embedding.linear_1",
        "time_embed.2": "time_embedding.linear_2",
        "label_emb.0.0": "add_embedding.linear_1",
        "label_emb.0.2": "add_embedding.linear_2",
    }
    if path in fixed:
        return fixed[path]
    m = re.fullmatch(r"(input_blocks|output_blocks)\.(\d+)\.(\d)\.(.+)", path) or re.fullmatch(
        r"(middle_block)\.(\d)\.(.+)", path
    )
    if not m:
        return None
    if m[1] == "middle_block":
        block = {"0": "mid_block.resnets.0", "1": "mid_block.attentions.0", "2": "mid_block.resnets.1"}[m[2]]
        rest = m[3]
        return f"{block}.{resnet.get(rest, rest)}" if m[2] != "1" else f"{block}.{rest}"
    n, j, rest = int(m[2]), m[3], m[4]
    if m[1] == "input_blocks":
        if n in (3, 6, 9) and rest == "op":
            return f"down_blocks.{n // 3 - 1}.downsamplers.0.conv"
        i, k = (n - 1) // 3, (n - 1) % 3
        return (
            f"down_blocks.{i}.resnets.{k}.{resnet.get(rest, rest)}"
            if j == "0"
            else f"down_blocks.{i}.attentions.{k}.{rest}"
        )
    i, k = n // 3, n % 3
    if rest == "conv" and k == 2:
        return f"up_blocks.{i}.upsamplers.0.conv"
    return (
        f"up_blocks.{i}.resnets.{k}.{resnet.get(rest, rest)}"
        if j == "0"
        else f"up_blocks.{i}.attentions.{k}.{rest}"
    )


def diffusers_to_ldm_unet(path):
    """The inverse of ldm_unet_to_diffusers: the original (LDM) paths a diffusers UNet path can be (an up level's
    upsampler sits at index 1 or 2 of its last block, by whether the level has attention: both are given)."""
    resnet = {
        "norm1": "in_layers.0",
        "conv1": "in_layers.2",
        "time_emb_proj": "emb_layers.1",
        "norm2": "out_layers.0",
        "conv2": "out_layers.3",
        "conv_shortcut": "skip_connection",
    }
    fixed = {
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
    }
    if path in fixed:
        return [fixed[path]]
    m = re.fullmatch(
        r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", path
    )
    if m:
        side, i, part, k, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        if part == "downsamplers":
            return [f"input_blocks.{3 * (i + 1)}.0.op"] if rest == "conv" else []
        if part == "upsamplers":
            return [f"output_blocks.{3 * i + 2}.{j}.conv" for j in (1, 2)] if rest == "conv" else []
        n = 3 * i + k + 1 if side == "down" else 3 * i + k
        block = "input_blocks" if side == "down" else "output_blocks"
        return [f"{block}.{n}.0.{resnet.get(rest, rest)}" if part == "resnets" else f"{block}.{n}.1.{rest}"]
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d)\.(.+)", path)
    if m:
        if m[1] == "attentions":
            return [f"middle_block.1.{m[3]}"]
        return [f"middle_block.{2 * int(m[2])}.{resnet.get(m[3], m[3])}"]
    return []


def ldm_unet_family(modules, meta=None):
    """'sd1' or 'sdxl' for modules under the original (LDM) UNet names, from what only one family has: SD1/SD2 put
    attention in input_blocks 1-2 and output_blocks 6-11 and have 12 input blocks; SDXL has deeper transformers
    (transformer_blocks.1+), attention in output_blocks 0-2, and label_emb. The sd-scripts metadata decides first."""
    version = str((meta or {}).get("ss_base_model_version", ""))
    if version.startswith("sdxl"):
        return "sdxl"
    if version.startswith(("sd_v1", "sd_v2")):
        return "sd1"
    text = " ".join(modules)
    if re.search(r"conditioner\.|label_emb|transformer_blocks\.[1-9]|output_blocks\.[0-2]\.1\.", text):
        return "sdxl"
    if re.search(
        r"input_blocks\.[12]\.1\.|(input|output)_blocks\.(9|10|11)\.|output_blocks\.[6-8]\.1\.|"
        r"cond_stage_model\.",
        text,
    ):
        return "sd1"
    return None
