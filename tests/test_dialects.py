"""Diffusion LoRA dialects as the tools that make them name them (ComfyUI / diffusion-pipe / musubi-tuner / lightx2v
"original names", xlabs Flux, BFL control, LyCORIS `lycoris_` and Tucker), each checked against an fp64 reference:
read, converted to every format that can hold it and read back, merged into a single-file base with original names."""

import json

import pytest
import torch

import lorakit
from lorakit.errors import LorakitError
from lorakit.io import TensorFile, write_safetensors

from conftest import tiny_flux_transformer

g = torch.Generator().manual_seed(7)


def rnd(*s):
    return torch.randn(*s, generator=g)


def lora(prefix, down, up, shape, r, alpha=None, names=("lora_A.weight", "lora_B.weight")):
    """(tensors, fp64 delta) of one LoRA module in a dialect."""
    A, B = rnd(r, shape[1]), rnd(shape[0], r)
    t = {f"{prefix}.{names[0]}": A, f"{prefix}.{names[1]}": B}
    if alpha is not None:
        t[f"{prefix}.alpha"] = torch.tensor(alpha)
    return t, (alpha / r if alpha is not None else 1.0) * (B.double() @ A.double())


def close(x, ref):
    """Equal up to the factors' fp32 storage (LyCORIS products are stored as fp32 factors)."""
    return torch.allclose(x, ref, rtol=0, atol=1e-6 * float(ref.abs().max()))


def load(path, base):
    """Read as merge does: the base goes to the readers that resolve names against it."""
    from lorakit.commands.args import load_inputs

    return load_inputs([(str(path), 1.0)], str(base))[0][1]


def check_dialect(tmp_path, cli, base, tensors, expected, fmt="comfyui", writable=("lorakit", "comfyui")):
    """expected: {base tensor name: fp64 delta}. Read with the base, convert, merge with the CLI."""
    write_safetensors(tmp_path / "base.safetensors", base)
    write_safetensors(tmp_path / "lora.safetensors", tensors)
    ad = lorakit.load(tmp_path / "lora.safetensors", base=str(tmp_path / "base.safetensors"))
    assert ad.source_format == fmt
    got = {f"{n}.weight": m.delta(torch.float64) for n, m in ad.modules.items()}
    got.update({n: t.double() for n, t in ad.deltas.items()})
    assert set(got) == set(expected)
    for name, ref in expected.items():
        assert close(got[name], ref), name
    lorakit.convert(
        tmp_path / "lora.safetensors",
        tmp_path / "a.safetensors",
        to="lorakit",
        base=str(tmp_path / "base.safetensors"),
    )
    for to in writable:
        out = tmp_path / f"x.{to}"
        lorakit.convert(tmp_path / "a.safetensors", out, to=to)
        back = load(out, tmp_path / "base.safetensors")
        again = {f"{n}.weight": m.delta(torch.float64) for n, m in back.modules.items()}
        again.update({n: t.double() for n, t in back.deltas.items()})
        assert set(again) == set(expected), to
        for name, ref in expected.items():
            assert close(again[name], ref), (to, name)
    code, out, err = cli(
        "merge",
        tmp_path / "base.safetensors",
        tmp_path / "lora.safetensors",
        "-o",
        tmp_path / "m.safetensors",
        "--json",
    )
    assert code == 0, err
    merged = TensorFile(tmp_path / "m.safetensors")
    for name, W in base.items():
        want = W.double() + expected.get(name, 0)
        assert torch.allclose(merged.get(name).double(), want, rtol=0, atol=3e-7 * want.abs().max()), name
    return ad


def test_comfyui_wan_with_diff_and_diff_b(tmp_path, cli):
    """Wan as ComfyUI / diffusion-pipe save it: diffusion_model.<original path>, alpha, diff (norms), diff_b (biases);
    the base keeps Comfy-Org's unprefixed names."""
    base = {
        "blocks.0.self_attn.q.weight": rnd(24, 16),
        "blocks.0.self_attn.q.bias": rnd(24),
        "blocks.0.ffn.0.weight": rnd(32, 16),
        "blocks.0.norm3.weight": rnd(16),
        "head.head.weight": rnd(8, 16),
    }
    t, dq = lora("diffusion_model.blocks.0.self_attn.q", "", "", (24, 16), 4, alpha=2.0)
    t2, dffn = lora("diffusion_model.blocks.0.ffn.0", "", "", (32, 16), 2, alpha=8.0)
    t.update(t2)
    t["diffusion_model.blocks.0.self_attn.q.diff_b"] = rnd(24)
    t["diffusion_model.blocks.0.norm3.diff"] = rnd(16)
    expected = {
        "blocks.0.self_attn.q.weight": dq,
        "blocks.0.ffn.0.weight": dffn,
        "blocks.0.self_attn.q.bias": t["diffusion_model.blocks.0.self_attn.q.diff_b"].double(),
        "blocks.0.norm3.weight": t["diffusion_model.blocks.0.norm3.diff"].double(),
    }
    check_dialect(tmp_path, cli, base, t, expected)
    # formats without full-tensor deltas refuse them by name rather than drop them
    with pytest.raises(LorakitError, match="hold no full-tensor deltas"):
        lorakit.convert(tmp_path / "a.safetensors", tmp_path / "p", to="peft")
    # ComfyUI's own key layout on the way out: diffusion_model.<path>.diff / .diff_b
    keys = set(TensorFile(tmp_path / "x.comfyui").header.entries)
    assert "blocks.0.norm3.diff" in keys and "blocks.0.self_attn.q.diff_b" in keys


