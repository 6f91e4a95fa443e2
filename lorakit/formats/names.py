"""The name maps shared by the formats, the merge engine and the commands, in one place: diffusers pipeline
components, kohya prefixes and the SD1 original <-> diffusers UNet map, Hugging Face <-> llama.cpp tensor names (with
llama.cpp's Q/K row permutation), and embedding weights."""

import re

from ..errors import LorakitError

# ---------------------------------------------------------------- diffusers pipelines
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


# ---------------------------------------------------------------- embeddings
EMBEDDING_NAMES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")
HEAD = "lm_head.weight"


def is_embedding(weight_name):
    """Whether a base tensor name is a token embedding (the one rule: merge's tied embeddings, extract's kinds)."""
    return weight_name.endswith(EMBEDDING_NAMES)


# ---------------------------------------------------------------- kohya
PREFIXES = (
    "lora_unet",
    "lora_te1",
    "lora_te2",
    "lora_te3",
    "lora_te",
    "lycoris",
)  # lycoris_: LyCORIS on DiTs
# where each kohya prefix lives in a base: (kohya prefix, base name prefix). Diffusers folders are read with their
# component as prefix (unet., text_encoder., ...); original single-file SD/SDXL/Flux checkpoints use the others.
BASE_PREFIXES = (
    ("lora_unet", "unet."),
    ("lora_unet", "transformer."),
    ("lora_te", "text_encoder."),
    ("lora_te1", "text_encoder."),
    ("lora_te2", "text_encoder_2."),
    ("lora_te3", "text_encoder_3."),
    ("lora_unet", "model.diffusion_model."),
    ("lora_te", "cond_stage_model.transformer."),
    ("lora_te1", "conditioner.embedders.0.transformer."),
    ("lora_unet", ""),
    ("lycoris", "transformer."),
    ("lycoris", "model.diffusion_model."),
    ("lycoris", "unet."),
    ("lycoris", ""),
)


def mangle(prefix, path):
    return (prefix + "." + path).replace(".", "_")


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


def resolution_table(shapes):
    """kohya lora_name -> spec module name, for every weight of the base."""
    table = {}
    for name in shapes:
        if not name.endswith(".weight"):
            continue
        module = name[: -len(".weight")]
        for kohya_prefix, base_prefix in BASE_PREFIXES:
            if module.startswith(base_prefix):
                path = module[len(base_prefix) :]
                table.setdefault(mangle(kohya_prefix, path), module)
                if (
                    base_prefix == "model.diffusion_model."
                ):  # a single file: kohya's SD1 names are diffusers paths
                    sd1 = ldm_unet_to_diffusers(path)
                    if sd1:
                        table.setdefault(mangle(kohya_prefix, sd1), module)
                if base_prefix == "unet.":  # a diffusers UNet: kohya's SDXL names are the original paths
                    for ldm in diffusers_to_ldm_unet(path):
                        table.setdefault(mangle(kohya_prefix, ldm), module)
    return table


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


def kohya_names(modules, meta=None):
    """spec module names -> the kohya lora_names sd-scripts' own trainer uses for that model family: SD1/SD2 UNets
    by their diffusers paths (sd-scripts' original_unet mirrors them) even when the module names are the single
    file's (model.diffusion_model.input_blocks...), SDXL and Flux by their original paths."""
    components = {m.split(".", 1)[0] for m in modules}
    sd1 = ldm_unet_family(modules, meta) == "sd1"
    out = {}
    for module in modules:
        if module.startswith("model.diffusion_model.") and sd1:
            path = module[len("model.diffusion_model.") :]
            out[module] = mangle("lora_unet", ldm_unet_to_diffusers(path) or path)
        else:
            out[module] = kohya_name(module, components)
    return out


def kohya_name(module, components):
    """spec module name -> kohya lora_name (by prefix only; kohya_names knows the model families)."""
    if module.startswith(PREFIXES) and "." not in module:
        return module
    two_text_encoders = "text_encoder_2" in components
    for kohya_prefix, base_prefix in BASE_PREFIXES:
        if base_prefix and module.startswith(base_prefix):
            if base_prefix == "text_encoder." and kohya_prefix != (
                "lora_te1" if two_text_encoders else "lora_te"
            ):
                continue
            return mangle(kohya_prefix, module[len(base_prefix) :])
    return mangle("lora_unet", module)


