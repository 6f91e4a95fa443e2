"""Diffusion dialects -> diffusers, against diffusers' own converters (diffusers.loaders.lora_conversion_utils, the
code diffusers runs when it loads these files): kohya-style Flux / Wan (musubi) / Qwen-Image files with no base,
Qwen-Image's names, Wan's diff_b, xlabs Flux single blocks, HunyuanVideo diffusion-pipe names. Each module's delta
of lorakit's --to diffusers output equals the delta of diffusers' conversion (fp64), and nothing is missing."""

import json
import re

import pytest
import torch

import lorakit
from lorakit.io import TensorFile, write_safetensors

from conftest import assert_one_line_error, tiny_flux_transformer

conversion = pytest.importorskip("diffusers.loaders.lora_conversion_utils")
g = torch.Generator().manual_seed(11)
FLUX_HIDDEN = 3072  # diffusers' Flux / HunyuanVideo converters split linear1 at 3 x 3072 rows


def lora(stem, out, inp, alpha=None, parts=("lora_down.weight", "lora_up.weight"), r=2):
    t = {
        f"{stem}.{parts[0]}": torch.randn(r, inp, generator=g),
        f"{stem}.{parts[1]}": torch.randn(out, r, generator=g),
    }
    if alpha is not None:
        t[f"{stem}.alpha"] = torch.tensor(alpha)
    return t


def probe(A):
    """Fixed fp64 probe inputs for a factor A [r, in]: deltas are compared as dW @ X = B (A X), exact in fp64 and
    small at Flux's real widths (diffusers' converters hard-code 3072)."""
    return torch.randn(
        A.shape[1], 3, generator=torch.Generator().manual_seed(A.shape[1]), dtype=torch.float64
    )


def reference_deltas(converted):
    """{diffusers module: fp64 dW @ probe (and `<module>.bias`: the lora_B bias)} of a converter's output; its older
    spellings (text encoders' `to_q_lora.down`, a Flux `norm_out` without its component) normalized."""
    out = {}
    for key, t in converted.items():
        key = re.sub(r"self_attn\.to_(q|k|v)_lora\.(down|up)", r"self_attn.\1_proj.lora_\2", key)
        key = key.replace("self_attn.to_out_lora.", "self_attn.out_proj.lora_")
        key = key.replace("lora_down.", "lora_A.").replace("lora_up.", "lora_B.")
        if not key.startswith(("transformer.", "text_encoder")):
            key = "transformer." + key
        out[key] = t
    deltas = {}
    for key, t in out.items():
        if key.endswith(".lora_A.weight"):
            module = key[: -len(".lora_A.weight")]
            deltas[module] = out[f"{module}.lora_B.weight"].double() @ (t.double() @ probe(t))
        elif key.endswith(".lora_B.bias"):
            deltas[key[: -len(".lora_B.bias")] + ".bias"] = t.double()
    return deltas


def lorakit_deltas(path):
    """The same of lorakit's --to diffusers output, read back by lorakit."""
    ad = lorakit.load(path)
    out = {n: m.B.double() @ (m.A.double() @ probe(m.A)) * m.scale for n, m in ad.modules.items()}
    out.update({f"{n}.bias": m.bias.double() * m.scale for n, m in ad.modules.items() if m.bias is not None})
    return out


def check_against_diffusers(tmp_path, tensors, converter, **convert_args):
    write_safetensors(tmp_path / "in.safetensors", tensors)
    report = lorakit.convert(
        tmp_path / "in.safetensors", tmp_path / "out.safetensors", to="diffusers", **convert_args
    )
    want = reference_deltas(converter({k: v.clone() for k, v in tensors.items()}))
    got = lorakit_deltas(tmp_path / "out.safetensors")
    assert set(got) == set(want)
    for name, ref in want.items():
        assert torch.allclose(got[name], ref, rtol=0, atol=1e-6 * float(ref.abs().max())), name
    return report