def test_hunyuan_video_diffusion_pipe_is_not_diffusers(tmp_path, cli):
    base = {"double_blocks.0.img_attn_qkv.weight": rnd(48, 16), "single_blocks.0.linear1.weight": rnd(40, 16)}
    t, d1 = lora("transformer.double_blocks.0.img_attn_qkv", "", "", (48, 16), 4)
    t2, d2 = lora("transformer.single_blocks.0.linear1", "", "", (40, 16), 2)
    t.update(t2)
    check_dialect(
        tmp_path,
        cli,
        base,
        t,
        {"double_blocks.0.img_attn_qkv.weight": d1, "single_blocks.0.linear1.weight": d2},
        writable=("lorakit", "comfyui", "kohya"),
    )


def test_qwen_image_lightx2v(tmp_path, cli):
    base = {
        "transformer_blocks.0.attn.to_q.weight": rnd(32, 16),
        "transformer_blocks.0.img_mlp.net.2.weight": rnd(16, 64),
    }
    t, d1 = lora(
        "transformer_blocks.0.attn.to_q",
        "",
        "",
        (32, 16),
        4,
        alpha=4.0,
        names=("lora_down.weight", "lora_up.weight"),
    )
    t2, d2 = lora(
        "transformer_blocks.0.img_mlp.net.2",
        "",
        "",
        (16, 64),
        8,
        alpha=2.0,
        names=("lora_down.weight", "lora_up.weight"),
    )
    t.update(t2)
    check_dialect(
        tmp_path,
        cli,
        base,
        t,
        {"transformer_blocks.0.attn.to_q.weight": d1, "transformer_blocks.0.img_mlp.net.2.weight": d2},
        writable=("lorakit", "comfyui", "kohya", "peft"),
    )


def test_xlabs_flux(tmp_path, cli):
    base = {
        "double_blocks.0.img_attn.qkv.weight": rnd(48, 16),
        "double_blocks.0.txt_attn.proj.weight": rnd(16, 16),
    }
    t, d1 = lora(
        "double_blocks.0.processor.qkv_lora1", "", "", (48, 16), 4, names=("down.weight", "up.weight")
    )
    t2, d2 = lora(
        "double_blocks.0.processor.proj_lora2", "", "", (16, 16), 4, names=("down.weight", "up.weight")
    )
    t.update(t2)
    check_dialect(
        tmp_path,
        cli,
        base,
        t,
        {"double_blocks.0.img_attn.qkv.weight": d1, "double_blocks.0.txt_attn.proj.weight": d2},
    )


def test_bfl_control_lora_replacements(tmp_path, cli):
    base = {
        "double_blocks.0.img_attn.qkv.weight": rnd(48, 16),
        "double_blocks.0.img_attn.norm.key_norm.scale": rnd(8),
    }
    t, d1 = lora("double_blocks.0.img_attn.qkv", "", "", (48, 16), 4)
    t["double_blocks.0.img_attn.norm.key_norm.scale"] = rnd(8)
    write_safetensors(tmp_path / "base.safetensors", base)
    write_safetensors(tmp_path / "c.safetensors", t)
    ad = lorakit.load(tmp_path / "c.safetensors", base=str(tmp_path / "base.safetensors"))
    assert ad.source_format == "comfyui"
    assert torch.equal(
        ad.replacements["double_blocks.0.img_attn.norm.key_norm.scale"],
        t["double_blocks.0.img_attn.norm.key_norm.scale"],
    )
    lorakit.merge(tmp_path / "base.safetensors", [tmp_path / "c.safetensors"], tmp_path / "m.safetensors")
    m = TensorFile(tmp_path / "m.safetensors")
    assert torch.equal(
        m.get("double_blocks.0.img_attn.norm.key_norm.scale"),
        t["double_blocks.0.img_attn.norm.key_norm.scale"],
    )


