"""PEFT -> lorakit -> PEFT with the real PEFT and transformers: same logits (<= 1e-6, fp32), no warning on load."""

import json
import warnings

import peft
import pytest
import torch
import transformers

import lorakit
from lorakit.errors import LorakitError

LLAMA = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)

VARIANTS = {
    "patterns": dict(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"model.layers.1.self_attn.q_proj": 2, "down_proj": 6},
        alpha_pattern={"v_proj": 3, "model.layers.0.mlp.down_proj": 5},
    ),
    "rslora": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "o_proj"], use_rslora=True),
    "dora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], use_dora=True),
    "embedding": dict(r=4, lora_alpha=4, target_modules=["embed_tokens", "q_proj"]),
    "modules_to_save": dict(r=2, lora_alpha=8, target_modules=["v_proj"], modules_to_save=["lm_head"]),
    "lora_bias": dict(r=4, lora_alpha=6, target_modules=["q_proj", "gate_proj"], lora_bias=True),
}


def randomize_lora(model, seed):
    """Training leaves lora_B (and the magnitudes) nonzero: set every adapter parameter at random."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if "magnitude" in name else 0.0))


def load_peft(make_base, state, folder, save_base_to=None):
    """A fresh base with the original weights (saved first when asked: PEFT wraps it in place), then the PEFT
    adapter in `folder` loaded on it. Returns (model, the warnings PEFT gave)."""
    base = make_base().eval()
    base.load_state_dict(state)
    if save_base_to is not None:
        base.save_pretrained(save_base_to)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(base, folder).eval()
    relevant = [
        str(w.message)
        for w in caught
        if "peft" in str(w.filename)
        or "Found missing" in str(w.message)
        or "unexpected" in str(w.message).lower()
    ]
    return model, relevant


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_peft_round_trip_same_logits(tmp_path, variant):
    torch.manual_seed(0)
    # lora_bias needs layers with a bias (PEFT warns otherwise, and there is nothing to merge into)
    config = transformers.LlamaConfig(
        **LLAMA, attention_bias=variant == "lora_bias", mlp_bias=variant == "lora_bias"
    )
    base = transformers.LlamaForCausalLM(config).eval()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    model = peft.get_peft_model(base, peft.LoraConfig(lora_dropout=0.0, **VARIANTS[variant])).eval()
    randomize_lora(model, 1)
    model.save_pretrained(tmp_path / "orig")
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
    lorakit.convert(tmp_path / "orig", tmp_path / "a.safetensors", to="lorakit")
    assert lorakit.validate([str(tmp_path / "a.safetensors")])["valid"]
    lorakit.convert(tmp_path / "a.safetensors", tmp_path / "back", to="peft")
    from lorakit.io import TensorFile

    orig, back = (
        TensorFile(tmp_path / "orig" / "adapter_model.safetensors"),
        TensorFile(tmp_path / "back" / "adapter_model.safetensors"),
    )
    assert set(orig.header.entries) == set(back.header.entries)  # every tensor kept, under PEFT's own names
    loaded, warned = load_peft(
        lambda: transformers.LlamaForCausalLM(config),
        base_state,
        tmp_path / "back",
        save_base_to=tmp_path / "base",
    )
    assert warned == [], warned
    with torch.no_grad():
        got = loaded(ids).logits
    assert (got - want).abs().max().item() <= 1e-6
    # and lorakit's own merge of the converted adapter gives the same logits without the adapter
    lorakit.merge(tmp_path / "base", [str(tmp_path / "a.safetensors")], tmp_path / "merged", quiet=True)
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert (merged(ids).logits - want).abs().max().item() <= 1e-4


def test_gpt2_fan_in_fan_out_and_dora(tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    base = transformers.GPT2LMHeadModel(config).eval()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    model = peft.get_peft_model(
        base,
        peft.LoraConfig(
            r=2,
            lora_alpha=4,
            target_modules=["c_attn", "c_fc"],
            fan_in_fan_out=True,
            use_dora=True,
            lora_dropout=0.0,
        ),
    ).eval()
    randomize_lora(model, 2)
    model.save_pretrained(tmp_path / "orig")
    ids = torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
    lorakit.convert(tmp_path / "orig", tmp_path / "a.safetensors", to="lorakit")
    ad = lorakit.load(tmp_path / "a.safetensors")
    m = ad.modules["transformer.h.0.attn.c_attn"]
    assert m.kind == "linear_t" and m.shape == (32, 96) and m.dora_axis == 1
    lorakit.convert(tmp_path / "a.safetensors", tmp_path / "back", to="peft")
    loaded, warned = load_peft(
        lambda: transformers.GPT2LMHeadModel(config), state, tmp_path / "back", save_base_to=tmp_path / "base"
    )
    assert warned == []
    with torch.no_grad():
        assert (loaded(ids).logits - want).abs().max().item() <= 1e-6
    # merging the GPT-2 DoRA adapter into the [in, out] Conv1D weights gives the adapter's outputs
    lorakit.merge(tmp_path / "base", [str(tmp_path / "a.safetensors")], tmp_path / "merged", quiet=True)
    merged = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert (merged(ids).logits - want).abs().max().item() <= 1e-4


def test_conv_layers(tmp_path):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.head = torch.nn.Linear(8, 4)

        def forward(self, x):
            return self.head(self.conv(x).mean((2, 3)))

    torch.manual_seed(0)
    base = Net().eval()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    model = peft.get_peft_model(
        base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["conv", "head"])
    ).eval()
    randomize_lora(model, 3)
    model.save_pretrained(tmp_path / "orig")
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        want = model(x)
    lorakit.convert(tmp_path / "orig", tmp_path / "a.safetensors", to="lorakit")
    assert lorakit.load(tmp_path / "a.safetensors").modules["conv"].kind == "conv"
    lorakit.convert(tmp_path / "a.safetensors", tmp_path / "back", to="peft")
    loaded, warned = load_peft(Net, state, tmp_path / "back")
    with torch.no_grad():
        assert (loaded(x) - want).abs().max().item() <= 1e-6


def test_peft_bad_input(tmp_path, cli):
    from lorakit.io import write_safetensors

    d = tmp_path / "bad"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    write_safetensors(
        d / "adapter_model.safetensors", {"base_model.model.x.lora_A.weight": torch.zeros(2, 4)}
    )
    c, out, err = cli("convert", d, "-o", tmp_path / "o.safetensors", "--to", "lorakit")
    assert c == 2 and "module has lora_A but no lora_B (wrong pairing)" in err and "'x'" in err
    write_safetensors(
        d / "adapter_model.safetensors",
        {
            "base_model.model.x.lora_A.weight": torch.zeros(2, 4),
            "base_model.model.x.lora_B.weight": torch.zeros(3, 5),
        },
    )
    c, out, err = cli("convert", d, "-o", tmp_path / "o.safetensors", "--to", "lorakit")
    assert c == 2 and "rank 2 but up/B factor has rank 5" in err
    write_safetensors(
        d / "adapter_model.safetensors",
        {
            "base_model.model.x.lora_A.weight": torch.zeros(2, 4),
            "base_model.model.x.lora_B.weight": torch.zeros(3, 2),
            "base_model.model.x.something_else": torch.zeros(1),
        },
    )
    c, out, err = cli("convert", d, "-o", tmp_path / "o.safetensors", "--to", "lorakit")
    assert c == 2 and "1 unknown keys: base_model.model.x.something_else" in err
    c, out, err = cli("convert", d, "-o", tmp_path / "o.safetensors", "--to", "lorakit", "--allow-unknown")
    assert c == 0 and "skipped 1 unknown keys" in out
    bare = tmp_path / "bare.safetensors"
    write_safetensors(
        bare,
        {
            "base_model.model.x.lora_A.weight": torch.zeros(2, 4),
            "base_model.model.x.lora_B.weight": torch.zeros(3, 2),
        },
    )
    with pytest.raises(LorakitError, match=r"lora_alpha is unknown: pass alpha=\.\.\."):
        lorakit.load(bare)
    assert lorakit.load(bare, alpha=4.0).modules["x"].scale == 2.0


@pytest.mark.parametrize("edit", ["r", "use_dora"])
def test_configs_peft_cannot_load_as_written_are_refused(tmp_path, cli, edit):
    """What the real PEFT does with an edited config, and lorakit's refusal of it: `r` above the factors' rank, PEFT
    cannot load at all (size mismatch); `use_dora` without magnitudes, PEFT loads and starts them from the base's
    norms, so its logits are not the plain LoRA's the file holds."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**LLAMA)
    base = transformers.LlamaForCausalLM(config).eval()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_lora(model, 1)
    model.save_pretrained(tmp_path / "a")
    ids = torch.randint(0, 96, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(ids).logits
    path = tmp_path / "a" / "adapter_config.json"
    saved = json.loads(path.read_text())
    path.write_text(json.dumps({**saved, **({"r": 8} if edit == "r" else {"use_dora": True})}))
    if edit == "r":
        with pytest.raises(RuntimeError, match="size mismatch"):
            load_peft(lambda: transformers.LlamaForCausalLM(config), state, tmp_path / "a")
        fragment = "lora_A has rank 4 but adapter_config.json gives this module r = 8"
    else:
        loaded, _ = load_peft(lambda: transformers.LlamaForCausalLM(config), state, tmp_path / "a")
        with torch.no_grad():
            assert (loaded(ids).logits - plain).abs().max().item() > 1e-3
        fragment = "use_dora but the file has no lora_magnitude_vector"
    code, out, err = cli("convert", tmp_path / "a", "--to", "lorakit", "-o", tmp_path / "o.safetensors")
    assert code == 2 and fragment in err and "Traceback" not in err, err


@pytest.mark.parametrize(
    "targeting",
    [
        {"target_modules": ["q_proj", "v_proj"]},
        {"target_modules": ["q_proj", "v_proj", "down_proj"], "layers_to_transform": [1]},
        {
            "target_modules": ["q_proj", "v_proj", "down_proj"],
            "layers_to_transform": 0,
            "layers_pattern": "layers",
        },
        {"target_modules": ["q_proj", "v_proj", "down_proj"], "exclude_modules": ["v_proj"]},
        {"target_modules": r".*\.(q|v|down)_proj", "exclude_modules": r"model\.layers\.0\..*"},
        {"target_modules": ["model.layers.0.self_attn.q_proj", "down_proj"]},
    ],
)
def test_modules_the_config_does_not_target_are_the_ones_peft_leaves_out(tmp_path, targeting):
    """An adapter_config.json whose targeting leaves out modules the file holds (edited, or saved beside other
    weights): lorakit names exactly the modules the real PEFT does not inject, so does not load, and warns."""
    config = transformers.LlamaConfig(**LLAMA)
    model = peft.get_peft_model(
        transformers.LlamaForCausalLM(config),
        peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"]),
    )
    model.save_pretrained(tmp_path / "a")
    assert not any("does not target" in n for n in lorakit.load(tmp_path / "a").notes)  # as PEFT saved it
    path = tmp_path / "a" / "adapter_config.json"
    json.dump({**json.load(open(path)), **targeting}, open(path, "w"))
    held = {
        n.removesuffix(".lora_A") for n, _ in model.base_model.model.named_modules() if n.endswith(".lora_A")
    }
    reloaded = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM(config), tmp_path / "a")
    injected = {n for n, m in reloaded.base_model.model.named_modules() if hasattr(m, "lora_A")}
    left_out = sorted(held - injected)
    notes = [n for n in lorakit.load(tmp_path / "a").notes if "does not target" in n]
    assert left_out and len(notes) == 1 and f"does not target {len(left_out)} module(s)" in notes[0]
    assert notes[0].endswith(": " + ", ".join(left_out))
