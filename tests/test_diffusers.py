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
    meta = {"unet.r": 4, "unet.lora_alpha": 8, "unet.rank_pattern": {"proj_in": 2}, "unet.alpha_pattern": {},
            "text_encoder.r": 4, "text_encoder.lora_alpha": 4}
    write_safetensors(tmp_path / "d.safetensors", tensors, {"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    lorakit.convert(tmp_path / "d.safetensors", tmp_path / "a.safetensors", to="lorakit")
    ad = lorakit.load(tmp_path / "a.safetensors")
    q = ad.modules["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert q.scale == 2.0 and ad.modules["unet.mid_block.attentions.0.proj_in"].scale == 4.0
    assert ad.modules["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"].scale == 1.0
    lorakit.convert(tmp_path / "a.safetensors", tmp_path / "d2.safetensors", to="diffusers")
    back = lorakit.load(tmp_path / "d2.safetensors")
    for name, m in ad.modules.items():
        assert torch.equal(bits(back.modules[name].A), bits(m.A)) and back.modules[name].scale == m.scale
    packed = json.loads(TensorFile(tmp_path / "d2.safetensors").header.metadata["lora_adapter_metadata"])
    assert packed["unet.r"] == 4 and packed["text_encoder.lora_alpha"] == 4.0
    assert set(TensorFile(tmp_path / "d2.safetensors").header.entries) == set(tensors)


def test_older_diffusers_names(tmp_path):
    A, B = torch.randn(2, 8), torch.randn(8, 2)
    write_safetensors(tmp_path / "old.safetensors", {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight": A,
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.up.weight": B,
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight": A,
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight": B,
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight": A,
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight": B,
    })
    ad = lorakit.load(tmp_path / "old.safetensors")
    assert set(ad.modules) == {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                               "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
                               "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"}
    assert all(m.scale == 1.0 for m in ad.modules.values())
