"""Interop with the real transformers and PEFT: lorakit's merged checkpoint loads with from_pretrained and its logits
match PEFT's unmerged forward; lorakit's error against fp64 is no larger than merge_and_unload's."""

import peft
import pytest
import torch
import transformers

import lorakit
from lorakit.core import Adapter, Module

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(tmp_path, dtype):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config).to(dtype).eval()
    model.save_pretrained(tmp_path / "base", safe_serialization=True)
    return model


def peft_model_with(model, rank, alpha, seed):
    """A PEFT LoRA model whose lora_B is nonzero (as after training), and the same adapter as a lorakit Adapter."""
    cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, lora_dropout=0.0)
    pm = peft.get_peft_model(model, cfg).eval()
    g = torch.Generator().manual_seed(seed)
    ad = Adapter()
    for name, mod in pm.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            A, B = mod.lora_A["default"].weight, mod.lora_B["default"].weight
            with torch.no_grad():
                A.copy_(torch.randn(A.shape, generator=g) * 0.05)
                B.copy_(torch.randn(B.shape, generator=g) * 0.05)
            base_name = name.removeprefix("base_model.model.")
            ad.add(Module(base_name, A.detach().float().clone(), B.detach().float().clone(), alpha=alpha))
    return pm, ad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_checkpoint_matches_peft_forward(tmp_path, dtype):
    base = tiny_llama(tmp_path, dtype)
    fp64_base = {k: v.double().clone() for k, v in base.state_dict().items()}
    pm, ad = peft_model_with(base, rank=4, alpha=8, seed=1)
    ad.save(tmp_path / "a.safetensors")
    lorakit.merge(tmp_path / "base", [str(tmp_path / "a.safetensors")], tmp_path / "merged", quiet=True)
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=dtype).eval()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        peft_logits = pm(ids).logits.float()
        ours = merged(ids).logits.float()
    if dtype == torch.float32:
        assert (ours - peft_logits).abs().max() <= 1e-5
    else:
        assert (ours - peft_logits).abs().max() <= 0.1 * peft_logits.abs().max()
    # error against the fp64 merge: lorakit's <= PEFT merge_and_unload's
    pm_merged = pm.merge_and_unload()
    ours_sd = merged.state_dict()
    ours_err = peft_err = 0.0
    for name, m in ad.modules.items():
        ref = fp64_base[name + ".weight"] + m.delta(torch.float64)
        ours_err += (ours_sd[name + ".weight"].double() - ref).norm().item() ** 2
        peft_err += (pm_merged.state_dict()[name + ".weight"].double() - ref).norm().item() ** 2
    assert ours_err <= peft_err * (1 + 1e-9), (ours_err, peft_err)
