"""kohya / LyCORIS: files built here by sd-scripts' naming rules; resolution against bases; exact LoHa/LoKr."""

import hashlib
import json
import struct

import pytest
import torch

import lorakit
from lorakit.errors import LorakitError
from lorakit.naming.kohya import mangle
from lorakit.naming.ldm import ldm_unet_to_diffusers as _sd1_unet_to_diffusers
from lorakit.io import TensorFile, write_safetensors

g = torch.Generator().manual_seed(5)


def rnd(*s):
    return torch.randn(*s, generator=g)


# diffusers-style module paths (names with "_" inside, which kohya's mangling makes ambiguous)
UNET = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (32, 16),
    "down_blocks.0.attentions.0.proj_in": (16, 16),
    "down_blocks.0.resnets.0.conv1": (8, 4, 3, 3),
    "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj": (64, 16),
}
TE = {
    "text_model.encoder.layers.0.self_attn.q_proj": (16, 16),
    "text_model.encoder.layers.0.mlp.fc1": (32, 16),
}


def diffusers_base(folder):
    (folder / "unet").mkdir(parents=True)
    (folder / "text_encoder").mkdir()
    (folder / "model_index.json").write_text("{}")
    write_safetensors(
        folder / "unet" / "diffusion_pytorch_model.safetensors",
        {f"{k}.weight": torch.zeros(s) for k, s in UNET.items()},
    )
    write_safetensors(
        folder / "text_encoder" / "model.safetensors", {f"{k}.weight": torch.zeros(s) for k, s in TE.items()}
    )


def kohya_file(path, alpha_missing=(), dtype=torch.float16):
    """An SD1 kohya LoRA: lora_unet_* (diffusers names) and lora_te_*; conv LoCon; one module without alpha."""
    t, ref = {}, {}
    for prefix, mods in (("lora_unet", UNET), ("lora_te", TE)):
        for path_, shape in mods.items():
            name = mangle(prefix, path_)
            r = 4 if len(shape) == 2 else 2
            down = rnd(r, *shape[1:]).to(dtype)
            up = rnd(shape[0], r, *[1] * (len(shape) - 2)).to(dtype)
            t[f"{name}.lora_down.weight"], t[f"{name}.lora_up.weight"] = down, up
            alpha = 2.0 if name not in alpha_missing else None
            if alpha is not None:
                t[f"{name}.alpha"] = torch.tensor(alpha, dtype=dtype)
            scale = (alpha or r) / r
            ref[name] = (scale * (up.double().flatten(1) @ down.double().flatten(1))).reshape(shape)
    write_safetensors(
        path,
        t,
        {
            "ss_network_module": "networks.lora",
            "ss_base_model_version": "sd_v1",
            "ss_network_dim": "4",
            "ss_network_alpha": "2.0",
        },
    )
    return ref


