"""compressed-tensors checkpoints made by the real llm-compressor (tests/data/compressed, tests/fixtures/
make_compressed.py) and NVFP4 in ModelOpt's layout: lorakit's dequantization equals compressed-tensors' own bit for
bit; a merge keeps the format, leaves modules without a delta byte for byte, and loads in transformers with the
weights lorakit reads; hostile variants are refused with one line naming the file and the tensor."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.bases import open_base
from lorakit.core import Adapter, Module

DATA = os.path.join(os.path.dirname(__file__), "data", "compressed")
SCHEMES = {  # fixture -> the lorakit format that reads it
    "w4a16": "ct-int",
    "w4a16-asym-actorder": "ct-int",
    "w8a16": "ct-int",
    "w8a16-channel": "ct-int",
    "fp8-block": "fp8-block",
    "nvfp4a16": "nvfp4",
    "mxfp8a16": "mxfp8",
}
LAYERS = [f"model.layers.{i}" for i in range(2)]
TARGETS = ["self_attn.q_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.down_proj"]


def decompressed(folder):
    """{module: W} as compressed-tensors decompresses each module (its registered compressor, the config's scheme)."""
    from compressed_tensors.compressors.base import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    q = json.load(open(os.path.join(folder, "config.json")))["quantization_config"]
    group = q["config_groups"]["group_0"]
    scheme = QuantizationScheme.model_validate({k: v for k, v in group.items() if k != "format"})
    compressor = BaseCompressor.get_value_from_registry(group.get("format") or q["format"])
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    stems = {n.rsplit(".", 1)[0] for n in tensors if n.endswith(".weight_scale")}
    return {
        s: compressor.decompress(
            {n[len(s) + 1 :]: t for n, t in tensors.items() if n.startswith(s + ".")}, scheme
        )["weight"]
        for s in stems
    }


@pytest.mark.parametrize("scheme", SCHEMES)
def test_dequantize_matches_compressed_tensors_bit_for_bit(scheme):
    folder = os.path.join(DATA, scheme)
    view = open_base(folder).view
    assert view.handler.name == SCHEMES[scheme]
    reference = decompressed(folder)
    assert len(reference) == 14 and set(view.quantized) == {f"{s}.weight" for s in reference}
    for stem, W in reference.items():
        ours = view.get(f"{stem}.weight").to(W.dtype)
        assert torch.equal(ours.view(torch.int16), W.view(torch.int16)), stem


def adapter(std, seed=0, targets=TARGETS, rank=8):
    """A LoRA on the fixtures' modules with factors drawn from N(0, std)."""
    g = torch.Generator().manual_seed(seed)
    ad = Adapter()
    shapes = {"self_attn.q_proj": (256, 256), "self_attn.v_proj": (128, 256), "mlp.gate_proj": (384, 256)}
    shapes["mlp.down_proj"] = (256, 384)
    for layer in LAYERS:
        for t in targets:
            out, inn = shapes[t]
            A, B = torch.randn(rank, inn, generator=g) * std, torch.randn(out, rank, generator=g) * std
            ad.add(Module(f"{layer}.{t}", A, B, alpha=2 * rank))
    return ad


def load_in_transformers(folder):
    import transformers
    from transformers import CompressedTensorsConfig

    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=CompressedTensorsConfig(run_compressed=False), dtype=torch.bfloat16
    ).eval()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_merge_keeps_the_format_and_loads_in_transformers(tmp_path, scheme):
    base = os.path.join(DATA, scheme)
    ad = adapter(0.05)  # ||dW|| near the int4 step: a delta every format can hold in part
    ad.save(tmp_path / "a.safetensors")
    result = lorakit.merge(base, [str(tmp_path / "a.safetensors")], tmp_path / "merged", quiet=True)
    before, after = (
        load_file(f"{base}/model.safetensors"),
        load_file(tmp_path / "merged" / "model.safetensors"),
    )
    assert {n: (t.dtype, t.shape) for n, t in before.items()} == {
        n: (t.dtype, t.shape) for n, t in after.items()
    }
    config = json.load(open(tmp_path / "merged" / "config.json"))
    assert config["quantization_config"] == json.load(open(f"{base}/config.json"))["quantization_config"]
    for n, t in before.items():  # modules without a delta (k_proj, o_proj, up_proj): their bytes
        if ".k_proj." in n or ".o_proj." in n or ".up_proj." in n or "lm_head" in n:
            assert torch.equal(raw(t), raw(after[n])), n
    assert result["quantization"]["format"] == SCHEMES[scheme]
    # the merged model moved toward W + dW, in fp64: every targeted module closer than the base's codes
    old, new = open_base(base).view, open_base(tmp_path / "merged").view
    for name, m in ad.modules.items():
        target = old.get(f"{name}.weight").double() + m.delta(torch.float64)
        kept = (old.get(f"{name}.weight").double() - target).norm()
        assert (new.get(f"{name}.weight").double() - target).norm() < 0.5 * kept, name
    # transformers reads the merged checkpoint with the weights lorakit reads, and computes their logits
    model = load_in_transformers(tmp_path / "merged")
    state = model.state_dict()
    for name in new.quantized:
        assert torch.equal(state[name], new.get(name).to(torch.bfloat16)), name
    plain = plain_llama(tmp_path / "merged", {n: new.get(n) for n in new.names})
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(ids).logits.float() - plain(ids).logits.float()).abs().max() <= 2e-3  # bf16 kernels'