# ---------------------------------------------------------------- fused tensors of original single files
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
# DiT families: diffusers layer -> (original layer, slice of its fused rows or None), per block kind, and the global
# layers (facts: diffusers' convert_*_to_diffusers.py scripts and lora_conversion_utils.py). A fused q/k/v is cut in
# thirds; a fused q/k/v/mlp (Flux and HunyuanVideo single blocks) in three of the input width and the rest.
QKV = ("to_q", "to_k", "to_v")
ADD_QKV = ("add_q_proj", "add_k_proj", "add_v_proj")


def fused(attn, projections, target):
    """The diffusers projections `attn.<q/k/v>` as slices 0, 1, 2 of the original fused layer `target`."""
    return {f"{attn}.{q}": (target, i) for i, q in enumerate(projections)}


FLUX_DOUBLE = {
    **fused("attn", QKV, "img_attn.qkv"),
    **fused("attn", ADD_QKV, "txt_attn.qkv"),
    "attn.to_out.0": ("img_attn.proj", None),
    "attn.to_add_out": ("txt_attn.proj", None),
    "ff.net.0.proj": ("img_mlp.0", None),
    "ff.net.2": ("img_mlp.2", None),
    "ff_context.net.0.proj": ("txt_mlp.0", None),
    "ff_context.net.2": ("txt_mlp.2", None),
    "norm1.linear": ("img_mod.lin", None),
    "norm1_context.linear": ("txt_mod.lin", None),
}
FLUX_SINGLE = {
    **fused("attn", QKV, "linear1"),
    "proj_mlp": ("linear1", 3),
    "proj_out": ("linear2", None),
    "norm.linear": ("modulation.lin", None),
}
FLUX_GLOBAL = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "proj_out": "final_layer.linear",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
}
HUNYUAN_DOUBLE = {
    **fused("attn", QKV, "img_attn_qkv"),
    **fused("attn", ADD_QKV, "txt_attn_qkv"),
    "attn.to_out.0": ("img_attn_proj", None),
    "attn.to_add_out": ("txt_attn_proj", None),
    "ff.net.0.proj": ("img_mlp.fc1", None),
    "ff.net.2": ("img_mlp.fc2", None),
    "ff_context.net.0.proj": ("txt_mlp.fc1", None),
    "ff_context.net.2": ("txt_mlp.fc2", None),
    "norm1.linear": ("img_mod.linear", None),
    "norm1_context.linear": ("txt_mod.linear", None),
}
HUNYUAN_SINGLE = {
    **fused("attn", QKV, "linear1"),
    "proj_mlp": ("linear1", 3),
    "proj_out": ("linear2", None),
    "norm.linear": ("modulation.linear", None),
}
HUNYUAN_GLOBAL = {
    "x_embedder.proj": "img_in.proj",
    "proj_out": "final_layer.linear",
    "time_text_embed.timestep_embedder.linear_1": "time_in.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "time_in.mlp.2",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.mlp.0",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.mlp.2",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
}
SD3_JOINT = {
    **fused("attn", QKV, "x_block.attn.qkv"),
    **fused("attn2", QKV, "x_block.attn2.qkv"),
    **fused("attn", ADD_QKV, "context_block.attn.qkv"),
    "attn.to_out.0": ("x_block.attn.proj", None),
    "attn2.to_out.0": ("x_block.attn2.proj", None),
    "attn.to_add_out": ("context_block.attn.proj", None),
    "ff.net.0.proj": ("x_block.mlp.fc1", None),
    "ff.net.2": ("x_block.mlp.fc2", None),
    "ff_context.net.0.proj": ("context_block.mlp.fc1", None),
    "ff_context.net.2": ("context_block.mlp.fc2", None),
    "norm1.linear": ("x_block.adaLN_modulation.1", None),
    "norm1_context.linear": ("context_block.adaLN_modulation.1", None),
}
SD3_GLOBAL = {
    "pos_embed.proj": "x_embedder.proj",
    "context_embedder": "context_embedder",
    "proj_out": "final_layer.linear",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
}
WAN_BLOCK = {
    **{f"attn1.{q}": (f"self_attn.{q[-1]}", None) for q in QKV},
    **{f"attn2.{q}": (f"cross_attn.{q[-1]}", None) for q in QKV},
    "attn1.to_out.0": ("self_attn.o", None),
    "attn2.to_out.0": ("cross_attn.o", None),
    "attn2.add_k_proj": ("cross_attn.k_img", None),
    "attn2.add_v_proj": ("cross_attn.v_img", None),
    "ffn.net.0.proj": ("ffn.0", None),
    "ffn.net.2": ("ffn.2", None),
}
WAN_GLOBAL = {
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "proj_out": "head.head",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
    "patch_embedding": "patch_embedding",
}
# family -> ([(original block, diffusers block, layers)], global layers); AdaLayerNormContinuous (diffusers
# [scale, shift], original [shift, scale]): the final layer's modulation, and SD3's last context block (2 chunks)
DIT = {
    "flux": (
        [
            ("double_blocks", "transformer_blocks", FLUX_DOUBLE),
            ("single_blocks", "single_transformer_blocks", FLUX_SINGLE),
        ],
        FLUX_GLOBAL,
    ),
    "hunyuan_video": (
        [
            ("double_blocks", "transformer_blocks", HUNYUAN_DOUBLE),
            ("single_blocks", "single_transformer_blocks", HUNYUAN_SINGLE),
        ],
        HUNYUAN_GLOBAL,
    ),
    "sd3": ([("joint_blocks", "transformer_blocks", SD3_JOINT)], SD3_GLOBAL),
    "wan": ([("blocks", "blocks", WAN_BLOCK)], WAN_GLOBAL),
}
FINAL_NORM = "final_layer.adaLN_modulation.1"
DIT_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")


