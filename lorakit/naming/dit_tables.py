"""The DiT families' tables (data): diffusers layer -> (original layer, slice of its fused rows or None), per block
kind, and the global layers. Facts: diffusers' convert_*_to_diffusers.py scripts and lora_conversion_utils.py."""

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
# Qwen-Image was released in diffusers' layout: its original names are diffusers' (under `transformer.`), and
# ComfyUI / lightx2v / musubi files spell them bare, under `diffusion_model.` or mangled
QWEN_IMAGE_BLOCK = (
    *(f"attn.{p}" for p in QKV + ADD_QKV),
    "attn.to_out.0",
    "attn.to_add_out",
    "img_mlp.net.0.proj",
    "img_mlp.net.2",
    "txt_mlp.net.0.proj",
    "txt_mlp.net.2",
    "img_mod.1",
    "txt_mod.1",
)
QWEN_IMAGE_GLOBAL = (
    "img_in",
    "txt_in",
    "proj_out",
    "norm_out.linear",
    "time_text_embed.timestep_embedder.linear_1",
    "time_text_embed.timestep_embedder.linear_2",
)
# Flux's RMSNorm scales (BFL control LoRAs replace them): original -> diffusers tensor
FLUX_NORMS = {
    "double_blocks.{n}.img_attn.norm.query_norm.scale": "transformer_blocks.{n}.attn.norm_q.weight",
    "double_blocks.{n}.img_attn.norm.key_norm.scale": "transformer_blocks.{n}.attn.norm_k.weight",
    "double_blocks.{n}.txt_attn.norm.query_norm.scale": "transformer_blocks.{n}.attn.norm_added_q.weight",
    "double_blocks.{n}.txt_attn.norm.key_norm.scale": "transformer_blocks.{n}.attn.norm_added_k.weight",
    "single_blocks.{n}.norm.query_norm.scale": "single_transformer_blocks.{n}.attn.norm_q.weight",
    "single_blocks.{n}.norm.key_norm.scale": "single_transformer_blocks.{n}.attn.norm_k.weight",
}
