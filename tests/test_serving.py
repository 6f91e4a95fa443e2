"""Serve-ready adapters: `validate --for ENGINE` flags what each engine would drop or misread, by code; `convert --for
ENGINE` writes a PEFT folder that the real PEFT, loaded with only what the engine honors (one r and lora_alpha, no
patterns, no rsLoRA, no DoRA), turns into the same logits as the original adapter."""

import json
import os
import warnings

import peft
import pytest
import torch
import transformers

import lorakit
from lorakit.serving import ENGINES

from conftest import TINY_LLAMA as LLAMA, assert_one_line_error

PATTERNS = dict(
    r=4,
    lora_alpha=8,
    target_modules=["q_proj", "v_proj", "down_proj"],
    rank_pattern={"model.layers.1.self_attn.q_proj": 2, "down_proj": 6},
    alpha_pattern={"v_proj": 3},
    use_rslora=True,
)
IDS = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(5))


def make_base():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()


def build(tmp_path, name, **config):
    """A PEFT LoRA folder, every adapter parameter at random; returns (base folder, adapter folder, its logits)."""
    base = make_base()
    if not (tmp_path / "base").exists():
        base.save_pretrained(tmp_path / "base")
    model = peft.get_peft_model(base, peft.LoraConfig(**config))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if "magnitude" in n else 0.0))
    model.save_pretrained(tmp_path / name)
    with torch.no_grad():
        return tmp_path / "base", tmp_path / name, model.eval()(IDS).logits


def as_engine_loads(folder):
    """The logits PEFT gives with only what the engines honor: the file's single r and lora_alpha."""
    path = os.path.join(folder, "adapter_config.json")
    config = json.load(open(path))
    for key in ("rank_pattern", "alpha_pattern"):
        config[key] = {}
    config["use_rslora"] = config["use_dora"] = False
    json.dump(config, open(path, "w"))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(make_base(), folder).eval()(IDS).logits


def close(got, want, tol=1e-5):
    return torch.allclose(got, want, rtol=0, atol=tol * want.abs().max())


@pytest.mark.parametrize("engine", ["vllm", "sglang", "lorax", "tgi"])
def test_convert_for_engine_folds_patterns_and_rslora(tmp_path, engine):
    base, adapter, want = build(tmp_path, "a", **PATTERNS)
    report = lorakit.convert(adapter, tmp_path / "out", for_engine=engine)
    config = json.load(open(tmp_path / "out" / "adapter_config.json"))
    assert report["to"] == "peft" and report["for"] == engine
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {} and not config["use_rslora"]
    assert config["r"] == 6  # the largest rank: every engine here serves any rank up to its maximum
    assert close(as_engine_loads(tmp_path / "out"), want)
    problems = lorakit.validate([tmp_path / "out"], for_engine=engine)
    assert problems["valid"], problems


def test_validate_for_flags_each_construct_by_code(tmp_path, cli):
    _, adapter, _ = build(tmp_path, "a", **PATTERNS, lora_bias=True, modules_to_save=["lm_head"])
    expected = {
        "vllm": {
            "LK505",
            "LK506",
        },  # patterns, rsLoRA and any rank up to max_lora_rank: measured in vLLM 0.32
        "sglang": {"LK502", "LK503", "LK505", "LK506"},
        "tgi": {"LK502", "LK503", "LK505", "LK506"},
        "llama.cpp": {"LK502", "LK503", "LK505", "LK506", "LK509"},
    }
    for engine, codes in expected.items():
        code, out, err = cli("validate", adapter, "--for", engine, "--json")
        found = {p["code"] for p in json.loads(out)["files"][0]["problems"]}
        assert code == 1 and found == codes, (engine, found)
    verdicts = lorakit.inspect(adapter)["engines"]
    assert {e: set(v["problems"]) for e, v in verdicts.items() if e in expected} == expected
    assert not any(v["served_exactly"] for v in verdicts.values())