def test_lycoris_prefix_and_tucker(tmp_path, cli):
    """lycoris_<mangled path> (LyCORIS on DiTs), LoKr with a Tucker w2 and LoHa with Tucker factors on a conv,
    against ComfyUI's / LyCORIS' einsum formulas in fp64."""
    base = {
        "single_blocks.0.linear1.weight": rnd(12, 8),
        "img_in.weight": rnd(6, 4, 3, 3),
        "final_layer.conv.weight": rnd(4, 6, 3, 3),
    }
    t, R = {}, 2
    # LoKr: w1 full [3, 2], w2 = w2_a @ w2_b [4, 4] -> kron [12, 8]; alpha / rank of w2
    w1, w2a, w2b = rnd(3, 2), rnd(4, R), rnd(R, 4)
    t.update(
        {
            "lycoris_single_blocks_0_linear1.lokr_w1": w1,
            "lycoris_single_blocks_0_linear1.lokr_w2_a": w2a,
            "lycoris_single_blocks_0_linear1.lokr_w2_b": w2b,
            "lycoris_single_blocks_0_linear1.alpha": torch.tensor(1.0),
        }
    )
    d_lokr = torch.kron(w1.double(), w2a.double() @ w2b.double()) * (1.0 / R)
    # LoHa Tucker on img_in [6, 4, 3, 3]: w = einsum('ijkl,jr,ip->prkl', t, w_b, w_a)
    loha = {
        k: rnd(*s)
        for k, s in (
            ("hada_t1", (R, R, 3, 3)),
            ("hada_w1_a", (R, 6)),
            ("hada_w1_b", (R, 4)),
            ("hada_t2", (R, R, 3, 3)),
            ("hada_w2_a", (R, 6)),
            ("hada_w2_b", (R, 4)),
        )
    }
    t.update({f"lycoris_img_in.{k}": v for k, v in loha.items()})
    t["lycoris_img_in.alpha"] = torch.tensor(4.0)
    e = {k: v.double() for k, v in loha.items()}
    w1_ = torch.einsum("ijkl,jr,ip->prkl", e["hada_t1"], e["hada_w1_b"], e["hada_w1_a"])
    w2_ = torch.einsum("ijkl,jr,ip->prkl", e["hada_t2"], e["hada_w2_b"], e["hada_w2_a"])
    d_loha = w1_ * w2_ * (4.0 / R)
    # LoKr with lokr_t2 on a conv: w2 = einsum('ijkl,jr,ip->prkl', t2, w2_b, w2_a) [2, 3, 3, 3], w1 [2, 2]
    k1, kt, ka, kb = rnd(2, 2), rnd(R, R, 3, 3), rnd(R, 2), rnd(R, 3)
    t.update(
        {
            "lycoris_final_layer_conv.lokr_w1": k1,
            "lycoris_final_layer_conv.lokr_t2": kt,
            "lycoris_final_layer_conv.lokr_w2_a": ka,
            "lycoris_final_layer_conv.lokr_w2_b": kb,
        }
    )
    w2c = torch.einsum("ijkl,jr,ip->prkl", kt.double(), kb.double(), ka.double())
    d_conv = torch.kron(k1.double()[:, :, None, None].contiguous(), w2c.contiguous())  # no alpha: scale 1
    check_dialect(
        tmp_path,
        cli,
        base,
        t,
        {
            "single_blocks.0.linear1.weight": d_lokr,
            "img_in.weight": d_loha,
            "final_layer.conv.weight": d_conv,
        },
        fmt="kohya",
        writable=("lorakit", "comfyui", "kohya"),
    )


def test_unresolved_names_are_reported(tmp_path):
    write_safetensors(tmp_path / "base.safetensors", {"blocks.0.x.weight": torch.zeros(4, 4)})
    t, _ = lora("diffusion_model.blocks.9.y", "", "", (4, 4), 2, alpha=2.0)
    write_safetensors(tmp_path / "lora.safetensors", t)
    ad = lorakit.load(tmp_path / "lora.safetensors", base=str(tmp_path / "base.safetensors"))
    assert any("1 name(s) not found in the base" in n for n in ad.notes)
    with pytest.raises(
        LorakitError, match=r"\[LK601\] 1 of 1 modules .* diffusion_model.blocks.9.y \(nearest: "
    ):
        lorakit.merge(
            tmp_path / "base.safetensors", [tmp_path / "lora.safetensors"], tmp_path / "m.safetensors"
        )
    assert not (tmp_path / "m.safetensors").exists()
    assert json.loads(json.dumps(ad.notes))  # notes are plain strings


