"""diffusers LoRA files: PEFT keys under component prefixes with lora_adapter_metadata; older namings."""

import json

import torch

import lorakit
from lorakit.io import TensorFile, write_safetensors

from conftest import bits


def test_diffusers_round_trip_with_metadata(tmp_path):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    tensors = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": r(4, 32),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": r(32, 4),
        "unet.mid_block.attentions.0.proj_in.lora_A.weight": r(2, 32),
        "unet.mid_block.attentions.0.proj_in.lora_B.weight": r(32, 2),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": r(4, 16),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": r(16, 4),
    }
    meta = {
        "unet.r": 4,
        "unet.lora_alpha": 8,
        "unet.rank_pattern": {"proj_in": 2},
        "unet.alpha_pattern": {},
        "text_encoder.r": 4,
        "text_encoder.lora_alpha": 4,
    }
    write_safetensors(
        tmp_path / "d.safetensors", tensors, {"format": "pt", "lora_adapter_metadata": json.dumps(meta)}
    )
    lorakit.convert(tmp_path / "d.safetensors", tmp_path / "a.safetensors", to="lorakit")
    ad = lorakit.load(tmp_path / "a.safetensors")
    q = ad.modules["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert q.scale == 2.0 and ad.modules["unet.mid_block.attentions.0.proj_in"].scale == 4.0
    assert ad.modules["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"].scale == 1.0
    r = lorakit.convert(tmp_path / "a.safetensors", tmp_path / "d2.safetensors", to="diffusers")
    assert any("2 module scale(s) folded into lora_B" in n for n in r["notes"])
    back = lorakit.load(tmp_path / "d2.safetensors")
    d2 = TensorFile(tmp_path / "d2.safetensors")
    for name, m in ad.modules.items():
        # the scale lives in lora_B (scale 1): readers that ignore the metadata (ComfyUI: no .alpha -> 1) agree
        assert torch.equal(bits(back.modules[name].A), bits(m.A)) and back.modules[name].scale == 1.0
        assert torch.equal(
            back.modules[name].delta(torch.float64), m.delta(torch.float64)
        )  # scales 2, 4: exact
        up, down = factor_keys(name)
        raw = d2.get(up).double() @ d2.get(down).double()
        assert torch.equal(raw, m.delta(torch.float64))
    packed = json.loads(d2.header.metadata["lora_adapter_metadata"])
    assert (
        packed["unet.r"] == 4 and packed["unet.lora_alpha"] == 4 and packed["text_encoder.lora_alpha"] == 4.0
    )
    assert packed["text_encoder.target_modules"] == ["encoder.layers.0.self_attn.q_proj"]
    # the UNet in the older naming that ComfyUI maps (test_sd1_unet_names_both_diffusers_and_comfyui_read)
    assert set(d2.header.entries) == {k for n in ad.modules for k in factor_keys(n)}


def factor_keys(module):
    """(up, down) keys of a module in lorakit's diffusers output: a UNet's in the older diffusers naming."""
    if not module.startswith("unet."):
        return f"{module}.lora_B.weight", f"{module}.lora_A.weight"
    if ".attn" in module and module.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0"):
        stem = module[: -len(".0")] if module.endswith(".to_out.0") else module
        parent, proj = stem.rsplit(".", 1)
        return f"{parent}.processor.{proj}_lora.up.weight", f"{parent}.processor.{proj}_lora.down.weight"
    return f"{module}.lora.up.weight", f"{module}.lora.down.weight"


def tiny_sd_pipeline():
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=8,
        attention_head_dim=4,
    )
    vae = AutoencoderKL(
        block_out_channels=(8,),
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
    )
    te = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=1,
            vocab_size=100,
            projection_dim=32,
            bos_token_id=0,
            eos_token_id=1,
        )
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=te,
        tokenizer=None,
        unet=unet,
        scheduler=DDIMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def test_real_diffusers_loads_lorakit_output_at_the_right_strength(tmp_path):
    """diffusers' load_lora_weights + fuse_lora on lorakit's --to diffusers output: W + scale B A exactly as
    lorakit computes it, text encoder included (transformers 5's flattened CLIPTextModel)."""
    from lorakit.core import Adapter, Module

    pipe = tiny_sd_pipeline()
    g = torch.Generator().manual_seed(1)
    unet_q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    te_q = "text_model.encoder.layers.0.self_attn.q_proj"
    ad = Adapter()
    ad.add(
        Module(f"unet.{unet_q}", torch.randn(4, 32, generator=g), torch.randn(32, 4, generator=g), alpha=8.0)
    )
    ad.add(
        Module(
            f"text_encoder.{te_q}",
            torch.randn(2, 32, generator=g),
            torch.randn(32, 2, generator=g),
            alpha=1.0,
        )
    )
    ad.save(tmp_path / "a.safetensors")
    lorakit.convert(tmp_path / "a.safetensors", tmp_path / "d.safetensors", to="diffusers")
    unet_w = pipe.unet.get_submodule(unet_q).weight.detach().double().clone()
    te_mod = te_q if hasattr(pipe.text_encoder, "text_model") else te_q[len("text_model.") :]
    te_w = pipe.text_encoder.get_submodule(te_mod).weight.detach().double().clone()
    pipe.load_lora_weights(str(tmp_path / "d.safetensors"))
    pipe.fuse_lora()
    for w0, module, name in (
        (unet_w, pipe.unet.get_submodule(unet_q), f"unet.{unet_q}"),
        (te_w, pipe.text_encoder.get_submodule(te_mod), f"text_encoder.{te_q}"),
    ):
        want = w0 + ad.modules[name].delta(torch.float64)
        assert torch.allclose(module.weight.detach().double(), want, atol=1e-5), name