def test_what_an_engine_drops_is_refused_with_the_way_out(tmp_path, cli):
    _, adapter, _ = build(tmp_path, "a", r=4, lora_alpha=8, target_modules=["q_proj"], lora_bias=True)
    code, out, err = cli("convert", adapter, "-o", tmp_path / "out", "--for", "vllm")
    assert_one_line_error(code, out, err, "LK506", "q_proj", "merge the adapter instead")
    _, dora, _ = build(tmp_path, "d", r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    code, out, err = cli("convert", dora, "-o", tmp_path / "out", "--for", "sglang")
    assert_one_line_error(code, out, err, "LK504", "DoRA", "--base BASE --rank R")
    _, head, _ = build(tmp_path, "h", r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"])
    code, out, err = cli("convert", head, "-o", tmp_path / "out", "--for", "tgi")
    assert_one_line_error(code, out, err, "LK507", "lm_head")
    assert not os.path.exists(tmp_path / "out")


def test_dora_and_full_weights_as_low_rank_deltas_against_the_base(tmp_path):
    """DoRA's delta is not low-rank and modules_to_save is a full tensor: at full rank both are exact LoRAs, and the
    report says so (energy 1); at a lower rank the energy kept is what the truncation measures."""
    base, dora, want = build(
        tmp_path, "d", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True
    )
    report = lorakit.convert(dora, tmp_path / "full", for_engine="vllm", base=str(base), rank=32)
    assert {r["kind"] for r in report["modules"]} == {"dora"}
    assert all(r["energy_kept"] > 1 - 1e-9 for r in report["modules"])
    assert close(as_engine_loads(tmp_path / "full"), want, 1e-4)
    low = lorakit.convert(dora, tmp_path / "low", for_engine="vllm", base=str(base), rank=4)
    assert all(r["rank"] == 4 and r["energy_kept"] < 1 for r in low["modules"] if r.get("kind") == "dora")
    _, saved, want = build(
        tmp_path, "s", r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]
    )
    report = lorakit.convert(saved, tmp_path / "s_out", for_engine="lorax", base=str(base), rank=32)
    assert [r["kind"] for r in report["modules"]] == ["replacement"]
    assert close(as_engine_loads(tmp_path / "s_out"), want, 1e-4)


def test_max_rank_truncates_and_reports_the_energy_kept(tmp_path):
    _, adapter, _ = build(tmp_path, "a", r=16, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    report = lorakit.convert(adapter, tmp_path / "out", for_engine="lorax", max_rank=8)
    assert {r["rank"] for r in report["modules"]} == {8} and {r["rank_in"] for r in report["modules"]} == {16}
    ad, src = lorakit.load(tmp_path / "out"), lorakit.load(adapter)
    for row in report["modules"]:
        D = src.modules[row["module"]].delta().double()
        err = (ad.modules[row["module"]].delta().double() - D).norm() ** 2 / D.norm() ** 2
        assert abs((1 - err) - row["energy_kept"]) < 1e-5


def test_convert_for_llama_cpp_writes_an_exact_gguf(tmp_path):
    base, adapter, _ = build(tmp_path, "a", **PATTERNS)
    lorakit.convert(adapter, tmp_path / "a.gguf", for_engine="llama.cpp", base=str(base))
    src = lorakit.load(adapter)
    back = lorakit.load(tmp_path / "a.gguf", base=str(base))
    for name, m in src.modules.items():
        assert torch.allclose(back.modules[name].delta(), m.delta(), rtol=1e-5, atol=1e-6), name


def test_options_of_for_are_checked(tmp_path, cli):
    _, adapter, _ = build(tmp_path, "a", r=4, lora_alpha=8, target_modules=["q_proj"])
    code, out, err = cli("convert", adapter, "-o", tmp_path / "x", "--for", "vllm", "--to", "gguf")
    assert_one_line_error(code, out, err, "vllm loads peft adapters, not gguf")
    code, out, err = cli("convert", adapter, "-o", tmp_path / "x", "--for", "vllm", "--max-rank", "0")
    assert_one_line_error(code, out, err, "--max-rank must be >= 1")
    code, out, err = cli("convert", adapter, "-o", tmp_path / "x")
    assert_one_line_error(code, out, err, "give the output format (--to FORMAT) or the engine (--for ENGINE)")
    assert set(ENGINES) == {"vllm", "sglang", "lorax", "tgi", "llama.cpp"}


def test_embeddings_and_peft_base_copies(tmp_path):
    """A LoRA on embed_tokens (PEFT saves a copy of the base embedding beside it): the copy is checked against the
    base and skipped, the embedding LoRA folded and padded like the others."""
    base, adapter, want = build(
        tmp_path,
        "a",
        r=3,
        lora_alpha=5,
        target_modules=["embed_tokens", "q_proj"],
        rank_pattern={"q_proj": 2},
    )
    report = lorakit.convert(adapter, tmp_path / "out", for_engine="vllm", base=str(base))
    assert any("equal to the base" in n for n in report["notes"]) and report["replacement_count"] == 0
    assert close(as_engine_loads(tmp_path / "out"), want)


def test_gpt2_conv1d_for_an_engine(tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    fresh = lambda: transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2").eval()  # noqa: E731
    model = peft.get_peft_model(
        fresh(), peft.LoraConfig(r=3, lora_alpha=5, target_modules=["c_attn"], fan_in_fan_out=True)
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        want = model.eval()(IDS).logits
    model.save_pretrained(tmp_path / "a")
    lorakit.convert(tmp_path / "a", tmp_path / "out", for_engine="vllm", base=str(tmp_path / "gpt2"))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        got = peft.PeftModel.from_pretrained(fresh(), tmp_path / "out").eval()(IDS).logits
    assert json.load(open(tmp_path / "out" / "adapter_config.json"))["r"] == 3 and close(got, want)


def test_vllm_rules_by_version(tmp_path, cli):
    """vLLM 0.32 (measured) applies patterns and serves any rank up to 512; before it, patterns are taken as
    ignored (its PEFTHelper of early 2025 has no such fields); a version that does not parse is refused."""
    _, adapter, _ = build(tmp_path, "a", **PATTERNS)
    code, out, err = cli("validate", adapter, "--for", "vllm", "--json")
    assert code == 0, out
    code, out, err = cli("validate", adapter, "--for", "vllm", "--engine-version", "0.32.0", "--json")
    assert code == 0 and json.loads(out)["files"][0]["engine_version"] == "0.32.0"
    code, out, err = cli("validate", adapter, "--for", "vllm", "--engine-version", "0.8.5", "--json")
    assert code == 1 and {p["code"] for p in json.loads(out)["files"][0]["problems"]} == {"LK502"}
    # before vLLM's rsLoRA support (its pull request #6909, taken as released in 0.7.0): read as alpha / r
    code, out, err = cli("validate", adapter, "--for", "vllm", "--engine-version", "0.6.5", "--json")
    assert code == 1 and {p["code"] for p in json.loads(out)["files"][0]["problems"]} == {"LK502", "LK503"}
    old = lorakit.serving.get_engine("vllm", "0.6.5").source
    assert "before 0.32.0" in old and "before 0.7.0" in old  # both changes cited
    code, out, err = cli("validate", adapter, "--for", "vllm", "--engine-version", "latest")
    assert_one_line_error(code, out, err, "engine version 'latest' does not read as a version")
    assert lorakit.serving.served_rank(lorakit.serving.get_engine("vllm"), 512) == 512
    assert lorakit.serving.served_rank(lorakit.serving.get_engine("vllm"), 513) is None


def test_qalora_reads_as_the_lora_on_every_input_and_converts_for_engines(tmp_path, cli):
    """QA-LoRA (use_qalora, PEFT's GPTQ layers): lora_A [r, in / g] acts on the inputs averaged in groups of g, times
    in / g (QALoraLinearVariant.forward). lorakit reads it as the same change of W (checked against that forward in
    fp64 on the identity); validate --for says no engine pools (LK512); convert --for vllm writes a PEFT folder whose
    delta, as the real PEFT computes it, is that change."""
    from safetensors.torch import load_file, save_file

    g = 4
    base, folder, _ = build(tmp_path, "plain", r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"])
    tensors = load_file(folder / "adapter_model.safetensors")
    gen = torch.Generator().manual_seed(3)
    for key in [k for k in tensors if "lora_A" in k]:
        r, width = tensors[key].shape
        tensors[key] = torch.randn(r, width // g, generator=gen)
    save_file(tensors, folder / "adapter_model.safetensors")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(
        json.dumps({**config, "use_qalora": True, "qalora_group_size": g})
    )

    def qalora_delta(
        key,
    ):  # PEFT's forward on every basis vector: x pooled, times in / g, @ A^T @ B^T * scaling
        A, B = tensors[key].double(), tensors[key.replace("lora_A", "lora_B")].double()
        inn = A.shape[1] * g
        x = torch.eye(inn, dtype=torch.float64)
        pooled = x.view(inn, inn // g, g).mean(2) * (inn // g)
        return (pooled @ A.T @ B.T * (4 / 2)).T  # [out, in]

    ad = lorakit.load(folder)
    for key in [k for k in tensors if "lora_A" in k]:
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        assert torch.allclose(ad.modules[module].delta(torch.float64), qalora_delta(key), rtol=0, atol=1e-12)
    code, out, err = cli("validate", folder, "--for", "vllm", "--json")
    assert code == 1 and "LK512" in {p["code"] for p in json.loads(out)["files"][0]["problems"]}
    code, out, err = cli("convert", folder, "-o", tmp_path / "served", "--for", "vllm", "-q")
    assert code == 0, err
    assert "LK512" not in cli("validate", tmp_path / "served", "--for", "vllm")[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        served = peft.PeftModel.from_pretrained(make_base(), tmp_path / "served")
    for key in [k for k in tensors if "lora_A" in k]:
        layer = served.base_model.model.get_submodule(
            key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        )
        got = layer.get_delta_weight("default").double()
        assert torch.allclose(got, qalora_delta(key), rtol=0, atol=1e-5 * got.abs().max()), key