def plain_llama(folder, tensors):
    """transformers' Llama of `folder`'s config without its quantization, holding `tensors` in bf16."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    del config.quantization_config
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    model.load_state_dict({n: t.to(torch.bfloat16) for n, t in tensors.items()}, strict=True)
    return model


@pytest.mark.parametrize("scheme", ["w4a16-asym-actorder", "nvfp4a16", "mxfp8a16", "fp8-block"])
@pytest.mark.parametrize("strategy", ["same-grid", "feedback", "stochastic", "rescale", "refit"])
def test_every_strategy_writes_what_compressed_tensors_decompresses(tmp_path, scheme, strategy):
    base = os.path.join(DATA, scheme)
    adapter(0.05).save(tmp_path / "a.safetensors")
    lorakit.merge(base, [str(tmp_path / "a.safetensors")], tmp_path / "m", strategy=strategy, quiet=True)
    view = open_base(tmp_path / "m").view
    for stem, W in decompressed(tmp_path / "m").items():
        assert torch.equal(view.get(f"{stem}.weight").to(W.dtype).view(torch.int16), W.view(torch.int16)), (
            stem
        )


def test_merge_to_a_dtype_drops_the_quantization(tmp_path):
    import transformers

    ad = adapter(0.02)
    ad.save(tmp_path / "a.safetensors")
    base = os.path.join(DATA, "nvfp4a16")
    lorakit.merge(base, [str(tmp_path / "a.safetensors")], tmp_path / "out", dtype="bf16", quiet=True)
    assert "quantization_config" not in json.load(open(tmp_path / "out" / "config.json"))
    assert not os.path.exists(tmp_path / "out" / "recipe.yaml")  # llm-compressor's, stale on a bf16 output
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    old = open_base(base).view
    for (
        name,
        m,
    ) in ad.modules.items():  # W_deq + dW in fp32, rounded once to bf16: within one bf16 step of fp64's
        expected = (old.get(f"{name}.weight").double() + m.delta(torch.float64)).to(torch.bfloat16)
        ours = model.state_dict()[f"{name}.weight"].to(torch.bfloat16)
        steps = (ours.view(torch.int16).int() - expected.view(torch.int16).int()).abs()
        assert int(steps.max()) <= 1 and float((steps > 0).float().mean()) < 0.01, name


def test_g_idx_of_older_files_groups_the_columns(tmp_path):
    """Activation-ordered files (weight_g_idx, before llm-compressor 0.14 dropped it): column j uses group g[j]."""
    folder = copy(tmp_path, "w4a16")
    tensors = load_file(folder / "model.safetensors")
    stem = "model.layers.0.self_attn.k_proj"
    g = torch.randperm(256, generator=torch.Generator().manual_seed(0)) % 2
    tensors[f"{stem}.weight_g_idx"] = g.to(torch.int32)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    W = open_base(folder).view.get(f"{stem}.weight").double()
    packed = tensors[f"{stem}.weight_packed"].view(torch.uint8).reshape(128, -1)  # little-endian words
    q = torch.stack([packed & 15, packed >> 4], -1).reshape(128, 256).double() - 8
    expected = q * tensors[f"{stem}.weight_scale"].double()[:, g.long()]
    assert torch.equal(W, expected)


def modelopt_nvfp4(tmp_path, padded=False):
    """The compressed-tensors NVFP4 fixture rewritten in ModelOpt's layout (weight, weight_scale, weight_scale_2 =
    1 / global scale: the same weights where the division is exact), hf_quant_config.json beside config.json."""
    folder = copy(tmp_path, "nvfp4a16")
    tensors, out = load_file(folder / "model.safetensors"), {}
    for n, t in tensors.items():
        if n.endswith(".weight_packed"):
            out[n.replace(".weight_packed", ".weight")] = t
        elif n.endswith(".weight_global_scale"):
            out[n.replace("weight_global_scale", "weight_scale_2")] = torch.tensor(0.5)
            out[n.replace("weight_global_scale", "input_scale")] = torch.tensor(1.0)
        elif n.endswith(".weight_scale") and padded:
            out[n] = torch.nn.functional.pad(t.float(), (0, 4, 0, 128)).to(torch.float8_e4m3fn)
        else:
            out[n] = t
    save_file(out, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.load(open(folder / "config.json"))
    config.pop("quantization_config")
    json.dump(config, open(folder / "config.json", "w"))
    quant = {"quant_algo": "NVFP4", "group_size": 16, "exclude_modules": ["lm_head"]}
    json.dump(
        {"producer": {"name": "modelopt"}, "quantization": quant}, open(folder / "hf_quant_config.json", "w")
    )
    return folder, out


@pytest.mark.parametrize("padded", [False, True])
def test_modelopt_nvfp4_reads_and_merges(tmp_path, padded):
    folder, tensors = modelopt_nvfp4(tmp_path, padded)
    view = open_base(folder).view
    assert view.handler.name == "nvfp4" and len(view.quantized) == 14
    stem = "model.layers.1.mlp.up_proj"
    codes = torch.stack([tensors[f"{stem}.weight"] & 15, tensors[f"{stem}.weight"] >> 4], -1).reshape(
        384, 256
    )
    values = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])[codes.long()]
    scale = tensors[f"{stem}.weight_scale"][:384, :16].float().repeat_interleave(16, 1) * 0.5
    assert torch.equal(view.get(f"{stem}.weight"), values * scale)
    ad = adapter(0.02)
    ad.save(tmp_path / "a.safetensors")
    lorakit.merge(folder, [str(tmp_path / "a.safetensors")], tmp_path / "merged", quiet=True)
    after = load_file(tmp_path / "merged" / "model.safetensors")
    assert {n: (t.dtype, t.shape) for n, t in tensors.items()} == {
        n: (t.dtype, t.shape) for n, t in after.items()
    }
    assert os.path.isfile(tmp_path / "merged" / "hf_quant_config.json")
    for n in tensors:  # the per-tensor scales and the activation scales as they were
        if n.endswith(("weight_scale_2", "input_scale")):
            assert torch.equal(tensors[n], after[n])
    lorakit.merge(folder, [str(tmp_path / "a.safetensors")], tmp_path / "dense", dtype="bf16", quiet=True)
    assert not os.path.exists(tmp_path / "dense" / "hf_quant_config.json")


def raw(t):
    return t.contiguous().reshape(-1).view(torch.uint8)


def copy(tmp_path, scheme):
    folder = tmp_path / scheme
    shutil.copytree(os.path.join(DATA, scheme), folder)
    return folder


def rewrite(folder, change):
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


STEM = "model.layers.0.self_attn.q_proj"
HOSTILE = {
    "scale of the wrong shape": (
        "w4a16",
        lambda t: t.update({f"{STEM}.weight_scale": t[f"{STEM}.weight_scale"][:, :1].repeat(1, 3)}),
        "weight_scale has shape [256, 3]",
    ),
    "packed width against weight_shape": (
        "w4a16",
        lambda t: t.update({f"{STEM}.weight_shape": torch.tensor([256, 512])}),
        "weight_packed has shape [256, 32]",
    ),
    "g_idx out of range": (
        "w4a16",
        lambda t: t.update({f"{STEM}.weight_g_idx": torch.full((256,), 7, dtype=torch.int32)}),
        "weight_g_idx holds groups outside 0..1",
    ),
    "zero points of the wrong shape": (
        "w4a16-asym-actorder",
        lambda t: t.update({f"{STEM}.weight_zero_point": t[f"{STEM}.weight_zero_point"][:8]}),
        "weight_zero_point has shape [8, 2]",
    ),
    "global scale 0": (
        "nvfp4a16",
        lambda t: t.update({f"{STEM}.weight_global_scale": torch.zeros(1)}),
        "weight_global_scale is 0.0",
    ),
    "global scale NaN": (
        "nvfp4a16",
        lambda t: t.update({f"{STEM}.weight_global_scale": torch.full((1,), float("nan"))}),
        "weight_global_scale is nan",
    ),
    "global scale inf": (
        "nvfp4a16",
        lambda t: t.update({f"{STEM}.weight_global_scale": torch.full((1,), float("inf"))}),
        "weight_global_scale is inf",
    ),
    "NVFP4 scale of the wrong shape": (
        "nvfp4a16",
        lambda t: t.update({f"{STEM}.weight_scale": t[f"{STEM}.weight_scale"][:, :8].contiguous()}),
        "weight_scale has shape [256, 8]",
    ),
    "MXFP8 scale of the wrong shape": (
        "mxfp8a16",
        lambda t: t.update({f"{STEM}.weight_scale": t[f"{STEM}.weight_scale"][:, :4].contiguous()}),
        "weight_scale has shape [256, 4]",
    ),
    "FP8 block scale of the wrong shape": (
        "fp8-block",
        lambda t: t.update({f"{STEM}.weight_scale": t[f"{STEM}.weight_scale"].repeat(2, 1)}),
        "weight_scale has shape [4, 2]",
    ),
    "NVFP4 module without its global scale": (
        "nvfp4a16",
        lambda t: t.pop(f"{STEM}.weight_global_scale"),
        "belongs to no complete nvfp4 module",
    ),
    "packed ints with integer scales": (
        "w8a16",
        lambda t: t.update({f"{STEM}.weight_scale": t[f"{STEM}.weight_scale"].to(torch.uint8)}),
        "weight_scale is U8: expected F32 or BF16 or F16",
    ),
    "FP8 blocks with integer scales": (
        "fp8-block",
        lambda t: t.update({f"{STEM}.weight_scale": t[f"{STEM}.weight_scale"].to(torch.int32)}),
        "weight_scale is I32: expected F32 or BF16 or F16",
    ),
    "MXFP8 weight stored bf16 beside its E8M0 scale": (
        "mxfp8a16",
        lambda t: t.update({f"{STEM}.weight": t[f"{STEM}.weight"].to(torch.bfloat16)}),
        "belongs to no complete mxfp8 module",
    ),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_variants_are_refused_with_one_line(tmp_path, cli, case):
    scheme, change, message = HOSTILE[case]
    folder = copy(tmp_path, scheme)
    rewrite(folder, change)
    adapter(0.02).save(tmp_path / "a.safetensors")
    code, out, err = cli("merge", folder, tmp_path / "a.safetensors", "-o", tmp_path / "out")
    assert_refused(code, err, message, "model.safetensors")
    assert not os.path.exists(tmp_path / "out")


def test_an_ignore_list_naming_missing_modules_is_refused(tmp_path, cli):
    folder = copy(tmp_path, "w4a16")
    config = json.load(open(folder / "config.json"))
    config["quantization_config"]["ignore"] = ["lm_head", "model.layers.0.mlp.shared_expert"]
    json.dump(config, open(folder / "config.json", "w"))
    adapter(0.02).save(tmp_path / "a.safetensors")
    code, out, err = cli("merge", folder, tmp_path / "a.safetensors", "-o", tmp_path / "out")
    assert_refused(
        code, err, "ignores 'model.layers.0.mlp.shared_expert', which the checkpoint does not have"
    )
    assert not os.path.exists(tmp_path / "out")


def assert_refused(code, err, *fragments):
    lines = [line for line in err.splitlines() if line.startswith("lorakit:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in lines[0], (f, lines[0])


@pytest.mark.parametrize("scheme", SCHEMES)
def test_training_keeps_the_codes_and_learns_as_the_dequantized_weights(tmp_path, scheme):
    from lorakit.training import frozen
    from lorakit.training.model import LlamaForCausalLM

    folder = os.path.join(DATA, scheme)
    model, view = LlamaForCausalLM.from_pretrained(folder), open_base(folder).view
    layers = {n: m for n, m in model.named_modules() if isinstance(m, frozen.FrozenLinear)}
    assert len(layers) == 14
    bits = 8 if scheme in ("w8a16", "w8a16-channel", "fp8-block", "mxfp8a16") else 4
    for (
        name,
        layer,
    ) in layers.items():  # the codes, not fp32 weights: a byte a weight at most, half for 4 bits
        assert torch.equal(layer.dequantize(), view.get(name + ".weight")), name
        table = sum(t.numel() * t.element_size() for t in (layer.table, layer.lut) if t is not None)
        per_weight = (layer.stored_bytes() - table) / (layer.out_features * layer.in_features)
        assert per_weight <= (0.75 if bits == 4 else 1.25), (name, per_weight)
    dense = tmp_path / "dense"  # the same weights dequantized, in fp32
    lorakit.merge(folder, [], dense, dtype="fp32", quiet=True)
    words = " ".join(
        f"t{i}" for i in torch.randint(0, 320, (3000,), generator=torch.Generator().manual_seed(0))
    )
    (tmp_path / "data.txt").write_text(words)
    args = dict(
        rank=4, alpha=8, steps=4, lr=3e-3, batch=4, seq_len=32, eval_every=0, quiet=True, dtype="float32"
    )
    a = lorakit.train(folder, tmp_path / "data.txt", tmp_path / "a.safetensors", **args)
    b = lorakit.train(dense, tmp_path / "data.txt", tmp_path / "b.safetensors", **args)
    assert a["base_codes"]["format"] == SCHEMES[scheme]
    rel = torch.tensor(a["losses"]).sub(torch.tensor(b["losses"])).abs().div(torch.tensor(b["losses"]))
    assert float(rel.max()) <= 1e-5


def test_moe_experts_merge_per_expert(tmp_path):
    """Qwen3-MoE quantized to NVFP4 by llm-compressor stores each expert's gate / up / down on its own; a PEFT LoRA on
    transformers' fused expert tensors (target_parameters) merges into each expert's codes. The reference is PEFT on
    the dequantized weights (transformers 5.25 misreads these experts when it decompresses them itself)."""
    import peft
    import transformers

    base = os.path.join(DATA, "nvfp4a16-moe")
    reference = decompressed(base)
    view = open_base(base).view
    assert len(reference) == 2 * (4 * 3 + 4) and view.handler.name == "nvfp4"
    for stem, W in reference.items():
        assert torch.equal(view.get(f"{stem}.weight").to(W.dtype).view(torch.int16), W.view(torch.int16)), (
            stem
        )
    lorakit.merge(base, [], tmp_path / "dense", dtype="fp32", quiet=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32).eval()
    experts = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], target_parameters=experts
    )
    pm = peft.get_peft_model(model, config).eval()
    g = torch.Generator().manual_seed(0)
    for name, p in pm.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.1  # merged: 0.20x the logit error of no adapter
    pm.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(0, 320, (2, 16), generator=g)
    lorakit.merge(base, [str(tmp_path / "adapter")], tmp_path / "merged", quiet=True)
    lorakit.merge(tmp_path / "merged", [], tmp_path / "merged32", dtype="fp32", quiet=True)
    merged = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "merged32", dtype=torch.float32
    ).eval()
    with torch.no_grad():
        runtime = pm(ids).logits
        with pm.disable_adapter():
            unmerged = (pm(ids).logits - runtime).abs().max()
        error = (merged(ids).logits - runtime).abs().max()
    assert error < 0.5 * unmerged, (float(error), float(unmerged))
    before, after = (
        load_file(f"{base}/model.safetensors"),
        load_file(tmp_path / "merged" / "model.safetensors"),
    )
    changed = {
        n.rsplit(".", 1)[0]
        for n in before
        if n.endswith("weight_packed") and not torch.equal(before[n], after[n])
    }
    assert len(changed) == 2 * (4 * 3 + 2)  # every expert's three projections, q and v
    for n in before:
        if n.endswith("weight_global_scale"):  # kept: an expert's gate and up stay on one per-tensor scale
            assert torch.equal(before[n], after[n]), n


def test_quantize_nvfp4_on_load_is_compressed_tensors_recipe():
    """train --quantize nvfp4: the codes and scales compressed-tensors' own NVFP4 recipe (generate_gparam,
    calculate_qparams, NVFP4PackedCompressor) makes of the same weight, byte for byte, and its dequantization."""
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

    from lorakit.training import frozen

    W = torch.randn(96, 256, generator=torch.Generator().manual_seed(0)) * 0.02
    args = QuantizationArgs(
        num_bits=4, type="float", strategy="tensor_group", group_size=16, scale_dtype=torch.float8_e4m3fn
    )
    global_scale = generate_gparam(W.min(), W.max())
    groups = W.reshape(96, -1, 16)
    scale, _ = calculate_qparams(groups.amin(-1), groups.amax(-1), args, global_scale=global_scale)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    state = {"weight": W, "weight_scale": scale, "weight_global_scale": global_scale}
    packed = NVFP4PackedCompressor.compress(state, scheme)
    ours = frozen.quantize(W, "nvfp4")
    codes = torch.stack([packed["weight_packed"] & 15, packed["weight_packed"] >> 4], -1).reshape(96, 256)
    assert torch.equal(ours.codes, codes)
    assert torch.equal(ours.grid.S.T, packed["weight_scale"].float() / global_scale)
    theirs = NVFP4PackedCompressor.decompress(packed, scheme)["weight"]
    assert torch.equal(ours.dequantize().to(torch.bfloat16).view(torch.int16), theirs.view(torch.int16))


def test_quantize_fp8_block_on_load_is_compressed_tensors_recipe():
    """train --quantize fp8-block: compressed-tensors' FP8_BLOCK (128 x 128, scale max / 448) on a weight whose
    sides are not whole blocks."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    from lorakit.training import frozen

    W = torch.randn(200, 320, generator=torch.Generator().manual_seed(1)) * 0.02
    args = QuantizationArgs(num_bits=8, type="float", strategy="block", block_structure=[128, 128])
    padded = torch.nn.functional.pad(W, (0, 64, 0, 56)).reshape(2, 128, 3, 128)
    scale, zero = calculate_qparams(padded.amin((1, 3)), padded.amax((1, 3)), args)
    codes = quantize(W, scale, zero, args, dtype=torch.float8_e4m3fn)
    ours = frozen.quantize(W, "fp8-block")
    assert torch.equal(ours.codes.view(torch.uint8), codes.view(torch.uint8))
    assert torch.equal(ours.dequantize(), dequantize(codes, scale, zero, args, dtype=torch.float32))