def test_skip_unmatched_merges_what_fits(tmp_path, cli):
    """A Flux LoRA with CLIP-L parts (lora_te1) into the transformer-only single file: the model's parts live in
    files of their own (as sd-scripts' flux_merge_lora takes them), so the transformer part is merged exactly and the
    text encoder's is reported as for another file; a name the base should have but lacks stays an error naming
    the way out (--skip-unmatched)."""
    from lorakit.naming.kohya import mangle

    W = rnd(48, 16)
    write_safetensors(tmp_path / "flux.safetensors", {"double_blocks.0.img_attn.qkv.weight": W})
    t, delta = lora(
        mangle("lora_unet", "double_blocks.0.img_attn.qkv"),
        "",
        "",
        (48, 16),
        4,
        alpha=4.0,
        names=("lora_down.weight", "lora_up.weight"),
    )
    te = mangle("lora_te1", "text_model.encoder.layers.0.self_attn.q_proj")
    t.update({f"{te}.lora_down.weight": rnd(4, 8), f"{te}.lora_up.weight": rnd(8, 4)})
    write_safetensors(tmp_path / "k.safetensors", t)
    code, out, err = cli(
        "merge",
        tmp_path / "flux.safetensors",
        tmp_path / "k.safetensors",
        "-o",
        tmp_path / "m.safetensors",
        "--json",
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["elsewhere"] == [f"{te}.weight"] and report["merged_count"] == 1 and report["skipped"] == []
    assert any("for another file of the model" in n for n in report["notes"])
    merged = TensorFile(tmp_path / "m.safetensors").get("double_blocks.0.img_attn.qkv.weight").double()
    assert torch.allclose(merged, W.double() + delta, rtol=0, atol=3e-7 * float(merged.abs().max()))
    # a transformer module the base lacks (another model): an error, and --skip-unmatched merges the rest
    t2, _ = lora(
        mangle("lora_unet", "double_blocks.1.img_attn.qkv"),
        "",
        "",
        (48, 16),
        4,
        names=("lora_down.weight", "lora_up.weight"),
    )
    write_safetensors(tmp_path / "k2.safetensors", {**t, **t2})
    code, out, err = cli(
        "merge", tmp_path / "flux.safetensors", tmp_path / "k2.safetensors", "-o", tmp_path / "m1.safetensors"
    )
    assert (
        code == 2
        and "match nothing in the base" in err
        and "--skip-unmatched merges the tensors the base has" in err
    )
    assert "Traceback" not in err and not (tmp_path / "m1.safetensors").exists()
    code, out, err = cli(
        "merge",
        tmp_path / "flux.safetensors",
        tmp_path / "k2.safetensors",
        "-o",
        tmp_path / "m1.safetensors",
        "--skip-unmatched",
        "--json",
    )
    assert code == 0, err
    report = json.loads(out)
    assert (
        report["skipped"] == ["lora_unet_double_blocks_1_img_attn_qkv.weight"] and report["merged_count"] == 1
    )
    # nothing at all in the base: still an error
    write_safetensors(tmp_path / "te.safetensors", {k: v for k, v in t.items() if k.startswith("lora_te1")})
    code, out, err = cli(
        "merge",
        tmp_path / "flux.safetensors",
        tmp_path / "te.safetensors",
        "-o",
        tmp_path / "m2.safetensors",
        "--skip-unmatched",
    )
    assert code == 2 and "[LK601] 1 of 1 modules (100% of ||dW||) match nothing in the base" in err


def test_fused_slices_sdxl_te2_and_flux_diffusers(tmp_path, cli):
    """LoRAs on q/k/v of a model whose single file stores them fused land on the right rows: SDXL's second text
    encoder (OpenCLIP in_proj_weight) from a kohya file, and Flux's qkv / linear1 from a diffusers-format file."""
    from lorakit.naming.kohya import mangle

    H, M = 8, 12
    te2 = "conditioner.embedders.1.model.transformer.resblocks.0."
    base = {
        f"{te2}attn.in_proj_weight": rnd(3 * H, H),
        f"{te2}mlp.c_fc.weight": rnd(M, H),
        "model.diffusion_model.double_blocks.0.img_attn.qkv.weight": rnd(3 * H, H),
        "model.diffusion_model.double_blocks.0.img_attn.proj.weight": rnd(H, H),
        "model.diffusion_model.single_blocks.0.linear1.weight": rnd(3 * H + M, H),
        "model.diffusion_model.img_in.weight": rnd(H, 4),
        "model.diffusion_model.final_layer.adaLN_modulation.1.weight": rnd(2 * H, H),
    }
    write_safetensors(tmp_path / "base.safetensors", base)
    expected = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in base.items()}
    kohya, diff = {}, {}
    for i, layer in enumerate(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")):
        t, d = lora(
            mangle("lora_te2", f"text_model.encoder.layers.0.{layer}"),
            "",
            "",
            (H, H),
            2,
            alpha=1.0,
            names=("lora_down.weight", "lora_up.weight"),
        )
        kohya.update(t)
        expected[f"{te2}attn.in_proj_weight"][i * H : (i + 1) * H] += d
    t, d = lora(
        mangle("lora_te2", "text_model.encoder.layers.0.mlp.fc1"),
        "",
        "",
        (M, H),
        2,
        alpha=4.0,
        names=("lora_down.weight", "lora_up.weight"),
    )
    kohya.update(t)
    expected[f"{te2}mlp.c_fc.weight"] += d
    for name, (rows, target) in {
        "transformer_blocks.0.attn.to_k": ((H, 2 * H), "double_blocks.0.img_attn.qkv"),
        "transformer_blocks.0.attn.to_out.0": ((0, H), "double_blocks.0.img_attn.proj"),
        "single_transformer_blocks.0.attn.to_v": ((2 * H, 3 * H), "single_blocks.0.linear1"),
        "single_transformer_blocks.0.proj_mlp": ((3 * H, 3 * H + M), "single_blocks.0.linear1"),
        "x_embedder": ((0, H), "img_in"),
    }.items():
        shape = (rows[1] - rows[0], base[f"model.diffusion_model.{target}.weight"].shape[1])
        t, d = lora(f"transformer.{name}", "", "", shape, 2)
        diff.update(t)
        expected[f"model.diffusion_model.{target}.weight"][rows[0] : rows[1]] += d
    t, d = lora(
        "transformer.norm_out.linear", "", "", (2 * H, H), 2
    )  # diffusers [scale, shift], BFL [shift, scale]
    diff.update(t)
    expected["model.diffusion_model.final_layer.adaLN_modulation.1.weight"] += torch.cat([d[H:], d[:H]])
    write_safetensors(tmp_path / "k.safetensors", kohya)
    write_safetensors(tmp_path / "d.safetensors", diff)
    code, out, err = cli(
        "merge",
        tmp_path / "base.safetensors",
        tmp_path / "k.safetensors",
        tmp_path / "d.safetensors",
        "-o",
        tmp_path / "m.safetensors",
        "--json",
    )
    assert code == 0, err
    assert json.loads(out)["merged_count"] == len(base)
    merged = TensorFile(tmp_path / "m.safetensors")
    for name, W in base.items():
        want = W.double() + expected[name]
        assert torch.allclose(merged.get(name).double(), want, rtol=0, atol=3e-7 * float(want.abs().max())), (
            name
        )


def test_flux_single_file_names_to_diffusers_split_fused_rows(tmp_path, cli):
    """A kohya Flux LoRA (BFL names, fused qkv / linear1) converted --to diffusers: one LoRA per slice with diffusers'
    names (norm_out.linear's halves swapped back); it merges into the BFL file exactly as the kohya file does, and the
    diffusers file reads back with the deltas of each slice."""
    H, M = 8, 12
    prefix = "model.diffusion_model."
    base = {
        f"{prefix}double_blocks.0.img_attn.qkv.weight": rnd(3 * H, H),
        f"{prefix}single_blocks.0.linear1.weight": rnd(3 * H + M, H),
        f"{prefix}final_layer.adaLN_modulation.1.weight": rnd(2 * H, H),
        f"{prefix}img_in.weight": rnd(H, 4),
    }
    write_safetensors(tmp_path / "base.safetensors", base)
    kohya, deltas = {}, {}
    for name, W in base.items():
        path = name[len(prefix) : -len(".weight")]
        t, d = lora(
            f"lora_unet_{path.replace('.', '_')}",
            "",
            "",
            tuple(W.shape),
            2,
            alpha=1.0,
            names=("lora_down.weight", "lora_up.weight"),
        )
        kohya.update(t)
        deltas[name] = d
    write_safetensors(tmp_path / "k.safetensors", kohya)
    code, out, err = cli(
        "convert",
        tmp_path / "k.safetensors",
        "--to",
        "diffusers",
        "--base",
        tmp_path / "base.safetensors",
        "-o",
        tmp_path / "d.safetensors",
        "--json",
    )
    assert code == 0, err
    assert any("split into one LoRA per slice" in n for n in json.loads(out)["notes"])
    back = lorakit.load(tmp_path / "d.safetensors")
    got = {n: m.delta(torch.float64) for n, m in back.modules.items()}
    qkv, lin1, final = (
        deltas[f"{prefix}{p}.weight"]
        for p in ("double_blocks.0.img_attn.qkv", "single_blocks.0.linear1", "final_layer.adaLN_modulation.1")
    )
    expected = {
        "transformer.transformer_blocks.0.attn.to_q": qkv[:H],
        "transformer.transformer_blocks.0.attn.to_k": qkv[H : 2 * H],
        "transformer.transformer_blocks.0.attn.to_v": qkv[2 * H :],
        "transformer.single_transformer_blocks.0.attn.to_q": lin1[:H],
        "transformer.single_transformer_blocks.0.attn.to_k": lin1[H : 2 * H],
        "transformer.single_transformer_blocks.0.attn.to_v": lin1[2 * H : 3 * H],
        "transformer.single_transformer_blocks.0.proj_mlp": lin1[3 * H :],
        "transformer.norm_out.linear": torch.cat([final[H:], final[:H]]),
        "transformer.x_embedder": deltas[f"{prefix}img_in.weight"],
    }
    assert set(got) == set(expected)
    for name, ref in expected.items():
        assert close(got[name], ref), name
    for src in ("k", "d"):
        assert (
            cli(
                "merge",
                tmp_path / "base.safetensors",
                tmp_path / f"{src}.safetensors",
                "-o",
                tmp_path / f"m{src}.safetensors",
            )[0]
            == 0
        )
    mk, md = TensorFile(tmp_path / "mk.safetensors"), TensorFile(tmp_path / "md.safetensors")
    for name, W in base.items():
        want = W.double() + deltas[name]
        assert torch.allclose(mk.get(name).double(), want, rtol=0, atol=3e-7 * float(want.abs().max())), name
        assert torch.allclose(md.get(name).double(), want, rtol=0, atol=3e-7 * float(want.abs().max())), name


def _wan(H):
    shapes = {f"blocks.0.{a}.{p}.weight": (H, H) for a in ("self_attn", "cross_attn") for p in "qkvo"}
    shapes.update(
        {
            "blocks.0.cross_attn.k_img.weight": (H, H),
            "blocks.0.cross_attn.v_img.weight": (H, H),
            "blocks.0.ffn.0.weight": (4 * H, H),
            "blocks.0.ffn.2.weight": (H, 4 * H),
            "time_embedding.0.weight": (H, 5),
            "time_embedding.2.weight": (H, H),
            "text_embedding.0.weight": (H, 6),
            "text_embedding.2.weight": (H, H),
            "time_projection.1.weight": (6 * H, H),
            "head.head.weight": (4, H),
            "img_emb.proj.1.weight": (H, 7),
            "img_emb.proj.3.weight": (H, H),
        }
    )
    return shapes


def _hunyuan_video(H):
    d = "double_blocks.0."
    shapes = {
        f"{d}img_attn_qkv.weight": (3 * H, H),
        f"{d}txt_attn_qkv.weight": (3 * H, H),
        f"{d}img_attn_proj.weight": (H, H),
        f"{d}txt_attn_proj.weight": (H, H),
        f"{d}img_mlp.fc1.weight": (4 * H, H),
        f"{d}img_mlp.fc2.weight": (H, 4 * H),
        f"{d}txt_mlp.fc1.weight": (4 * H, H),
        f"{d}txt_mlp.fc2.weight": (H, 4 * H),
        f"{d}img_mod.linear.weight": (6 * H, H),
        f"{d}txt_mod.linear.weight": (6 * H, H),
        "single_blocks.0.linear2.weight": (H, 5 * H),
        "single_blocks.0.modulation.linear.weight": (3 * H, H),
        "time_in.mlp.0.weight": (H, 5),
        "time_in.mlp.2.weight": (H, H),
        "guidance_in.mlp.0.weight": (H, 5),
        "guidance_in.mlp.2.weight": (H, H),
        "vector_in.in_layer.weight": (H, 6),
        "vector_in.out_layer.weight": (H, H),
        "final_layer.linear.weight": (4, H),
        "final_layer.adaLN_modulation.1.weight": (2 * H, H),
    }
    return shapes  # single blocks' linear1: diffusers' converter cuts it at a fixed 3072 rows (Flux's test covers it)


def _sd3(H):
    shapes = {
        "pos_embed": (1, 4, H),
        "x_embedder.proj.weight": (H, 4, 2, 2),
        "x_embedder.proj.bias": (H,),
        "context_embedder.weight": (H, 6),
        "context_embedder.bias": (H,),
    }
    for e in ("t_embedder", "y_embedder"):
        shapes.update(
            {
                f"{e}.mlp.0.weight": (H, 5),
                f"{e}.mlp.0.bias": (H,),
                f"{e}.mlp.2.weight": (H, H),
                f"{e}.mlp.2.bias": (H,),
            }
        )
    for i in (0, 1):  # block 1 is the last: its context block has only its (2-chunk) modulation
        blocks = ("x_block", "context_block") if i == 0 else ("x_block",)
        for b in blocks:
            p = f"joint_blocks.{i}.{b}."
            shapes.update(
                {
                    f"{p}attn.qkv.weight": (3 * H, H),
                    f"{p}attn.qkv.bias": (3 * H,),
                    f"{p}attn.proj.weight": (H, H),
                    f"{p}attn.proj.bias": (H,),
                    f"{p}mlp.fc1.weight": (4 * H, H),
                    f"{p}mlp.fc1.bias": (4 * H,),
                    f"{p}mlp.fc2.weight": (H, 4 * H),
                    f"{p}mlp.fc2.bias": (H,),
                    f"{p}adaLN_modulation.1.weight": (6 * H, H),
                    f"{p}adaLN_modulation.1.bias": (6 * H,),
                }
            )
        if i == 1:
            p = "joint_blocks.1.context_block."
            shapes.update(
                {
                    f"{p}attn.qkv.weight": (3 * H, H),
                    f"{p}attn.qkv.bias": (3 * H,),
                    f"{p}adaLN_modulation.1.weight": (2 * H, H),
                    f"{p}adaLN_modulation.1.bias": (2 * H,),
                }
            )
    shapes.update(
        {
            "final_layer.linear.weight": (4, H),
            "final_layer.linear.bias": (4,),
            "final_layer.adaLN_modulation.1.weight": (2 * H, H),
            "final_layer.adaLN_modulation.1.bias": (2 * H,),
        }
    )
    return shapes


@pytest.mark.parametrize("family", ["wan", "hunyuan_video", "sd3"])
def test_dit_maps_agree_with_diffusers_single_file_converters(tmp_path, cli, family):
    """The diffusers <-> original maps checked against diffusers' own single-file converters (linear maps: rename,
    cut, swap): a diffusers-format LoRA merged into the original file gives, through the converter, the converted
    base plus each delta; a ComfyUI LoRA on the original names converted --to diffusers gives the converter's image
    of its deltas."""
    sfu = pytest.importorskip("diffusers.loaders.single_file_utils")
    convert = {
        "wan": sfu.convert_wan_transformer_to_diffusers,
        "hunyuan_video": sfu.convert_hunyuan_video_transformer_to_diffusers,
        "sd3": sfu.convert_sd3_transformer_checkpoint_to_diffusers,
    }[family]
    shapes = {"wan": _wan, "hunyuan_video": _hunyuan_video, "sd3": _sd3}[family](8)
    prefix = "model.diffusion_model." if family != "hunyuan_video" else ""
    base = {f"{prefix}{k}": rnd(*s) for k, s in shapes.items()}
    reference = convert({k[len(prefix) :]: v.clone() for k, v in base.items()})
    linears = {k for k, v in reference.items() if k.endswith(".weight") and v.ndim == 2}
    lora_tensors, deltas = {}, {}
    for name in sorted(linears):
        t, d = lora(f"transformer.{name[: -len('.weight')]}", "", "", tuple(reference[name].shape), 2)
        lora_tensors.update(t)
        deltas[name] = d
    write_safetensors(tmp_path / "base.safetensors", base)
    write_safetensors(tmp_path / "d.safetensors", lora_tensors)
    code, out, err = cli(
        "merge",
        tmp_path / "base.safetensors",
        tmp_path / "d.safetensors",
        "-o",
        tmp_path / "m.safetensors",
        "--json",
    )
    assert code == 0, err
    merged = TensorFile(tmp_path / "m.safetensors")
    got = convert({k[len(prefix) :]: merged.get(k) for k in base})
    for name, W in reference.items():
        want = W.double() + deltas.get(name, 0)
        assert torch.allclose(got[name].double(), want, rtol=0, atol=3e-7 * float(want.abs().max())), name
    # the other way: original names -> diffusers names, cut and swapped as diffusers' converter does
    comfy, zero = {}, {k[len(prefix) :]: torch.zeros(v.shape, dtype=torch.float64) for k, v in base.items()}
    for name, W in base.items():
        if W.ndim == 2 and name.endswith(".weight"):
            bare = name[len(prefix) :]
            t, d = lora(f"diffusion_model.{bare[: -len('.weight')]}", "", "", tuple(W.shape), 2)
            comfy.update(t)
            zero[bare] += d
    write_safetensors(tmp_path / "c.safetensors", comfy)
    code, _, err = cli(
        "convert",
        tmp_path / "c.safetensors",
        "--to",
        "diffusers",
        "--base",
        tmp_path / "base.safetensors",
        "-o",
        tmp_path / "x.safetensors",
    )
    assert code == 0, err
    back = {
        f"{n[len('transformer.') :]}.weight": m.delta(torch.float64)
        for n, m in lorakit.load(tmp_path / "x.safetensors").modules.items()
    }
    want = convert(zero)
    assert set(back) == linears
    for name in linears:
        assert close(back[name], want[name].double()), name


def test_original_names_merge_into_diffusers_models(tmp_path, cli):
    """A kohya Flux LoRA (BFL names: fused qkv / linear1, final norm) and a ComfyUI Wan LoRA (original names) merged
    into tiny diffusers models built from diffusers' own classes (a transformer folder, and a pipeline folder): each
    fused LoRA lands on the diffusers tensors its slices became; the output loads in diffusers."""
    diffusers = pytest.importorskip("diffusers")
    flux = tiny_flux_transformer(guidance_embeds=False, axes_dims_rope=(2, 2, 0))
    wan = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=4,
        in_channels=4,
        out_channels=4,
        text_dim=8,
        freq_dim=8,
        ffn_dim=16,
        num_layers=1,
        rope_max_seq_len=32,
    )
    H = 8
    cases = {
        "flux": (
            flux,
            {
                "lora_unet_double_blocks_0_img_attn_qkv": [
                    ("transformer_blocks.0.attn.to_q", H),
                    ("transformer_blocks.0.attn.to_k", H),
                    ("transformer_blocks.0.attn.to_v", H),
                ],
                "lora_unet_single_blocks_0_linear1": [
                    ("single_transformer_blocks.0.attn.to_q", H),
                    ("single_transformer_blocks.0.attn.to_k", H),
                    ("single_transformer_blocks.0.attn.to_v", H),
                    ("single_transformer_blocks.0.proj_mlp", 4 * H),
                ],
                "lora_unet_final_layer_adaLN_modulation_1": [("norm_out.linear", 2 * H)],
                "lora_unet_img_in": [("x_embedder", H)],
            },
            ("lora_down.weight", "lora_up.weight"),
        ),
        "wan": (
            wan,
            {
                "diffusion_model.blocks.0.self_attn.q": [("blocks.0.attn1.to_q", H)],
                "diffusion_model.blocks.0.cross_attn.o": [("blocks.0.attn2.to_out.0", H)],
                "diffusion_model.blocks.0.ffn.0": [("blocks.0.ffn.net.0.proj", 16)],
                "diffusion_model.head.head": [("proj_out", 16)],
            },
            ("lora_A.weight", "lora_B.weight"),
        ),
    }
    for family, (model, modules, parts) in cases.items():
        folder = tmp_path / family
        model.save_pretrained(folder / "pipe" / "transformer")
        (folder / "pipe" / "model_index.json").write_text(json.dumps({"transformer": ["diffusers", "x"]}))
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        tensors, expected = {}, {}
        for name, pieces in modules.items():
            cols = state[f"{pieces[0][0]}.weight"].shape[1]
            t, d = lora(name, "", "", (sum(r for _, r in pieces), cols), 2, alpha=2.0, names=parts)
            tensors.update(t)
            start = 0
            for target, rows in pieces:
                piece = d[start : start + rows]
                if target == "norm_out.linear":  # BFL [shift, scale] -> diffusers [scale, shift]
                    piece = torch.cat([piece[rows // 2 :], piece[: rows // 2]])
                expected[f"{target}.weight"] = piece
                start += rows
        write_safetensors(folder / "lora.safetensors", tensors)
        for base, out in ((folder / "pipe" / "transformer", folder / "t"), (folder / "pipe", folder / "p")):
            code, _, err = cli("merge", base, folder / "lora.safetensors", "-o", out)
            assert code == 0, (family, err)
        for out in (folder / "t", folder / "p" / "transformer"):
            merged = type(model).from_pretrained(out).state_dict()  # loads in diffusers
            for name, W in state.items():
                want = W.double() + expected.get(name, 0)
                assert torch.allclose(
                    merged[name].double(), want, rtol=0, atol=3e-7 * float(want.abs().max())
                ), (family, name)