def test_older_diffusers_names(tmp_path):
    A, B = torch.randn(2, 8), torch.randn(8, 2)
    write_safetensors(
        tmp_path / "old.safetensors",
        {
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight": A,
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.up.weight": B,
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight": A,
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight": B,
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight": A,
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight": B,
        },
    )
    ad = lorakit.load(tmp_path / "old.safetensors")
    assert set(ad.modules) == {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
    }
    assert all(m.scale == 1.0 for m in ad.modules.values())


def comfyui_finds(keys, module):
    """Whether ComfyUI finds a diffusers SD1 UNet module's LoRA among `keys`. Facts (ComfyUI comfy/lora.py
    model_lora_keys_unet; comfy/weight_adapter/lora.py LoRAAdapter.load): a UNet module `k` (diffusers path) is
    keyed `unet.` + k with `.to_` replaced by `.processor.to_` and a final `.to_out.0` cut to `.to_out`; its up
    factor is looked up as `.lora_up.weight`, `_lora.up.weight`, `.lora_B.weight`, `.lora.up.weight` or
    `.lora_linear_layer.up.weight` after that key."""
    x = "unet." + module.replace(".to_", ".processor.to_")
    x = x[:-2] if x.endswith(".to_out.0") else x
    parts = (
        ".lora_up.weight",
        "_lora.up.weight",
        ".lora_B.weight",
        ".lora.up.weight",
        ".lora_linear_layer.up.weight",
    )
    return any(x + p in keys for p in parts)


def test_sd1_unet_names_both_diffusers_and_comfyui_read(tmp_path):
    """--to diffusers of an SD1 LoRA on every attention projection, proj_in, ff and a resnet conv: diffusers'
    load_lora_weights + fuse_lora gives W + dW for each module, and ComfyUI's key map finds each of them (under
    PEFT naming, which diffusers' own save uses, ComfyUI misses the attention projections)."""
    from lorakit.core import Adapter, Module

    pipe = tiny_sd_pipeline()
    g = torch.Generator().manual_seed(3)
    block = "down_blocks.0.attentions.0"
    modules = [
        f"{block}.transformer_blocks.0.{attn}.{p}"
        for attn in ("attn1", "attn2")
        for p in ("to_q", "to_k", "to_v", "to_out.0")
    ]
    modules += [f"{block}.proj_in", f"{block}.transformer_blocks.0.ff.net.2", "down_blocks.1.resnets.0.conv1"]
    ad = Adapter()
    for i, name in enumerate(modules):
        W = pipe.unet.get_submodule(name).weight
        A = torch.randn(2, *W.shape[1:], generator=g)
        B = torch.randn(W.shape[0], 2, *([1] * (W.ndim - 2)), generator=g)
        ad.add(Module(f"unet.{name}", A, B, alpha=1.0 + i))
    ad.save(tmp_path / "a.safetensors")
    lorakit.convert(tmp_path / "a.safetensors", tmp_path / "d.safetensors", to="diffusers")
    keys = set(TensorFile(tmp_path / "d.safetensors").header.entries)
    assert all(comfyui_finds(keys, name) for name in modules)
    peft_keys = {f"unet.{n}.lora_B.weight" for n in modules}
    assert [n for n in modules if not comfyui_finds(peft_keys, n)] == modules[:8]
    before = {n: pipe.unet.get_submodule(n).weight.detach().double().clone() for n in modules}
    pipe.load_lora_weights(str(tmp_path / "d.safetensors"))
    pipe.fuse_lora()
    for name in modules:
        want = before[name] + ad.modules[f"unet.{name}"].delta(torch.float64)
        got = pipe.unet.get_submodule(name).weight.detach().double()
        assert torch.allclose(got, want, rtol=0, atol=1e-5 * float(want.abs().max())), name
    back = lorakit.load(tmp_path / "d.safetensors")
    for name in modules:
        ref = ad.modules[f"unet.{name}"].delta(torch.float64)
        assert torch.allclose(
            back.modules[f"unet.{name}"].delta(torch.float64), ref, rtol=0, atol=1e-6 * float(ref.abs().max())
        )