def test_modelopt_export_reads_as_modelopt_dequantizes_and_merges(tmp_path):
    """NVIDIA ModelOpt 0.47's own NVFP4 export (NVFP4_DEFAULT_CFG, export_hf_checkpoint, on the CPU: tests/fixtures/
    make_modelopt.py): lorakit reads every weight as ModelOpt's NVFP4QTensor dequantizes it (its table has one zero,
    so -0 codes read as +0 there: equal values), and a merge keeps ModelOpt's layout and configs."""
    folder = os.path.join(DATA, "modelopt-nvfp4")
    reference = load_file(os.path.join(DATA, "modelopt-nvfp4-dequantized.safetensors"))
    view = open_base(folder).view
    assert view.handler.name == "nvfp4" and view.handler.layout == "modelopt"
    assert sorted(view.quantized) == sorted(reference)
    for name, W in reference.items():
        assert torch.equal(view.get(name).to(W.dtype), W), name
    ad = adapter(0.05)
    ad.save(tmp_path / "a.safetensors")
    lorakit.merge(folder, [str(tmp_path / "a.safetensors")], tmp_path / "m", quiet=True)
    before, after = load_file(f"{folder}/model.safetensors"), load_file(tmp_path / "m" / "model.safetensors")
    assert {n: (t.dtype, t.shape) for n, t in before.items()} == {
        n: (t.dtype, t.shape) for n, t in after.items()
    }
    for n in before:  # per-tensor and activation scales as they were; modules without a delta byte for byte
        if n.endswith(("weight_scale_2", "input_scale")) or ".k_proj." in n or ".up_proj." in n:
            assert torch.equal(raw(before[n]), raw(after[n])), n
    for f in ("config.json", "hf_quant_config.json"):
        assert json.load(open(tmp_path / "m" / f)) == json.load(open(os.path.join(folder, f)))
    old, new = open_base(folder).view, open_base(tmp_path / "m").view
    for name, m in ad.modules.items():
        target = old.get(f"{name}.weight").double() + m.delta(torch.float64)
        kept = (old.get(f"{name}.weight").double() - target).norm()
        assert (new.get(f"{name}.weight").double() - target).norm() < 0.5 * kept, name
    lorakit.merge(folder, [str(tmp_path / "a.safetensors")], tmp_path / "d", dtype="bf16", quiet=True)
    assert not os.path.exists(tmp_path / "d" / "hf_quant_config.json")
    assert "quantization_config" not in json.load(open(tmp_path / "d" / "config.json"))


