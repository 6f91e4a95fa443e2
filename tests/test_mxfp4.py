"""gpt-oss' MXFP4 experts (`*_blocks` U8 [E, rows, cols/32, 16], `*_scales` U8 E8M0 [E, rows, cols/32]): read as
transformers dequantizes them, merged kept MXFP4 (transformers loads the output), blocks without a delta
bit-identical, dequantized output equal to PEFT's merge_and_unload."""

import json

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

import lorakit
from lorakit.bases import open_base
from lorakit.core import Adapter, Module
from lorakit.spec import fingerprint

from test_moe import GPT_OSS, IDS, assert_same_checkpoint

FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
EXPERTS = ("gate_up_proj", "down_proj")


def ocp_quantize(W):
    """The OCP MX recipe, written here independently of lorakit: W [E, in, out] as gpt-oss' bf16 checkpoints store it
    -> blocks of its rows [E, out, in]; shared exponent floor(log2 amax) - 2, nearest FP4 (clipped to 6), -0 kept."""
    R = W.transpose(1, 2).float()
    E, rows, cols = R.shape
    b = R.reshape(E, rows, cols // 32, 32)
    e = torch.floor(torch.log2(b.abs().amax(-1).clamp(min=2.0**-126))) - 2
    u = b / torch.ldexp(torch.ones_like(e), e.int())[..., None]
    codes = (u[..., None] - FP4).abs().argmin(-1)
    codes = torch.where((u < 0) & (FP4[codes] == 0), 8, codes).to(torch.uint8)
    pairs = codes.reshape(E, rows, cols // 32, 16, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous(), (e + 127).to(torch.uint8).contiguous()


def mxfp4_base(tmp_path):
    """(bf16-layout folder, MXFP4 folder) of one tiny gpt-oss (hidden 32, intermediate 64: one and two blocks)."""
    torch.manual_seed(0)
    GPT_OSS(64).eval().save_pretrained(tmp_path / "fp")
    sd, out = load_file(tmp_path / "fp" / "model.safetensors"), {}
    for k, v in sd.items():
        if k.endswith(EXPERTS):
            out[k + "_blocks"], out[k + "_scales"] = ocp_quantize(v)
        else:
            out[k] = v
    (tmp_path / "mx").mkdir()
    save_file(out, tmp_path / "mx" / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "fp" / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn"],
    }
    (tmp_path / "mx" / "config.json").write_text(json.dumps(config))
    return tmp_path / "fp", tmp_path / "mx"


def load(folder):
    return transformers.GptOssForCausalLM.from_pretrained(folder).eval()  # MXFP4 on a CPU: dequantized


def kl(p_logits, q_logits):
    p, q = torch.log_softmax(p_logits.double(), -1), torch.log_softmax(q_logits.double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def peft_adapter(tmp_path, base, scale):
    model = peft.get_peft_model(
        load(base),
        peft.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj"], target_parameters=list(EXPERTS)),
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.copy_(torch.randn(p.shape, generator=g) * scale)
        logits = model(IDS).logits
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", model, logits


def test_mxfp4_reads_as_transformers_dequantizes_it(tmp_path):
    fp, mx = mxfp4_base(tmp_path)
    base, stored = open_base(mx), load_file(mx / "model.safetensors")
    assert base.view.handler.name == "mxfp4" and len(base.view.quantized) == 4
    for name in (f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in EXPERTS):
        want = convert_moe_packed_tensors(
            stored[name + "_blocks"], stored[name + "_scales"], dtype=torch.float32
        )
        assert torch.equal(base.get(name), want), name
    # the names and shapes of the bf16 copy: an adapter made for one fits the other
    assert fingerprint(base.shapes()) == fingerprint(open_base(fp).shapes())


@pytest.mark.parametrize("strategy", ["auto", "stochastic"])
def test_expert_lora_merges_into_mxfp4_kept_mxfp4(tmp_path, strategy):
    """The output is MXFP4 in the stored names, shapes and dtypes; transformers loads it, and its logits are closer
    to the model with its adapter than the base's; every element within one grid step of W + dW (rescale: no
    clipping, so within half the widest gap, one step)."""
    _, mx = mxfp4_base(tmp_path)
    adapter, model, logits = peft_adapter(tmp_path, mx, 0.05)
    report = lorakit.merge(mx, [adapter], tmp_path / "out", quiet=True, strategy=strategy)
    assert report["quantization"]["format"] == "mxfp4" and len(report["quantization"]["modules"]) == 4
    before, after = load_file(mx / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert {k: (v.dtype, v.shape) for k, v in after.items()} == {
        k: (v.dtype, v.shape) for k, v in before.items()
    }
    with torch.no_grad():
        got, base_logits = load(tmp_path / "out")(IDS).logits, load(mx)(IDS).logits
    assert kl(logits, got) < 0.4 * kl(logits, base_logits), (kl(logits, got), kl(logits, base_logits))
    if strategy == "auto":  # rescale
        ad, merged, old = lorakit.load(adapter, base=str(mx)), open_base(tmp_path / "out"), open_base(mx)
        for name in (f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in EXPERTS):
            delta = torch.stack([ad.modules[f"{name}.{e}"].delta() for e in range(4)])
            scale = torch.ldexp(torch.ones(()), after[name + "_scales"].int() - 127)  # [E, out, blocks]
            step = scale.repeat_interleave(32, -1).transpose(1, 2)  # as the full tensor [E, in, out]
            assert ((merged.get(name) - old.get(name) - delta).abs() <= step).all(), name


def test_mxfp4_blocks_without_a_delta_are_bit_identical(tmp_path):
    """A LoRA on expert 1 of layer 0's gate_up_proj: every other expert's blocks and scales (their -0 codes too)
    and every other tensor come out byte for byte."""
    _, mx = mxfp4_base(tmp_path)
    name = "model.layers.0.mlp.experts.gate_up_proj"
    before = load_file(mx / "model.safetensors")
    nibbles = torch.stack([before[name + "_blocks"] & 15, before[name + "_blocks"] >> 4])
    assert (nibbles == 8).any()  # the base stores -0 codes
    g, ad = torch.Generator().manual_seed(0), Adapter()
    ad.add(
        Module(
            f"{name}.1", torch.randn(2, 128, generator=g) * 0.1, torch.randn(32, 2, generator=g) * 0.1, 2.0
        )
    )
    ad.save(tmp_path / "a.safetensors")
    for strategy in ("auto", "stochastic", "same-grid", "rescale", "refit"):
        lorakit.merge(
            mx, [tmp_path / "a.safetensors"], tmp_path / "out", quiet=True, strategy=strategy, force=True
        )
        after = load_file(tmp_path / "out" / "model.safetensors")
        for key in before:
            if key in (name + "_blocks", name + "_scales"):
                kept = [0, 2, 3]
                assert torch.equal(after[key][kept], before[key][kept]), (strategy, key)
                assert not torch.equal(after[key][1], before[key][1]) or key.endswith("_scales"), (
                    strategy,
                    key,
                )
            else:
                assert torch.equal(after[key], before[key]), (strategy, key)


def test_mxfp4_dequantized_output_is_peft_merge(tmp_path):
    """--dtype float32: the experts written full precision in gpt-oss' bf16 layout [E, in, out], equal to PEFT's
    merge_and_unload of the dequantized model, and the config no longer says MXFP4."""
    _, mx = mxfp4_base(tmp_path)
    adapter, model, logits = peft_adapter(tmp_path, mx, 0.05)
    model.merge_and_unload().save_pretrained(tmp_path / "peft_merged")
    lorakit.merge(mx, [adapter], tmp_path / "out", quiet=True, dtype="float32")
    assert_same_checkpoint(tmp_path / "out", tmp_path / "peft_merged")
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    with torch.no_grad():
        got = transformers.GptOssForCausalLM.from_pretrained(tmp_path / "out").eval()(IDS).logits
    assert torch.allclose(got, logits, atol=1e-5 * logits.abs().max())


def test_malformed_mxfp4_is_one_line_error(tmp_path, cli):
    """Scales that do not fit their blocks: one line naming the tensor, nothing written."""
    from conftest import assert_one_line_error

    _, mx = mxfp4_base(tmp_path)
    sd = load_file(mx / "model.safetensors")
    name = "model.layers.1.mlp.experts.down_proj_scales"
    sd[name] = sd[name][:, :, :1].contiguous()
    save_file(sd, mx / "model.safetensors")
    ad = Adapter()
    ad.add(Module("model.layers.0.self_attn.q_proj", torch.zeros(1, 32), torch.zeros(32, 1), 1.0))
    ad.save(tmp_path / "a.safetensors")
    code, out, err = cli("merge", mx, tmp_path / "a.safetensors", "-o", tmp_path / "out")
    assert_one_line_error(
        code, out, err, "model.layers.1.mlp.experts.down_proj_blocks", "[E, rows, cols/32, 16]"
    )
    assert not (tmp_path / "out").exists()
