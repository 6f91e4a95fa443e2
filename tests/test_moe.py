"""PEFT target_parameters on Mixture-of-Experts weights (transformers 5 + PEFT, tiny Qwen3-MoE and Mixtral): read as
exact per-expert LoRA modules, merged into the per-expert checkpoint transformers writes, equal to PEFT's
merge_and_unload + save_pretrained, and the merged model's logits equal the adapter's."""

import json
import os

import peft
import pytest
import torch
import transformers

import lorakit
from lorakit.bases import open_base

from conftest import assert_one_line_error

SIZE = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
MODELS = {
    "qwen3_moe": lambda: transformers.Qwen3MoeForCausalLM(
        transformers.Qwen3MoeConfig(
            **SIZE, intermediate_size=48, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2
        )
    ),
    "qwen3_5_moe": lambda: transformers.Qwen3_5MoeForCausalLM(
        transformers.Qwen3_5MoeTextConfig(
            **SIZE,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=16,
            num_experts=4,
            num_experts_per_tok=2,
            layer_types=["full_attention", "full_attention"],
        )
    ),
    "mixtral": lambda: transformers.MixtralForCausalLM(
        transformers.MixtralConfig(**SIZE, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2)
    ),
}
# gpt-oss keeps its experts fused on disk, [E, in, out]: intermediate 24 keeps every expert matrix non-square, 16
# makes gate_up_proj [E, 32, 32] square (its orientation then comes from the model type)
GPT_OSS = lambda intermediate: transformers.GptOssForCausalLM(  # noqa: E731
    transformers.GptOssConfig(
        **SIZE,
        intermediate_size=intermediate,
        num_local_experts=4,
        num_experts_per_tok=2,
        head_dim=8,
        max_position_embeddings=64,
        layer_types=["full_attention", "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
)
# Llama 4 keeps its experts fused on disk too ([E, H, 2I], gate and up concatenated), under feed_forward.experts
LLAMA4 = lambda: transformers.Llama4ForCausalLM(  # noqa: E731
    transformers.Llama4TextConfig(
        **SIZE,
        intermediate_size=16,
        intermediate_size_mlp=32,
        num_local_experts=4,
        num_experts_per_tok=1,
        head_dim=8,
    )
)
FUSED_ON_DISK = ("gpt_oss", "llama4")
IDS = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(2))


def make(kind):
    torch.manual_seed(0)
    if kind.startswith("gpt_oss"):
        return GPT_OSS(16 if kind == "gpt_oss_square" else 24).eval()
    return (LLAMA4 if kind == "llama4" else MODELS[kind])().eval()


def build(tmp_path, kind, **config):
    """(base folder, adapter folder, PEFT's merged folder, the adapter's logits)."""
    base = make(kind)
    base.save_pretrained(tmp_path / "base")
    lora = dict(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"])
    block = "feed_forward" if kind == "llama4" else "mlp"
    lora["target_parameters"] = [f"{block}.experts.gate_up_proj", f"{block}.experts.down_proj"]
    model = peft.get_peft_model(base, peft.LoraConfig(**{**lora, **config}))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        logits = model(IDS).logits
    model.save_pretrained(tmp_path / "adapter")
    model.merge_and_unload().save_pretrained(tmp_path / "peft_merged")
    return tmp_path / "base", tmp_path / "adapter", tmp_path / "peft_merged", logits


def assert_same_checkpoint(a, b):
    A, B = open_base(a), open_base(b)
    assert set(A.shapes()) == set(B.shapes())
    for name in B.shapes():
        want = B.get(name).double()
        assert torch.allclose(A.get(name).double(), want, rtol=1e-5, atol=1e-6 * want.abs().max()), name


@pytest.mark.parametrize("kind", [*sorted(MODELS), "gpt_oss", "gpt_oss_square", "llama4"])
@pytest.mark.parametrize("rslora", [False, True])
def test_expert_lora_merges_as_peft_does(tmp_path, kind, rslora):
    base, adapter, peft_merged, logits = build(tmp_path, kind, use_rslora=rslora)
    report = lorakit.merge(base, [adapter], tmp_path / "out", quiet=True)
    # per layer: q, v and the experts' tensors: per expert gate, up, down, or gpt-oss's two fused ones
    assert report["merged_count"] == 2 * (2 + (2 if kind.startswith(FUSED_ON_DISK) else 4 * 3))
    assert_same_checkpoint(tmp_path / "out", peft_merged)
    merged = type(make(kind)).from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.allclose(merged(IDS).logits, logits, atol=1e-5 * logits.abs().max())


def test_expert_modules_are_named_as_the_base_stores_them(tmp_path):
    base, adapter, _, _ = build(tmp_path, "mixtral")
    ad = lorakit.load(adapter, base=str(base))
    assert "model.layers.0.block_sparse_moe.experts.3.w3" in ad.modules or any(
        ".experts.3.up_proj" in n for n in ad.modules
    )
    stored = open_base(base).shapes()
    assert all(f"{n}.weight" in stored for n in ad.modules)
    report = lorakit.inspect(adapter, verbose=True)
    assert report["module_count"] == len(ad.modules) == 28
    experts = {t["target"]: (t["experts"], t["count"]) for t in report["targets"] if t["experts"]}
    assert len(experts) == 3 and set(experts.values()) == {(4, 8)}, report["targets"]  # 4 experts x 2 layers


def test_peft_before_0_19_1_orders_b_expert_major(tmp_path):
    """The same experts saved in PEFT 0.18's column order read back to the same modules."""
    from safetensors.torch import load_file, save_file

    base, adapter, peft_merged, _ = build(tmp_path, "qwen3_moe")
    weights, config_path = adapter / "adapter_model.safetensors", adapter / "adapter_config.json"
    sd = load_file(weights)
    for key in [k for k in sd if ".experts." in k and "lora_B" in k]:
        out, rE = sd[key].shape
        sd[key] = (
            sd[key].reshape(out, 2, rE // 2).permute(0, 2, 1).reshape(out, rE).contiguous()
        )  # e r_i order
    save_file(sd, weights)
    config = json.load(open(config_path))
    config["peft_version"] = "0.18.0"
    json.dump(config, open(config_path, "w"))
    lorakit.merge(base, [adapter], tmp_path / "out", quiet=True)
    assert_same_checkpoint(tmp_path / "out", peft_merged)


def test_an_expert_layout_the_base_lacks_names_both_candidates(tmp_path, cli):
    _, adapter, _, _ = build(tmp_path, "qwen3_moe")
    other = make("mixtral")
    other.save_pretrained(tmp_path / "other")  # no experts.N.gate_proj: the other family's names
    os.rename(tmp_path / "other" / "model.safetensors", tmp_path / "other" / "x.safetensors")
    from lorakit.io import write_safetensors

    dense = {k: v for k, v in open_base(tmp_path / "other").ckpt.where.items()}
    tensors = {k: open_base(tmp_path / "other").get(k) for k in dense if ".experts." not in k}
    os.remove(tmp_path / "other" / "x.safetensors")
    write_safetensors(tmp_path / "other" / "model.safetensors", tensors)
    code, out, err = cli("merge", tmp_path / "other", adapter, "-o", tmp_path / "out")
    assert_one_line_error(
        code, out, err, "neither layout", "experts.0.down_proj.weight", "experts.0.w2.weight"
    )
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_convert_to_peft_per_expert_loads_with_the_same_logits(tmp_path, kind):
    """The per-expert modules written as a PEFT folder: v4-style keys where PEFT on transformers 5 converts them onto
    the fused experts (the qwen2_moe family, Mixtral; targets by the projections' names, which PEFT 0.21 and 0.22
    both convert), target_parameters where it would load them as nothing (Qwen3.5-MoE); either way PEFT computes
    what the ParamWrapper adapter computes."""
    base, adapter, _, logits = build(tmp_path, kind)
    lorakit.convert(adapter, tmp_path / "per_expert", to="peft", base=str(base))
    config = json.load(open(tmp_path / "per_expert" / "adapter_config.json"))
    if kind == "qwen3_5_moe":
        assert config["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
        assert not any(".experts." in m for m in config["target_modules"])
    else:  # the experts by their projections' names: PEFT 0.22 loads full per-expert names as nothing
        assert not config.get("target_parameters") and not any(
            ".experts." in m for m in config["target_modules"]
        )
        assert {"q_proj", "v_proj"} & {m.rsplit(".", 1)[-1] for m in config["target_modules"]}
    with torch.no_grad():
        model = peft.PeftModel.from_pretrained(
            type(make(kind)).from_pretrained(base), tmp_path / "per_expert"
        )
        got = model.eval()(IDS).logits
    assert torch.allclose(got, logits, atol=1e-5 * logits.abs().max()), (got - logits).abs().max()
    lorakit.merge(base, [tmp_path / "per_expert"], tmp_path / "out", quiet=True)  # a per-expert v4 adapter
    assert_same_checkpoint(tmp_path / "out", tmp_path / "peft_merged")


@pytest.mark.parametrize("kind", ["F32", "Q8_0"])
def test_expert_lora_merges_into_gguf_exps_tensors(tmp_path, kind):
    """llama.cpp keeps a layer's experts in one 3-D tensor blk.N.ffn_{gate,up,down}_exps [E, n_ff, n_embd]: each
    per-expert module is a row slice of it, merged in its type (F32 exactly; Q8_0 requantized with fresh block scales,
    the experts without a LoRA within a step of what they were)."""
    import gguf
    import numpy as np
    from gguf.quants import dequantize, quantize

    from lorakit.core import Adapter, Module

    E, hidden, ff, rng = 4, 32, 64, np.random.default_rng(0)
    w = gguf.GGUFWriter(os.fspath(tmp_path / "moe.gguf"), "qwen3moe")
    w.add_block_count(1)
    for name, shape in (("gate", (E, ff, hidden)), ("up", (E, ff, hidden)), ("down", (E, hidden, ff))):
        values = (rng.standard_normal(shape) * 0.02).astype(np.float32)
        if kind == "F32":
            w.add_tensor(f"blk.0.ffn_{name}_exps.weight", values)
        else:
            w.add_tensor(
                f"blk.0.ffn_{name}_exps.weight",
                quantize(values, gguf.GGMLQuantizationType.Q8_0),
                raw_dtype=gguf.GGMLQuantizationType.Q8_0,
            )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    g, ad = torch.Generator().manual_seed(3), Adapter()
    for e in (1, 3):  # experts 0 and 2 have no LoRA
        for proj, (o, i) in (
            ("gate_proj", (ff, hidden)),
            ("up_proj", (ff, hidden)),
            ("down_proj", (hidden, ff)),
        ):
            A, B = torch.randn(2, i, generator=g) * 0.1, torch.randn(o, 2, generator=g) * 0.1
            ad.add(Module(f"model.layers.0.mlp.experts.{e}.{proj}", A, B, alpha=2.0))
    ad.save(tmp_path / "a.safetensors")
    # rescale: fresh block scales (this delta leaves the stored blocks' range: the kept grid would clip it)
    options = {} if kind == "F32" else {"strategy": "rescale"}
    report = lorakit.merge(
        tmp_path / "moe.gguf", [tmp_path / "a.safetensors"], tmp_path / "out.gguf", quiet=True, **options
    )
    assert report["merged_count"] == 3

    def read(path):
        out = {}
        for t in gguf.GGUFReader(path).tensors:
            out[t.name] = np.asarray(dequantize(t.data, t.tensor_type), np.float64).reshape(
                tuple(reversed([int(d) for d in t.shape]))
            )
        return out

    before, after = read(tmp_path / "moe.gguf"), read(tmp_path / "out.gguf")
    for e in range(E):
        for gguf_name, proj in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
            name = f"blk.0.ffn_{gguf_name}_exps.weight"
            got = after[name][e] - before[name][e]
            m = ad.modules.get(f"model.layers.0.mlp.experts.{e}.{proj}")
            if m is None:  # no LoRA: as it was (rescale refits every block: within one Q8_0 step)
                step = np.abs(before[name][e]).max() / 127 if kind == "Q8_0" else 0.0
                assert np.abs(after[name][e] - before[name][e]).max() <= step, (name, e)
                continue
            want = m.delta().double().numpy()
            err = np.linalg.norm(got - want) / np.linalg.norm(want)
            assert err < (1e-6 if kind == "F32" else 0.05), (name, e, err)
    if kind == "F32":  # and back: extract gives the per-expert LoRAs under Hugging Face's names
        lorakit.extract(
            tmp_path / "moe.gguf", tmp_path / "out.gguf", tmp_path / "x.safetensors", rank=2, quiet=True
        )
        got = lorakit.load(tmp_path / "x.safetensors").modules
        assert sorted(got) == sorted(ad.modules)
        for name, m in ad.modules.items():
            err = float((got[name].delta().double() - m.delta().double()).norm() / m.delta().double().norm())
            assert err < 1e-5, (name, err)


def test_engines_that_load_every_expert(tmp_path, cli):
    """vLLM and SGLang load per-expert LoRAs for every expert of a layer: a LoRA on some of them is flagged (LK510),
    and `convert --for` with the base adds zero LoRAs for the others (the same dW)."""
    base, adapter, _, _ = build(tmp_path, "qwen3_moe")
    some = lorakit.load(adapter, base=str(base))
    for name in [n for n in some.modules if ".experts.2." in n]:
        del some.modules[name]
    some.save(tmp_path / "some.safetensors")
    code, out, err = cli("validate", tmp_path / "some.safetensors", "--for", "vllm", "--json")
    found = {p["code"] for p in json.loads(out)["files"][0]["problems"]}
    assert code == 1 and "LK510" in found, found
    report = lorakit.convert(
        tmp_path / "some.safetensors", tmp_path / "served", for_engine="vllm", base=str(base)
    )
    served = lorakit.load(tmp_path / "served")
    assert any("zero LoRAs" in n for n in report["notes"])
    for name, m in served.modules.items():
        want = some.modules[name].delta() if name in some.modules else torch.zeros(m.shape)
        assert torch.allclose(m.delta(), want, atol=1e-7), name
    assert {n for n in served.modules if ".experts.2." in n} and lorakit.validate(
        [tmp_path / "served"], for_engine="vllm"
    )["valid"]


def test_vllm_before_its_moe_lora_loads_no_expert_lora(tmp_path, cli):
    """vLLM's LoRA on FusedMoE experts came with 0.11.2 (its #21229; TRL #4584): an older --engine-version flags
    each expert group (LK511), the attention modules stay served; 0.11.2 and later load them."""
    base, adapter, _, _ = build(tmp_path, "qwen3_moe")
    lorakit.load(adapter, base=str(base)).save(tmp_path / "a.safetensors")
    args = ("validate", tmp_path / "a.safetensors", "--for", "vllm", "--json", "--engine-version")
    code, out, err = cli(*args, "0.11.1")
    problems = json.loads(out)["files"][0]["problems"]
    experts = [p for p in problems if p["code"] == "LK511"]
    assert code == 1 and experts and all(".experts." in p["tensor"] for p in experts), problems
    code, out, err = cli(*args, "0.11.2")
    assert "LK511" not in {p["code"] for p in json.loads(out)["files"][0]["problems"]}


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda sd, c: c.update(rank_pattern={"gate_up_proj": 3}), "not r x E experts for r = 3"),
        (lambda sd, c: c.update(r=3), "lora_A has rank 2 but adapter_config.json gives this module r = 3"),
        (
            lambda sd, c: [sd.pop(k) for k in list(sd) if "experts.base_layer.lora_B" in k],
            "ParamWrapper without",
        ),
        (
            lambda sd, c: c.update(target_parameters=["mlp.experts.gate_up_proj"]),
            "nested ParamWrappers but 1",
        ),
        (lambda sd, c: c.update(target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.w13"]), "'w13'"),
    ],
    ids=["rank", "attention-rank", "missing-B", "nesting", "unknown-parameter"],
)
def test_hostile_expert_adapters_are_one_line_errors(tmp_path, cli, edit, fragment):
    from safetensors.torch import load_file, save_file

    base, adapter, _, _ = build(tmp_path, "qwen3_moe")
    weights, config_path = adapter / "adapter_model.safetensors", adapter / "adapter_config.json"
    sd, config = load_file(weights), json.load(open(config_path))
    edit(sd, config)
    save_file(sd, weights)
    json.dump(config, open(config_path, "w"))
    code, out, err = cli("merge", base, adapter, "-o", tmp_path / "out")
    assert_one_line_error(code, out, err, fragment, "adapter")
    assert not os.path.exists(tmp_path / "out")


def test_expert_lora_as_llama_cpp_3d_tensors(tmp_path):
    """Per-expert modules -> llama.cpp's 3-D expert LoRA (lora_a [E, r, in], lora_b [E, out, r]; ggml ne {in, r, E},
    {r, out, E}): read by the gguf package, every expert's delta is (alpha / r) b[e] @ a[e] (ranks padded, scales
    folded), the experts without a LoRA are zero; read back by lorakit, the same modules; merged into a GGUF MoE
    base, the same tensors as the safetensors adapter gives."""
    import gguf
    import numpy as np

    from lorakit.core import Adapter, Module

    E, hidden, ff, rng = 4, 32, 64, np.random.default_rng(0)
    w = gguf.GGUFWriter(os.fspath(tmp_path / "moe.gguf"), "qwen3moe")
    w.add_block_count(1)
    w.add_uint32("qwen3moe.expert_count", E)
    for name, shape in (("gate", (E, ff, hidden)), ("up", (E, ff, hidden)), ("down", (E, hidden, ff))):
        w.add_tensor(f"blk.0.ffn_{name}_exps.weight", (rng.standard_normal(shape) * 0.02).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    g, ad = torch.Generator().manual_seed(3), Adapter()
    for e, rank, alpha in ((1, 2, 4.0), (2, 3, 3.0)):  # experts 0 and 3 have none; two ranks and alphas
        for proj, (o, i) in (
            ("gate_proj", (ff, hidden)),
            ("up_proj", (ff, hidden)),
            ("down_proj", (hidden, ff)),
        ):
            A, B = torch.randn(rank, i, generator=g) * 0.1, torch.randn(o, rank, generator=g) * 0.1
            ad.add(Module(f"model.layers.0.mlp.experts.{e}.{proj}", A, B, alpha=alpha))
    ad.save(tmp_path / "a.safetensors")
    lorakit.convert(tmp_path / "a.safetensors", tmp_path / "lora.gguf", to="gguf", base=tmp_path / "moe.gguf")
    reader = gguf.GGUFReader(tmp_path / "lora.gguf")
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    tensors = {
        t.name: np.array(t.data, np.float64).reshape(tuple(reversed([int(d) for d in t.shape])))
        for t in reader.tensors
    }
    a, b = tensors["blk.0.ffn_down_exps.weight.lora_a"], tensors["blk.0.ffn_down_exps.weight.lora_b"]
    assert a.shape == (E, 3, ff) and b.shape == (E, hidden, 3)
    for e in range(E):
        got = alpha / 3 * b[e] @ a[e]
        m = ad.modules.get(f"model.layers.0.mlp.experts.{e}.down_proj")
        want = m.delta().double().numpy() if m is not None else np.zeros((hidden, ff))
        assert np.abs(got - want).max() <= 1e-6 * max(1e-30, np.abs(want).max()) + (0 if m else 0.0), e
    back = lorakit.load(tmp_path / "lora.gguf")
    assert set(back.modules) == set(ad.modules)
    for name, m in ad.modules.items():
        assert torch.allclose(back.modules[name].delta().double(), m.delta().double(), atol=1e-7), name
    lorakit.merge(tmp_path / "moe.gguf", [tmp_path / "a.safetensors"], tmp_path / "x.gguf", quiet=True)
    lorakit.merge(tmp_path / "moe.gguf", [tmp_path / "lora.gguf"], tmp_path / "y.gguf", quiet=True)
    x = {t.name: np.array(t.data) for t in gguf.GGUFReader(tmp_path / "x.gguf").tensors}
    y = {t.name: np.array(t.data) for t in gguf.GGUFReader(tmp_path / "y.gguf").tensors}
    assert set(x) == set(y) and all(np.allclose(x[k], y[k], atol=1e-7) for k in x)


@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])
def test_convert_to_lorakit_packs_experts_and_merges_as_peft_does(tmp_path, kind):
    """Spec 1.3: each projection's experts as one `experts` module (lora_A [E, r, in], lora_B [E, out, r]); read
    back as the very per-expert modules, and merged equal to PEFT's merge_and_unload."""
    from lorakit.io import read_header

    base, adapter, peft_merged, _ = build(tmp_path, kind)
    out = tmp_path / "a.safetensors"
    lorakit.convert(adapter, out, to="lorakit", base=str(base))
    header = read_header(out)
    kinds = json.loads(header.metadata["lorakit.modules"])
    packed = {n: k for n, k in kinds.items() if k["kind"] == "experts"}
    assert header.metadata["lorakit.spec_version"] == "1.3"
    assert len(packed) == 2 * (2 if kind == "gpt_oss" else 3), kinds
    for name in packed:
        A, B = header.entries[f"{name}.lora_A"].shape, header.entries[f"{name}.lora_B"].shape
        assert name.count("*") == 1 and A[:2] == (4, 2) and B[0] == 4 and B[2] == 2
    want, got = lorakit.load(adapter, base=str(base)), lorakit.load(out)
    assert sorted(got.modules) == sorted(want.modules)
    for n, m in want.modules.items():
        assert torch.equal(got.modules[n].A, m.A) and torch.equal(got.modules[n].B, m.B), n
        assert got.modules[n].alpha == m.alpha
    lorakit.merge(base, [out], tmp_path / "out", quiet=True)
    assert_same_checkpoint(tmp_path / "out", peft_merged)
    again = tmp_path / "b.safetensors"
    got.provenance = lorakit.load(out).provenance
    got.save(again)
    assert again.read_bytes() == out.read_bytes()


def test_experts_that_differ_stay_linear_modules(tmp_path):
    """Experts of one projection that differ in rank, or only some experts, are not packed: per-expert linear
    modules, and the file stays at the version older readers read."""
    from lorakit.core import Adapter, Module
    from lorakit.io import read_header

    g = torch.Generator().manual_seed(0)
    ad = Adapter()
    for e, rank in enumerate((2, 2, 3)):
        ad.add(Module(f"m.experts.{e}.up_proj", torch.randn(rank, 8, generator=g), torch.randn(6, rank), 1.0))
    for e in (0, 2):
        ad.add(Module(f"m.experts.{e}.down_proj", torch.randn(2, 6, generator=g), torch.randn(8, 2), 1.0))
    ad.save(tmp_path / "a.safetensors")
    header = read_header(tmp_path / "a.safetensors")
    assert header.metadata["lorakit.spec_version"] == "1.1"
    assert {k["kind"] for k in json.loads(header.metadata["lorakit.modules"]).values()} == {"linear"}
    report = lorakit.inspect(tmp_path / "a.safetensors")
    assert report["experts"] == [
        {"layer": "m.experts", "experts": 3, "ranks": [2, 3], "projections": ["down_proj", "up_proj"]}
    ]


def test_per_expert_alphas_and_a_bad_one(tmp_path, cli):
    """Experts with their own alphas pack into alpha [E]; one alpha 0 among them is LK206 naming the tensor."""
    from safetensors.torch import load_file, save_file

    from lorakit.core import Adapter, Module

    g = torch.Generator().manual_seed(0)
    ad = Adapter()
    for e in range(3):
        ad.add(
            Module(f"m.experts.gate_up_proj.{e}", torch.randn(2, 8, generator=g), torch.randn(6, 2), 1.0 + e)
        )
    ad.save(tmp_path / "a.safetensors")
    sd = load_file(tmp_path / "a.safetensors")
    assert sd["m.experts.gate_up_proj.*.alpha"].tolist() == [1.0, 2.0, 3.0]
    assert [m.alpha for m in lorakit.load(tmp_path / "a.safetensors").modules.values()] == [1.0, 2.0, 3.0]
    from lorakit.io import read_header

    meta = read_header(tmp_path / "a.safetensors").metadata
    sd["m.experts.gate_up_proj.*.alpha"] = torch.tensor([1.0, -2.0, 3.0])
    save_file(sd, tmp_path / "bad.safetensors", metadata=meta)
    code, out, err = cli("convert", tmp_path / "bad.safetensors", "--to", "peft", "-o", tmp_path / "out")
    assert_one_line_error(code, out, err, "bad.safetensors", "m.experts.gate_up_proj.1", "-2.0")
    code, out, _ = cli("validate", tmp_path / "bad.safetensors")
    assert code == 1 and "LK206" in out


@pytest.mark.parametrize("kind", ["gpt_oss", "gpt_oss_square", "llama4"])
def test_fused_experts_convert_to_peft_target_parameters(tmp_path, kind, cli):
    """LoRAs on rows of gpt-oss' fused expert tensors go out as PEFT's ParamWrapper layout (the base's model type
    says the orientation): PEFT loads the folder and computes the same logits. The lorakit file keeps the model type
    it was read with, so the round trip needs no --base; a file without it, one line."""
    base, adapter, _, logits = build(tmp_path, kind)
    lorakit.convert(adapter, tmp_path / "a.safetensors", to="lorakit", base=str(base))
    block = "feed_forward" if kind == "llama4" else "mlp"
    for out, extra in (("p", {"base": str(base)}), ("nobase", {})):
        lorakit.convert(tmp_path / "a.safetensors", tmp_path / out, to="peft", **extra)
        config = json.load(open(tmp_path / out / "adapter_config.json"))
        assert config["target_parameters"] == [f"{block}.experts.gate_up_proj", f"{block}.experts.down_proj"]
        with torch.no_grad():
            model = peft.PeftModel.from_pretrained(type(make(kind)).from_pretrained(base), tmp_path / out)
            got = model.eval()(IDS).logits
        assert torch.allclose(got, logits, atol=1e-6 * logits.abs().max()), (got - logits).abs().max()
    bare = lorakit.load(tmp_path / "a.safetensors")
    bare.provenance.pop("base_model_type")
    bare.save(tmp_path / "bare.safetensors")
    code, out, err = cli("convert", tmp_path / "bare.safetensors", "--to", "peft", "-o", tmp_path / "refused")
    assert_one_line_error(
        code, out, err, "bare.safetensors", "--base", f"model.layers.0.{block}.experts.down_proj.*"
    )


@pytest.mark.parametrize("kind", ["gpt_oss", "qwen3_5_moe"])
def test_vllm_3d_moe_models_get_the_3d_layout(tmp_path, kind):
    """vLLM loads the expert LoRAs of the models it marks is_3d_moe_weight (gpt-oss, Qwen3.5-MoE, ...) only as PEFT's
    >= 0.19.1 target_parameters layout: gate_up_proj the inner wrapper (`experts.base_layer.lora_*`), down_proj the
    outer, B's columns rank-major, every module at one rank (the adapter's 2: vLLM serves any up to max_lora_rank).
    PEFT loads it with the same logits."""
    from safetensors.torch import load_file

    base, adapter, _, logits = build(tmp_path, kind)
    report = lorakit.convert(adapter, tmp_path / "v", for_engine="vllm", base=str(base))
    config = json.load(open(tmp_path / "v" / "adapter_config.json"))
    assert config["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert config["r"] == 2 and not config["rank_pattern"] and not config["alpha_pattern"], report["notes"]
    keys = load_file(tmp_path / "v" / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.0.mlp.experts"
    E, hidden, ff = 4, 32, (24 if kind == "gpt_oss" else 16)
    assert keys[f"{prefix}.base_layer.lora_A.weight"].shape == (2 * E, hidden)
    assert keys[f"{prefix}.base_layer.lora_B.weight"].shape == (2 * ff, 2 * E)
    assert keys[f"{prefix}.lora_A.weight"].shape == (2 * E, ff)
    assert not any(".experts.0." in k for k in keys)
    with torch.no_grad():
        model = peft.PeftModel.from_pretrained(type(make(kind)).from_pretrained(base), tmp_path / "v")
        got = model.eval()(IDS).logits
    assert torch.allclose(got, logits, atol=1e-5 * logits.abs().max()), (got - logits).abs().max()


@pytest.mark.parametrize("kind", ["gpt_oss", "llama4", "qwen3_moe"])
def test_extract_an_expert_lora_per_expert(tmp_path, kind):
    """extract from a base and its PEFT-merged MoE: one LoRA per expert (rows of a fused 3-D tensor, or the
    per-expert tensors), named as the merge names them, nothing replaced; merged back it gives PEFT's checkpoint."""
    base, _, peft_merged, _ = build(tmp_path, kind)
    report = lorakit.extract(base, peft_merged, tmp_path / "x.safetensors", rank=2, quiet=True)
    assert report["replaced"] == [] and report["module_count"] == 2 * (
        2 + 4 * (2 if kind != "qwen3_moe" else 3)
    )
    assert report["mean_energy_kept"] > 1 - 1e-9  # every expert's delta is rank 2: exact
    names = set(lorakit.load(tmp_path / "x.safetensors").modules)
    block = "feed_forward" if kind == "llama4" else "mlp"
    assert (
        f"model.layers.1.{block}.experts.gate_up_proj.3" in names
        if kind != "qwen3_moe"
        else "model.layers.1.mlp.experts.3.up_proj" in names
    )
    lorakit.merge(base, [tmp_path / "x.safetensors"], tmp_path / "out", quiet=True)
    got, want, before = open_base(tmp_path / "out"), open_base(peft_merged), open_base(base)
    for name in want.shapes():  # within fp32 rounding of the delta (tuned - base is taken in fp32)
        delta = want.get(name).double() - before.get(name).double()
        error = float((got.get(name).double() - want.get(name).double()).norm())
        assert error <= 1e-5 * max(float(delta.norm()), 1e-30), (name, error)


def test_gpt_oss_expert_lora_into_llama_cpp_layout(tmp_path):
    """gpt-oss's fused gate_up_proj interleaves gate's and up's columns (transformers: gate_up[..., ::2] and
    [..., 1::2]); llama.cpp's convert_hf_to_gguf splits it so into blk.N.ffn_gate_exps / ffn_up_exps [E, I, H] (checked
    against the real converter in benchmarks/check_llama_cpp_moe.py). A PEFT target_parameters LoRA merged into such
    a GGUF moves each expert exactly as PEFT's merge_and_unload moves the fused tensor."""
    import gguf
    import numpy as np

    base, adapter, peft_merged, _ = build(tmp_path, "gpt_oss")
    src, out = open_base(base), open_base(peft_merged)

    def llama_cpp_layout(tensors):  # {gguf name: [E, rows, cols]} as convert_hf_to_gguf writes gpt-oss
        layers = {}
        for i in range(2):
            gate_up, down = (
                tensors(f"model.layers.{i}.mlp.experts.gate_up_proj"),
                tensors(f"model.layers.{i}.mlp.experts.down_proj"),
            )
            layers[f"blk.{i}.ffn_gate_exps.weight"] = gate_up[:, :, 0::2].transpose(1, 2)
            layers[f"blk.{i}.ffn_up_exps.weight"] = gate_up[:, :, 1::2].transpose(1, 2)
            layers[f"blk.{i}.ffn_down_exps.weight"] = down.transpose(1, 2)
        return layers

    before = llama_cpp_layout(lambda n: src.get(n).float())
    w = gguf.GGUFWriter(os.fspath(tmp_path / "moe.gguf"), "gpt-oss")
    w.add_block_count(2)
    w.add_expert_count(4)
    for name, t in before.items():
        w.add_tensor(name, t.contiguous().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert open_base(tmp_path / "moe.gguf").model_type == "gpt_oss"
    lorakit.merge(tmp_path / "moe.gguf", [adapter], tmp_path / "out.gguf", quiet=True, skip_unmatched=True)
    after = {t.name: np.array(t.data) for t in gguf.GGUFReader(tmp_path / "out.gguf").tensors}
    want = llama_cpp_layout(lambda n: out.get(n).float())
    for name in before:
        delta, expected = after[name] - before[name].numpy(), (want[name] - before[name]).numpy()
        assert np.abs(delta - expected).max() <= 1e-5 * np.abs(expected).max(), name