def group_0(config):
    return config["quantization_config"]["config_groups"]["group_0"]


def said(**weights):
    """A change of the first config group's weights arguments."""
    return lambda c: group_0(c)["weights"].update(**weights)


HOSTILE_CONFIGS = {
    "config_groups a list": (
        "w4a16",
        lambda c: c["quantization_config"].update(config_groups=[1]),
        "config_groups is not a JSON object",
    ),
    "weights a number": ("w4a16", lambda c: group_0(c).update(weights=5), "weights is not a JSON object"),
    "num_bits a word": (
        "w4a16",
        lambda c: group_0(c)["weights"].update(num_bits="four"),
        "num_bits is 'four': expected a positive integer",
    ),
    "3 bits": ("w4a16", lambda c: group_0(c)["weights"].update(num_bits=3), "with 3 bits is not supported"),
    "an unknown format": (
        "w4a16",
        lambda c: group_0(c).update(format="marlin-24"),
        "compressed-tensors format 'marlin-24' is not supported",
    ),
    "ignore a string": (
        "w4a16",
        lambda c: c["quantization_config"].update(ignore="lm_head"),
        "ignore is 'lm_head': expected a list of module names",
    ),
    "NVFP4 groups of 32": (
        "nvfp4a16",
        lambda c: group_0(c)["weights"].update(group_size=32),
        "NVFP4 with groups of 32 is not supported",
    ),
    "block_structure of zero rows": (
        "fp8-block",
        lambda c: group_0(c)["weights"].update(block_structure=[0, 128]),
        "block_structure is [0, 128]: expected [rows, columns], positive integers",
    ),
    "ModelOpt group_size a word": (
        "modelopt-nvfp4",
        lambda c: c["quantization_config"].update(group_size="x"),
        "ModelOpt NVFP4 with groups of 'x' is not supported",
    ),
    # a config that contradicts the tensors: an engine reads the config, so the file is refused, not read from its
    # tensors alone (found by fuzzing the fixtures: each merged with exit 0 before)
    **{
        case: (scheme, said(**weights), message)
        for case, (scheme, weights, message) in {
            "NVFP4 of 2 bits": ("nvfp4a16", dict(num_bits=2), "num_bits is 2: nvfp4"),
            "NVFP4 of integers": ("nvfp4a16", dict(type="int"), "type is 'int'"),
            "NVFP4 per tensor": ("nvfp4a16", dict(strategy="tensor"), "take tensor_group"),
            "ints of floats": ("w8a16", dict(type="float"), "type is 'float'"),
            "ints per tensor group": ("w8a16", dict(strategy="tensor_group"), "'tensor_group'"),
            "groups said channel": ("w4a16", dict(strategy="channel"), "strategy channel has 1"),
            "group_size vs scales": ("w4a16", dict(group_size=16), "group_size 16 makes"),
            "asym, no zero points": ("w4a16", dict(symmetric=False), "weight_zero_point is missing"),
            "sym, zero points": ("w4a16-asym-actorder", dict(symmetric=True), "zero_point is stored"),
            "blocks said channel": ("fp8-block", dict(strategy="channel"), "beside a block_structure"),
            "MXFP8 of 4 bits": ("mxfp8a16", dict(num_bits=4), "num_bits is 4: mxfp8"),
        }.items()
    },
}


@pytest.mark.parametrize("case", HOSTILE_CONFIGS)
def test_hostile_quantization_configs_are_refused_with_one_line(tmp_path, cli, case):
    scheme, change, message = HOSTILE_CONFIGS[case]
    folder = copy(tmp_path, scheme)
    config = json.load(open(folder / "config.json"))
    change(config)
    json.dump(config, open(folder / "config.json", "w"))
    adapter(0.02).save(tmp_path / "a.safetensors")
    code, out, err = cli("merge", folder, tmp_path / "a.safetensors", "-o", tmp_path / "out")
    assert_refused(code, err, message)
    assert not os.path.exists(tmp_path / "out")