def _dit_table():
    """original path pattern -> [(diffusers path pattern, part)]: block paths with {n} for the block number."""
    table = {}
    for blocks, globals_ in DIT.values():
        for original, diffusers, layers in blocks:
            for layer, (source, part) in layers.items():
                entry = table.setdefault(f"{original}.{{n}}.{source}", [])
                if (f"{diffusers}.{{n}}.{layer}", part) not in entry:
                    entry.append((f"{diffusers}.{{n}}.{layer}", part))
        for layer, source in globals_.items():
            entry = table.setdefault(source, [])
            if (layer, None) not in entry:
                entry.append((layer, None))
    table.setdefault(FINAL_NORM, []).append(("norm_out.linear", None))
    return {k: sorted(v, key=lambda e: e[1] or 0) for k, v in table.items()}


DIT_TABLE = _dit_table()


def _dit_key(path):
    """(the table's pattern for a DiT path, its block number or None): blocks.3.attn1.to_q -> blocks.{n}.attn1.to_q."""
    m = re.fullmatch(r"([a-z_]*blocks)\.(\d+)\.(.+)", path)
    return (f"{m[1]}.{{n}}.{m[3]}", m[2]) if m else (path, None)


def _halves_swapped(original, rows, cols):
    """AdaLayerNormContinuous (diffusers [scale, shift], original [shift, scale]): the final norm, and SD3's last
    context block, the one of 2 chunks (shift and scale only)."""
    return original == FINAL_NORM or (
        original.endswith("context_block.adaLN_modulation.1") and rows == 2 * cols
    )


def dit_diffusers(module, rows, cols):
    """A DiT module under its original name (any of DIT_PREFIXES) -> [(diffusers path under `transformer.`, row start,
    row stop, halves swapped)], one per slice of a fused tensor; None when it has no diffusers name."""
    for prefix in DIT_PREFIXES:
        if not module.startswith(prefix):
            continue
        path = module[len(prefix) :]
        key, n = _dit_key(path)
        targets = DIT_TABLE.get(key)
        if not targets:
            continue
        if len(targets) == 1:
            sizes = [rows]
        else:
            sizes = [rows // 3] * 3 if len(targets) == 3 else [cols] * 3 + [rows - 3 * cols]
        swap = _halves_swapped(path, rows, cols)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        return [
            (target.format(n=n), starts[i], starts[i] + sizes[i], swap)
            for i, (target, _) in enumerate(targets)
        ]
    return None


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
        key, n = _dit_key(path)
        for original, part in inverse.get(key, ()):
            swap = _halves_swapped(original, shape[0], shape[1])
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


def diffusers_names(shapes, family=None):
    """Original single-file module names -> their diffusers names, one per slice of a fused tensor:
    {module: [(diffusers name, row start, row stop, halves swapped)]} for the modules of `shapes` ({module: (out,
    in)}) that have one: the DiT families (Flux, HunyuanVideo, SD3, Wan: the inverse of fused_aliases), SD1/SD2
    UNets and SDXL's (LDM names; `family` from ldm_unet_family) and the CLIP text encoders of SD1 and SDXL."""
    out = {}
    for module, (rows, cols) in shapes.items():
        layer = (
            module[len("model.diffusion_model.") :] if module.startswith("model.diffusion_model.") else None
        )
        if layer is not None and family in ("sd1", "sdxl") and ldm_unet_to_diffusers(layer):
            out[module] = [(f"unet.{ldm_unet_to_diffusers(layer)}", 0, rows, False)]
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


# ---------------------------------------------------------------- llama.cpp
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