def test_kohya_resolves_against_diffusers_base_and_round_trips(tmp_path, cli):
    diffusers_base(tmp_path / "pipe")
    no_alpha = mangle("lora_te", "text_model.encoder.layers.0.mlp.fc1")
    ref = kohya_file(tmp_path / "k.safetensors", alpha_missing=(no_alpha,))
    code, out, err = cli(
        "convert",
        tmp_path / "k.safetensors",
        "-o",
        tmp_path / "a.safetensors",
        "--to",
        "lorakit",
        "--base",
        tmp_path / "pipe",
        "--json",
    )
    assert code == 0, err
    assert json.loads(out)["from"] == "kohya"
    ad = lorakit.load(tmp_path / "a.safetensors")
    expected = {f"unet.{k}" for k in UNET} | {f"text_encoder.{k}" for k in TE}
    assert set(ad.modules) == expected
    for name, m in ad.modules.items():
        prefix, path = name.split(".", 1)
        kname = mangle("lora_unet" if prefix == "unet" else "lora_te", path)
        assert torch.allclose(m.delta(torch.float64), ref[kname], rtol=1e-12, atol=1e-12)
    assert ad.modules["unet.down_blocks.0.resnets.0.conv1"].kind == "conv"
    assert ad.provenance["parents"][0]["format"] == "kohya"
    # back to kohya: same names, same factor bytes, exact alpha in fp32, hash after the final cast
    lorakit.convert(tmp_path / "a.safetensors", tmp_path / "k2.safetensors", to="kohya")
    a, b = TensorFile(tmp_path / "k.safetensors"), TensorFile(tmp_path / "k2.safetensors")
    factor_keys = {k for k in a.header.entries if not k.endswith(".alpha")}
    assert factor_keys == {k for k in b.header.entries if not k.endswith(".alpha")}
    for k in factor_keys:
        assert a.raw(k) == b.raw(k)
    assert b.get(f"{no_alpha}.alpha").item() == 4.0  # "no alpha" written as alpha = rank
    meta = b.header.metadata
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_base_model_version"] == "sd_v1"
    data = (tmp_path / "k2.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + n :]).hexdigest()


def test_kohya_without_base_keeps_names_and_reports(tmp_path):
    kohya_file(tmp_path / "k.safetensors")
    r = lorakit.convert(tmp_path / "k.safetensors", tmp_path / "a.safetensors", to="lorakit")
    assert any("kept unresolved (no --base given)" in n for n in r["notes"])
    lorakit.convert(tmp_path / "a.safetensors", tmp_path / "k2.safetensors", to="kohya")
    assert set(TensorFile(tmp_path / "k2.safetensors").header.entries) == set(
        TensorFile(tmp_path / "k.safetensors").header.entries
    )


def test_sd1_original_single_file_names():
    assert (
        _sd1_unet_to_diffusers("input_blocks.1.1.transformer_blocks.0.attn1.to_q")
        == "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    )
    assert _sd1_unet_to_diffusers("input_blocks.4.0.in_layers.2") == "down_blocks.1.resnets.0.conv1"
    assert _sd1_unet_to_diffusers("input_blocks.3.0.op") == "down_blocks.0.downsamplers.0.conv"
    assert _sd1_unet_to_diffusers("middle_block.1.proj_in") == "mid_block.attentions.0.proj_in"
    assert _sd1_unet_to_diffusers("middle_block.2.emb_layers.1") == "mid_block.resnets.1.time_emb_proj"
    assert _sd1_unet_to_diffusers("output_blocks.5.1.proj_out") == "up_blocks.1.attentions.2.proj_out"
    assert _sd1_unet_to_diffusers("output_blocks.2.1.conv") == "up_blocks.0.upsamplers.0.conv"
    assert _sd1_unet_to_diffusers("output_blocks.8.2.conv") == "up_blocks.2.upsamplers.0.conv"


def test_sd1_single_file_base_resolution(tmp_path):
    write_safetensors(
        tmp_path / "sd15.safetensors",
        {
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": torch.zeros(
                32, 16
            ),
            "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": torch.zeros(
                16, 16
            ),
        },
    )
    t = {}
    for name, shape in (
        (mangle("lora_unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"), (32, 16)),
        (mangle("lora_te", "text_model.encoder.layers.0.self_attn.q_proj"), (16, 16)),
    ):
        t[f"{name}.lora_down.weight"], t[f"{name}.lora_up.weight"] = rnd(2, shape[1]), rnd(shape[0], 2)
    write_safetensors(tmp_path / "k.safetensors", t)
    ad = lorakit.load(tmp_path / "k.safetensors", base=str(tmp_path / "sd15.safetensors"))
    assert set(ad.modules) == {
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q",
        "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj",
    }
    # back to kohya: sd-scripts' SD1 names (diffusers paths), not the single file's LDM paths
    lorakit.convert(
        tmp_path / "k.safetensors",
        tmp_path / "a.safetensors",
        to="lorakit",
        base=str(tmp_path / "sd15.safetensors"),
    )
    lorakit.convert(tmp_path / "a.safetensors", tmp_path / "k2.safetensors", to="kohya")
    keys = set(TensorFile(tmp_path / "k2.safetensors").header.entries)
    assert {k for k in keys if not k.endswith(".alpha")} == set(t)
    # to diffusers from the single file's names: unet.<diffusers path>, text_encoder.text_model...
    lorakit.convert(tmp_path / "a.safetensors", tmp_path / "d.safetensors", to="diffusers")
    d = lorakit.load(tmp_path / "d.safetensors")
    assert set(d.modules) == {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
    }
    for original, module in zip(
        sorted(ad.modules.values(), key=lambda m: m.name.startswith("cond")),
        sorted(d.modules.values(), key=lambda m: m.name.startswith("text")),
    ):
        assert torch.allclose(module.delta(torch.float64), original.delta(torch.float64), rtol=1e-6, atol=0)
    # merge into the single file in one command: the kohya names resolved against it, exact
    lorakit.merge(tmp_path / "sd15.safetensors", [tmp_path / "k.safetensors"], tmp_path / "m.safetensors")
    merged, base = TensorFile(tmp_path / "m.safetensors"), TensorFile(tmp_path / "sd15.safetensors")
    for module in ad.modules.values():
        w = f"{module.name}.weight"
        ref = base.get(w).double() + module.delta(torch.float64)
        assert torch.allclose(
            merged.get(w).double(), ref, rtol=0, atol=4e-7 * ref.abs().max()
        )  # fp32 rounding


def test_sdxl_single_file_names_stay_original(tmp_path):
    """SDXL: sd-scripts trains on the original UNet, so its kohya names are LDM paths (input_blocks...)."""
    name = "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn1.to_q"
    write_safetensors(tmp_path / "sdxl.safetensors", {f"{name}.weight": torch.zeros(32, 16)})
    lora = mangle("lora_unet", name[len("model.diffusion_model.") :])
    write_safetensors(
        tmp_path / "k.safetensors",
        {f"{lora}.lora_down.weight": rnd(2, 16), f"{lora}.lora_up.weight": rnd(32, 2)},
    )
    lorakit.convert(
        tmp_path / "k.safetensors",
        tmp_path / "a.safetensors",
        to="lorakit",
        base=str(tmp_path / "sdxl.safetensors"),
    )
    assert set(lorakit.load(tmp_path / "a.safetensors").modules) == {name}
    lorakit.convert(tmp_path / "a.safetensors", tmp_path / "k2.safetensors", to="kohya")
    assert f"{lora}.lora_down.weight" in TensorFile(tmp_path / "k2.safetensors").header.entries


def test_flux_split_qkv_scale(tmp_path):
    r, rows = 2, 9216
    downs = [rnd(r, 16) for _ in range(3)]
    ups = [rnd(3072, r) for _ in range(3)]
    up = torch.zeros(rows, 3 * r)
    for j in range(3):
        up[3072 * j : 3072 * (j + 1), j * r : (j + 1) * r] = ups[j]
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    write_safetensors(
        tmp_path / "f.safetensors",
        {
            f"{name}.lora_down.weight": torch.cat(downs),
            f"{name}.lora_up.weight": up,
            f"{name}.alpha": torch.tensor(1.0),
        },
        {"ss_network_args": json.dumps({"split_qkv": "True"})},
    )
    ad = lorakit.load(tmp_path / "f.safetensors")
    ref = torch.cat(
        [(ups[j].double() @ downs[j].double()) * (1.0 / r) for j in range(3)]
    )  # alpha / r per split
    assert torch.allclose(ad.modules[name].delta(torch.float64), ref, atol=1e-10)
    # written back (through lorakit's own format too): the alpha of one split again, split_qkv still declared
    lorakit.convert(tmp_path / "f.safetensors", tmp_path / "a.safetensors", to="lorakit")
    lorakit.convert(tmp_path / "a.safetensors", tmp_path / "f2.safetensors", to="kohya")
    f2 = TensorFile(tmp_path / "f2.safetensors")
    assert f2.get(f"{name}.alpha").item() == 1.0
    assert json.loads(f2.header.metadata["ss_network_args"])["split_qkv"] == "True"
    assert torch.allclose(
        lorakit.load(tmp_path / "f2.safetensors").modules[name].delta(torch.float64), ref, atol=1e-10
    )


def test_loha_and_lokr_match_lycoris_formula(tmp_path):
    w1a, w1b, w2a, w2b = rnd(12, 3), rnd(3, 10), rnd(12, 3), rnd(3, 10)
    k1, k2a, k2b, k2 = rnd(2, 2), rnd(6, 4), rnd(4, 5), rnd(3, 5)
    write_safetensors(
        tmp_path / "ly.safetensors",
        {
            "lora_unet_a.hada_w1_a": w1a,
            "lora_unet_a.hada_w1_b": w1b,
            "lora_unet_a.hada_w2_a": w2a,
            "lora_unet_a.hada_w2_b": w2b,
            "lora_unet_a.alpha": torch.tensor(1.5),
            "lora_unet_b.lokr_w1": k1,
            "lora_unet_b.lokr_w2_a": k2a,
            "lora_unet_b.lokr_w2_b": k2b,
            "lora_unet_b.alpha": torch.tensor(2.0),
            "lora_unet_c.lokr_w1": k1,
            "lora_unet_c.lokr_w2": k2,
            "lora_unet_d.lora_down.weight": rnd(2, 10),
            "lora_unet_d.lora_up.weight": rnd(12, 2),
            "lora_unet_d.dora_scale": rnd(1, 10).abs(),
        },
    )
    ad = lorakit.load(tmp_path / "ly.safetensors")
    loha = (w1a.double() @ w1b.double()) * (w2a.double() @ w2b.double()) * 1.5 / 3
    assert ad.modules["lora_unet_a"].rank == 9
    assert (ad.modules["lora_unet_a"].delta().double() - loha).norm() / loha.norm() < 1e-6
    lokr = torch.kron(k1.double(), k2a.double() @ k2b.double()) * 2.0 / 4
    assert (ad.modules["lora_unet_b"].delta().double() - lokr).norm() / lokr.norm() < 1e-6
    lokr_full = torch.kron(k1.double(), k2.double())  # no decomposed factor: scale 1
    assert (ad.modules["lora_unet_c"].delta().double() - lokr_full).norm() / lokr_full.norm() < 1e-6
    assert ad.modules["lora_unet_d"].dora_axis == 1  # older LyCORIS: one magnitude per input column
    r = lorakit.resize(tmp_path / "ly.safetensors", tmp_path / "small.safetensors", rank=4, quiet=True)
    assert {m["module"]: m["rank"] for m in r["modules"]}["lora_unet_a"] == 4


def test_kohya_bad_input(tmp_path, cli):
    write_safetensors(tmp_path / "k.safetensors", {"lora_unet_x.lora_down.weight": rnd(2, 4)})
    c, out, err = cli("inspect", tmp_path / "k.safetensors")
    assert c == 2 and "lora_unet_x" in err and "wrong pairing" in err
    write_safetensors(
        tmp_path / "k.safetensors",
        {"lora_unet_x.lora_down.weight": rnd(2, 4), "lora_unet_x.lora_up.weight": rnd(3, 5)},
    )
    c, out, err = cli("inspect", tmp_path / "k.safetensors")
    assert c == 2 and "shape mismatch" in err
    write_safetensors(
        tmp_path / "k.safetensors",
        {
            "lora_unet_x.lora_down.weight": rnd(2, 4),
            "lora_unet_x.lora_up.weight": rnd(3, 2),
            "lora_unet_x.weird": rnd(1),
        },
    )
    with pytest.raises(LorakitError, match="1 unknown keys: lora_unet_x.weird"):
        lorakit.load(tmp_path / "k.safetensors")


def test_diffusers_own_kohya_conversion_accepts_lorakit_output(tmp_path):
    """diffusers' kohya -> diffusers converter (the one its pipelines use) takes lorakit's kohya file whole."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
    from safetensors.torch import load_file

    diffusers_base(tmp_path / "pipe")
    kohya_file(tmp_path / "k.safetensors")
    lorakit.convert(
        tmp_path / "k.safetensors", tmp_path / "a.safetensors", to="lorakit", base=str(tmp_path / "pipe")
    )
    lorakit.convert(tmp_path / "a.safetensors", tmp_path / "k2.safetensors", to="kohya")
    state = load_file(str(tmp_path / "k2.safetensors"))
    converted, alphas = _convert_non_diffusers_lora_to_diffusers(dict(state))
    ad = lorakit.load(tmp_path / "a.safetensors")
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    down = f"unet.{q}.processor.to_q_lora.down.weight"
    assert torch.equal(converted[down], ad.modules[f"unet.{q}.to_q"].A)
    assert alphas[down + ".alpha"] == ad.modules[f"unet.{q}.to_q"].alpha
    assert len(converted) == 2 * len(ad.modules)  # nothing left over, nothing dropped


def test_inspect_groups_kohya_names(tmp_path, cli):
    """kohya's mangled names group by layer like dotted ones: 24 SDXL UNet modules + 3 TE -> 4 target lines."""
    t = {}
    for b in (4, 5, 7, 8):
        for tb in range(2):
            for p in ("attn1.to_q", "attn2.to_k", "ff.net.0.proj"):
                n = mangle("lora_unet", f"input_blocks.{b}.1.transformer_blocks.{tb}.{p}")
                t[f"{n}.lora_down.weight"], t[f"{n}.lora_up.weight"] = rnd(4, 8), rnd(8, 4)
    for layer in range(3):
        n = mangle("lora_te1", f"text_model.encoder.layers.{layer}.self_attn.q_proj")
        t[f"{n}.lora_down.weight"], t[f"{n}.lora_up.weight"] = rnd(4, 8), rnd(8, 4)
    write_safetensors(tmp_path / "k.safetensors", t)
    code, out, err = cli("inspect", tmp_path / "k.safetensors", "--json")
    assert code == 0, err
    targets = {x["pattern"]: x["count"] for x in json.loads(out)["targets"]}
    assert targets == {
        "lora_te1_text_model_encoder_layers_*_self_attn_q_proj": 3,
        "lora_unet_input_blocks_*_*_transformer_blocks_*_attn1_to_q": 8,
        "lora_unet_input_blocks_*_*_transformer_blocks_*_attn2_to_k": 8,
        "lora_unet_input_blocks_*_*_transformer_blocks_*_ff_net_*_proj": 8,
    }


def test_merge_into_diffusers_pipeline_folder(tmp_path, cli):
    """One command into a diffusers pipeline folder: each component merged with its modules, the rest copied."""
    diffusers_base(tmp_path / "pipe")
    kohya_file(tmp_path / "k.safetensors")
    code, out, err = cli(
        "merge", tmp_path / "pipe", tmp_path / "k.safetensors", "-o", tmp_path / "out", "--json"
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["components"] == {"text_encoder": len(TE), "unet": len(UNET)}
    assert (tmp_path / "out" / "model_index.json").read_text() == "{}"
    ad = lorakit.load(tmp_path / "k.safetensors", base=str(tmp_path / "pipe"))
    for name, m in ad.modules.items():
        c, path = name.split(".", 1)
        file = "diffusion_pytorch_model.safetensors" if c == "unet" else "model.safetensors"
        got = TensorFile(tmp_path / "out" / c / file).get(f"{path}.weight").double()
        want = TensorFile(tmp_path / "pipe" / c / file).get(f"{path}.weight").double() + m.delta(
            torch.float64
        )
        assert torch.allclose(got, want, rtol=0, atol=3e-7 * float(want.abs().max())), name


def test_sdxl_single_file_kohya_to_diffusers(tmp_path):
    """An SDXL kohya LoRA read against the single file (original names; te2's q/k/v fused in OpenCLIP's in_proj) and
    written --to diffusers: the names of diffusers' own SDXL UNet and text encoders, the same deltas."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=8,
        attention_head_dim=4,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80,
        transformer_layers_per_block=2,
    )
    names = {k for k in unet.state_dict()}
    te2 = "conditioner.embedders.1.model.transformer.resblocks.0."
    base = {
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight": torch.zeros(64, 64),
        "model.diffusion_model.output_blocks.2.2.conv.weight": torch.zeros(64, 64, 3, 3),
        "model.diffusion_model.label_emb.0.0.weight": torch.zeros(128, 80),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(37, 32),
        f"{te2}attn.in_proj_weight": torch.zeros(96, 32),
        f"{te2}attn.out_proj.weight": torch.zeros(32, 32),
    }
    write_safetensors(tmp_path / "sdxl.safetensors", base)
    t = {}
    kohya = {
        "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q": (64, 64),
        "lora_unet_output_blocks_2_2_conv": (64, 64, 3, 3),
        "lora_unet_label_emb_0_0": (128, 80),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1": (37, 32),
        "lora_te2_text_model_encoder_layers_0_self_attn_k_proj": (32, 32),
    }
    for name, shape in kohya.items():
        down = rnd(2, shape[1], *shape[2:]) if len(shape) == 4 else rnd(2, shape[1])
        up = rnd(shape[0], 2, 1, 1) if len(shape) == 4 else rnd(shape[0], 2)
        t[f"{name}.lora_down.weight"], t[f"{name}.lora_up.weight"] = down, up
    write_safetensors(tmp_path / "k.safetensors", t)
    ad = lorakit.load(tmp_path / "k.safetensors", base=str(tmp_path / "sdxl.safetensors"))
    lorakit.convert(
        tmp_path / "k.safetensors",
        tmp_path / "d.safetensors",
        to="diffusers",
        base=str(tmp_path / "sdxl.safetensors"),
    )
    d = lorakit.load(tmp_path / "d.safetensors")
    unet_names = {
        "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q",
        "unet.up_blocks.0.upsamplers.0.conv",
        "unet.add_embedding.linear_1",
    }
    assert set(d.modules) == unet_names | {
        "text_encoder.text_model.encoder.layers.0.mlp.fc1",
        "text_encoder_2.text_model.encoder.layers.0.self_attn.k_proj",
    }
    assert all(
        f"{n[len('unet.') :]}.weight" in names for n in unet_names
    )  # diffusers' own SDXL UNet has them
    before = sorted(
        (m.delta(torch.float64) for m in ad.modules.values()), key=lambda x: (x.shape, float(x.sum()))
    )
    after = sorted(
        (m.delta(torch.float64) for m in d.modules.values()), key=lambda x: (x.shape, float(x.sum()))
    )
    for x, y in zip(before, after):
        assert torch.allclose(x, y, rtol=1e-6, atol=1e-7)
    # the same kohya UNet modules (original names) merged into a diffusers SDXL pipeline folder
    unet.save_pretrained(tmp_path / "pipe" / "unet")
    (tmp_path / "pipe" / "model_index.json").write_text(
        json.dumps({"unet": ["diffusers", "UNet2DConditionModel"]})
    )
    write_safetensors(tmp_path / "ku.safetensors", {k: v for k, v in t.items() if k.startswith("lora_unet")})
    lorakit.merge(tmp_path / "pipe", [tmp_path / "ku.safetensors"], tmp_path / "out")
    merged = UNet2DConditionModel.from_pretrained(tmp_path / "out" / "unet").state_dict()
    original = unet.state_dict()
    for name in unet_names:
        key = f"{name[len('unet.') :]}.weight"
        want = original[key].double() + d.modules[name].delta(torch.float64)
        # fp32 math rounded once: a few fp32 ulps of |W| + |B| |A| (the UNet's and the factors' draws depend on the
        # tests run before in the process, so a fixed atol failed on a large weight now and then)
        B2, A2 = d.modules[name].factors(torch.float64)
        size = original[key].double().abs() + (B2.abs() @ A2.abs()).reshape(want.shape)
        assert ((merged[key].double() - want).abs() <= 4 * torch.finfo(torch.float32).eps * size).all(), key
    assert sum(not torch.equal(merged[k], original[k]) for k in original) == len(unet_names)
    with pytest.raises(
        LorakitError, match="a pipeline folder is written whole"
    ):  # --resume / --part: one model's
        lorakit.merge(tmp_path / "pipe", [tmp_path / "ku.safetensors"], tmp_path / "o2", part="1/2")