def test_kohya_flux_without_base(tmp_path):
    """sd-scripts' Flux names (fused qkv, linear1, the final norm's swapped halves, CLIP-L) with no --base."""
    t = lora("lora_unet_double_blocks_0_img_attn_qkv", 24, 8, alpha=1.0)
    t |= lora("lora_unet_double_blocks_0_txt_mlp_0", 12, 8, alpha=4.0)
    t |= lora("lora_unet_single_blocks_0_linear1", 7 * FLUX_HIDDEN, FLUX_HIDDEN, alpha=2.0, r=1)
    t |= lora("lora_unet_final_layer_adaLN_modulation_1", 16, 8, alpha=2.0)
    t |= lora("lora_unet_img_in", 8, 4, alpha=8.0)
    t |= lora("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 8, 8, alpha=2.0)
    report = check_against_diffusers(tmp_path, t, conversion._convert_kohya_flux_lora_to_diffusers)
    assert any("resolved from the flux name tables" in n for n in report["notes"])


def test_musubi_wan_without_base(tmp_path):
    t = {}
    for i in range(2):
        for o in "qkvo":
            t |= lora(f"lora_unet_blocks_{i}_self_attn_{o}", 8, 8, alpha=1.0)
            t |= lora(f"lora_unet_blocks_{i}_cross_attn_{o}", 8, 8, alpha=4.0)
        t |= lora(f"lora_unet_blocks_{i}_ffn_0", 16, 8, alpha=2.0)
        t |= lora(f"lora_unet_blocks_{i}_ffn_2", 8, 16, alpha=2.0)
    report = check_against_diffusers(tmp_path, t, conversion._convert_musubi_wan_lora_to_diffusers)
    assert any("resolved from the wan name tables" in n for n in report["notes"])


@pytest.mark.parametrize("prefix", ["lora_unet_", "diffusion_model.", ""])
def test_qwen_image_names(tmp_path, prefix):
    """Qwen-Image as musubi (mangled), ComfyUI (diffusion_model.) and lightx2v (bare) name it: its names are
    diffusers' under `transformer.`; img_in is Qwen-Image's, not Flux's x_embedder."""
    t = {}
    for path, shape in {
        "transformer_blocks.0.attn.add_k_proj": (8, 8),
        "transformer_blocks.0.attn.to_out.0": (8, 8),
        "transformer_blocks.0.img_mlp.net.2": (8, 16),
        "transformer_blocks.0.txt_mod.1": (48, 8),
        "img_in": (8, 4),
    }.items():
        stem = prefix + (path.replace(".", "_") if prefix == "lora_unet_" else path)
        t |= lora(stem, *shape, alpha=4.0)
    check_against_diffusers(tmp_path, t, conversion._convert_non_diffusers_qwen_lora_to_diffusers)


def test_wan_diff_b_becomes_lora_bias(tmp_path, cli):
    """ComfyUI Wan files with diff_b (bias deltas): lora_B.bias of the layer's LoRA, as diffusers converts them; an
    all-zero norm diff (what trainers save) is dropped; a real one has no diffusers form and is refused by name."""
    t = {}
    for o in "qkvo":
        t |= lora(f"diffusion_model.blocks.0.self_attn.{o}", 8, 8, 1.0, ("lora_A.weight", "lora_B.weight"))
        t |= lora(f"diffusion_model.blocks.0.cross_attn.{o}", 8, 8, 4.0, ("lora_A.weight", "lora_B.weight"))
        t[f"diffusion_model.blocks.0.cross_attn.{o}.diff_b"] = torch.randn(8, generator=g)
    t |= lora("diffusion_model.blocks.0.ffn.0", 16, 8, 2.0, ("lora_A.weight", "lora_B.weight"))
    t |= lora("diffusion_model.blocks.0.ffn.2", 8, 16, 2.0, ("lora_A.weight", "lora_B.weight"))
    t["diffusion_model.blocks.0.norm3.diff"] = torch.zeros(8)
    report = check_against_diffusers(tmp_path, t, conversion._convert_non_diffusers_wan_lora_to_diffusers)
    assert any("4 bias delta(s)" in n for n in report["notes"]) and any(
        "all-zero" in n for n in report["notes"]
    )
    keys = TensorFile(tmp_path / "out.safetensors").header.entries
    assert "transformer.blocks.0.attn2.to_k.lora_B.bias" in keys
    t["diffusion_model.blocks.0.norm3.diff"] = torch.ones(8)
    write_safetensors(tmp_path / "n.safetensors", t)
    code, out, err = cli("convert", tmp_path / "n.safetensors", "--to", "diffusers", "-o", tmp_path / "n.d")
    assert_one_line_error(code, out, err, "n.safetensors", "blocks.0.norm3", "convert to lorakit or comfyui")


def test_xlabs_flux_single_blocks(tmp_path, cli):
    """xlabs' single_blocks.N.processor.{qkv,proj}_lora: qkv_lora adds to linear1's first 3 x hidden rows, proj_lora
    is a LoRA on linear2. Merged exactly (the MLP rows untouched) and converted as diffusers converts them."""
    H = 8
    t = {}
    for stem, shape in {
        "double_blocks.0.processor.qkv_lora1": (3 * H, H),
        "double_blocks.0.processor.proj_lora2": (H, H),
        "single_blocks.0.processor.qkv_lora": (3 * H, H),
        "single_blocks.0.processor.proj_lora": (H, 5 * H),
    }.items():
        t |= lora(stem, *shape, parts=("down.weight", "up.weight"))
    check_against_diffusers(tmp_path, t, conversion._convert_xlabs_flux_lora_to_diffusers)
    base = {
        "double_blocks.0.img_attn.qkv.weight": torch.randn(3 * H, H, generator=g),
        "double_blocks.0.txt_attn.proj.weight": torch.randn(H, H, generator=g),
        "single_blocks.0.linear1.weight": torch.randn(7 * H, H, generator=g),
        "single_blocks.0.linear2.weight": torch.randn(H, 5 * H, generator=g),
    }
    write_safetensors(tmp_path / "base.safetensors", base)
    code, out, err = cli(
        "merge", tmp_path / "base.safetensors", tmp_path / "in.safetensors", "-o", tmp_path / "m"
    )
    assert code == 0, err
    merged = TensorFile(tmp_path / "m")
    d = lambda s: t[f"{s}.up.weight"].double() @ t[f"{s}.down.weight"].double()  # noqa: E731
    want = {
        "double_blocks.0.img_attn.qkv.weight": d("double_blocks.0.processor.qkv_lora1"),
        "double_blocks.0.txt_attn.proj.weight": d("double_blocks.0.processor.proj_lora2"),
        "single_blocks.0.linear1.weight": torch.cat(
            [d("single_blocks.0.processor.qkv_lora"), torch.zeros(4 * H, H, dtype=torch.float64)]
        ),
        "single_blocks.0.linear2.weight": d("single_blocks.0.processor.proj_lora"),
    }
    for name, W in base.items():
        ref = W.double() + want[name]
        assert torch.allclose(merged.get(name).double(), ref, rtol=0, atol=3e-7 * float(ref.abs().max())), (
            name
        )
    assert torch.equal(
        merged.get("single_blocks.0.linear1.weight")[3 * H :], base["single_blocks.0.linear1.weight"][3 * H :]
    )


def test_hunyuan_video_diffusion_pipe_names(tmp_path):
    """diffusion-pipe keeps HunyuanVideo's original names under `transformer.`: renamed, fused ones split."""
    t = lora("transformer.double_blocks.0.img_attn_qkv", 24, 8, parts=("lora_A.weight", "lora_B.weight"))
    t |= lora("transformer.double_blocks.0.img_mlp.fc1", 32, 8, parts=("lora_A.weight", "lora_B.weight"))
    t |= lora(
        "transformer.single_blocks.0.linear1",
        7 * FLUX_HIDDEN,
        FLUX_HIDDEN,
        parts=("lora_A.weight", "lora_B.weight"),
        r=1,
    )
    check_against_diffusers(tmp_path, t, conversion._convert_hunyuan_video_lora_to_diffusers)
    keys = TensorFile(tmp_path / "out.safetensors").header.entries
    assert not any("double_blocks" in k or "single_blocks." in k for k in keys)


def test_kohya_names_no_table_has_need_the_base(tmp_path, cli):
    """A kohya name no family's table has (an SD1 UNet's, mangled past recovery) is an error saying to pass --base,
    never a file under kohya names that diffusers would drop."""
    t = lora("lora_unet_double_blocks_0_img_attn_qkv", 24, 8)
    t |= lora("lora_unet_some_custom_layer", 8, 8)
    write_safetensors(tmp_path / "k.safetensors", t)
    code, out, err = cli("convert", tmp_path / "k.safetensors", "--to", "diffusers", "-o", tmp_path / "d")
    assert_one_line_error(code, out, err, "k.safetensors", "lora_unet_some_custom_layer", "pass --base")
    assert not (tmp_path / "d").exists()


def test_flux_lora_text_encoder_into_a_clip_l_file(tmp_path, cli):
    """A Flux LoRA's lora_te1 into a standalone CLIP-L file (Flux's clip_l.safetensors: bare text_model names), as
    sd-scripts' flux_merge_lora does: merged exactly; the transformer's modules are reported as for another file."""
    H = 8
    base = {
        "text_model.encoder.layers.0.self_attn.q_proj.weight": torch.randn(H, H, generator=g),
        "text_model.encoder.layers.0.mlp.fc1.weight": torch.randn(2 * H, H, generator=g),
        "text_model.embeddings.token_embedding.weight": torch.randn(10, H, generator=g),
    }
    write_safetensors(tmp_path / "clip_l.safetensors", base)
    t = lora("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", H, H, alpha=1.0)
    t |= lora("lora_te1_text_model_encoder_layers_0_mlp_fc1", 2 * H, H, alpha=4.0)
    t |= lora("lora_unet_double_blocks_0_img_attn_qkv", 3 * H, H, alpha=1.0)
    write_safetensors(tmp_path / "flux.safetensors", t)
    code, out, err = cli(
        "merge",
        tmp_path / "clip_l.safetensors",
        tmp_path / "flux.safetensors",
        "-o",
        tmp_path / "m",
        "--json",
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["merged_count"] == 2 and report["elsewhere"] == [
        "lora_unet_double_blocks_0_img_attn_qkv.weight"
    ]
    merged = TensorFile(tmp_path / "m")
    for stem, layer, alpha in (("self_attn_q_proj", "self_attn.q_proj", 1.0), ("mlp_fc1", "mlp.fc1", 4.0)):
        k = f"lora_te1_text_model_encoder_layers_0_{stem}"
        ref = base[f"text_model.encoder.layers.0.{layer}.weight"].double() + alpha / 2 * (
            t[f"{k}.lora_up.weight"].double() @ t[f"{k}.lora_down.weight"].double()
        )
        got = merged.get(f"text_model.encoder.layers.0.{layer}.weight").double()
        assert torch.allclose(got, ref, rtol=0, atol=3e-7 * float(ref.abs().max())), layer


def test_bfl_control_lora_widens_img_in_and_adds_biases(tmp_path, cli):
    """A BFL control LoRA (Flux Canny / Depth): LoRAs with lora_B.bias (bias deltas, unscaled, as ComfyUI applies
    them), norm scales that replace the model's, and img_in widened from 4 to 8 input channels (ComfyUI pads the
    base weight with zero columns to the LoRA's shape). Merged as ComfyUI patches every tensor; the ComfyUI file
    lorakit writes (reshape_weight) and the lorakit file merge the same; formats that cannot say it refuse."""
    H, r = 8, 2
    base = {
        "img_in.weight": torch.randn(H, 4, generator=g),
        "img_in.bias": torch.randn(H, generator=g),
        "double_blocks.0.img_attn.qkv.weight": torch.randn(3 * H, H, generator=g),
        "double_blocks.0.img_attn.qkv.bias": torch.randn(3 * H, generator=g),
        "double_blocks.0.img_attn.norm.key_norm.scale": torch.randn(4, generator=g),
        "single_blocks.0.norm.key_norm.scale": torch.randn(4, generator=g),
    }
    write_safetensors(tmp_path / "base.safetensors", base)
    t = lora("img_in", H, 8, parts=("lora_A.weight", "lora_B.weight"), r=r)
    t |= lora("double_blocks.0.img_attn.qkv", 3 * H, H, parts=("lora_A.weight", "lora_B.weight"), r=r)
    t["img_in.lora_B.bias"] = torch.randn(H, generator=g)
    t["double_blocks.0.img_attn.qkv.lora_B.bias"] = torch.randn(3 * H, generator=g)
    for k in ("double_blocks.0.img_attn.norm.key_norm.scale", "single_blocks.0.norm.key_norm.scale"):
        t[k] = torch.randn(4, generator=g)
    write_safetensors(tmp_path / "bfl.safetensors", t)
    d = lambda s: t[f"{s}.lora_B.weight"].double() @ t[f"{s}.lora_A.weight"].double()  # noqa: E731
    want = {
        "img_in.weight": torch.cat(
            [base["img_in.weight"].double(), torch.zeros(H, 4, dtype=torch.float64)], 1
        )
        + d("img_in"),
        "img_in.bias": base["img_in.bias"].double() + t["img_in.lora_B.bias"].double(),
        "double_blocks.0.img_attn.qkv.weight": base["double_blocks.0.img_attn.qkv.weight"].double()
        + d("double_blocks.0.img_attn.qkv"),
        "double_blocks.0.img_attn.qkv.bias": base["double_blocks.0.img_attn.qkv.bias"].double()
        + t["double_blocks.0.img_attn.qkv.lora_B.bias"].double(),
        "double_blocks.0.img_attn.norm.key_norm.scale": t[
            "double_blocks.0.img_attn.norm.key_norm.scale"
        ].double(),
        "single_blocks.0.norm.key_norm.scale": t["single_blocks.0.norm.key_norm.scale"].double(),
    }
    lorakit.convert(tmp_path / "bfl.safetensors", tmp_path / "c.safetensors", to="comfyui")
    assert torch.equal(
        TensorFile(tmp_path / "c.safetensors").get("img_in.reshape_weight"), torch.tensor([H, 8])
    )
    lorakit.convert(tmp_path / "bfl.safetensors", tmp_path / "l.safetensors", to="lorakit")
    meta = TensorFile(tmp_path / "l.safetensors").header.metadata
    assert (
        meta["lorakit.spec_version"] == "1.2" and json.loads(meta["lorakit.modules"])["img_in"]["pads_base"]
    )
    for i, adapter in enumerate(("bfl.safetensors", "c.safetensors", "l.safetensors")):
        code, out, err = cli(
            "merge", tmp_path / "base.safetensors", tmp_path / adapter, "-o", tmp_path / f"m{i}", "--json"
        )
        assert code == 0, err
        merged = TensorFile(tmp_path / f"m{i}")
        assert set(merged.header.entries) == set(base)
        for name, ref in want.items():
            got = merged.get(name).double()
            assert got.shape == ref.shape, (adapter, name)
            assert torch.allclose(got, ref, rtol=0, atol=3e-7 * float(ref.abs().max())), (adapter, name)
    code, out, err = cli("convert", tmp_path / "bfl.safetensors", "--to", "kohya", "-o", tmp_path / "k")
    assert_one_line_error(code, out, err, "img_in", "widens its base weight")


def test_bfl_control_lora_to_diffusers_loads_in_a_flux_pipeline(tmp_path):
    """The BFL control LoRA --to diffusers, loaded by diffusers' FluxPipeline.load_lora_weights + fuse_lora into a
    tiny Flux transformer: x_embedder widened (in_channels 4 -> 8) to W padded + dW, its bias + lora_B.bias, the
    norm scale replaced, the fused qkv's LoRA on to_q / to_k / to_v."""
    from diffusers import FluxPipeline

    transformer = tiny_flux_transformer()
    pipe = FluxPipeline(
        scheduler=None,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )
    H = 8
    t = lora("img_in", H, 8, parts=("lora_A.weight", "lora_B.weight"))
    t |= lora("double_blocks.0.img_attn.qkv", 3 * H, H, parts=("lora_A.weight", "lora_B.weight"))
    t["img_in.lora_B.bias"] = torch.randn(H, generator=g)
    t["single_blocks.0.norm.key_norm.scale"] = torch.randn(4, generator=g)
    write_safetensors(tmp_path / "bfl.safetensors", t)
    lorakit.convert(tmp_path / "bfl.safetensors", tmp_path / "d.safetensors", to="diffusers")
    before = {n: p.detach().double().clone() for n, p in transformer.named_parameters()}
    pipe.load_lora_weights(str(tmp_path / "d.safetensors"))
    pipe.fuse_lora()
    assert transformer.config.in_channels == 8
    d = lambda s: t[f"{s}.lora_B.weight"].double() @ t[f"{s}.lora_A.weight"].double()  # noqa: E731
    W0 = before["x_embedder.weight"]
    want = {
        "x_embedder.weight": torch.cat([W0, torch.zeros_like(W0)], 1) + d("img_in"),
        "x_embedder.bias": before["x_embedder.bias"] + t["img_in.lora_B.bias"].double(),
        "single_transformer_blocks.0.attn.norm_k.weight": t["single_blocks.0.norm.key_norm.scale"].double(),
    }
    qkv = d("double_blocks.0.img_attn.qkv")
    for i, p in enumerate(("to_q", "to_k", "to_v")):
        name = f"transformer_blocks.0.attn.{p}.weight"
        want[name] = before[name] + qkv[i * H : (i + 1) * H]
    for name, ref in want.items():
        got = transformer.get_parameter(name).detach().double()
        assert torch.allclose(got, ref, rtol=0, atol=1e-6 * float(ref.abs().max())), name


def test_widening_refused_where_it_does_not_fit(tmp_path, cli):
    """A reshape_weight that is not the LoRA's shape, one with no LoRA, and a widened weight that another adapter
    changes at the unwidened shape: each a one-line error naming the tensor."""
    H = 8
    write_safetensors(tmp_path / "base.safetensors", {"img_in.weight": torch.randn(H, 4, generator=g)})
    wide = lora("diffusion_model.img_in", H, 8)
    for name, extra, fragment in (
        (
            "bad.safetensors",
            {"diffusion_model.img_in.reshape_weight": torch.tensor([H, 9])},
            "reshape_weight [8, 9]",
        ),
        (
            "orphan.safetensors",
            {"diffusion_model.x.reshape_weight": torch.tensor([1, 2])},
            "x.reshape_weight",
        ),
    ):
        write_safetensors(tmp_path / name, {**wide, **extra})
        code, out, err = cli("merge", tmp_path / "base.safetensors", tmp_path / name, "-o", tmp_path / "m")
        assert_one_line_error(code, out, err, name, fragment)
    write_safetensors(
        tmp_path / "w.safetensors", {**wide, "diffusion_model.img_in.reshape_weight": torch.tensor([H, 8])}
    )
    write_safetensors(tmp_path / "n.safetensors", lora("diffusion_model.img_in", H, 4))
    code, out, err = cli(
        "merge",
        tmp_path / "base.safetensors",
        tmp_path / "w.safetensors",
        tmp_path / "n.safetensors",
        "-o",
        tmp_path / "m",
    )
    assert_one_line_error(code, out, err, "img_in.weight", "widened to [8, 8]")
    assert not (tmp_path / "m").exists()
