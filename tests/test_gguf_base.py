"""GGUF base models (llama.cpp): merge keeps every block type's grid, KVs and untouched tensors byte for byte; the
codecs agree with the gguf package's dequantization; inspect / extract / convert read GGUF bases."""

import json
import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf.constants import GGMLQuantizationType as T  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

import lorakit  # noqa: E402
from lorakit.core import Adapter, Module  # noqa: E402
from lorakit.examples import TensorDict, quantize_gguf  # noqa: E402
from lorakit.quant.gguf import TYPES, GGUFBlocks  # noqa: E402
from conftest import assert_one_line_error  # noqa: E402

HIDDEN, INTER, HEADS, KV_HEADS, VOCAB = 256, 512, 4, 2, 64
KVD = HIDDEN // HEADS * KV_HEADS
DIMS = {
    "attn_q": (HIDDEN, HIDDEN),
    "attn_k": (KVD, HIDDEN),
    "attn_v": (KVD, HIDDEN),
    "attn_output": (HIDDEN, HIDDEN),
    "ffn_gate": (INTER, HIDDEN),
    "ffn_up": (INTER, HIDDEN),
    "ffn_down": (HIDDEN, INTER),
}
HF = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "ffn_down": "mlp.down_proj",
}
LEGACY = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")  # types gguf-py quantizes itself


def packed(kind, out, inn, rng):
    """Blocks of a type gguf-py cannot quantize, packed by hand: random codes and scales, fp16 super-scales sane."""
    bt = TYPES.get(kind)
    block, size = gguf.GGML_QUANT_SIZES[T[kind]]
    raw = rng.integers(0, 256, size=(out, inn // block, size), dtype=np.uint8)
    for off in ([bt.d] + ([bt.dmin] if bt.dmin is not None else [])) if bt else [0]:
        raw[:, :, off : off + 2] = (
            (np.abs(rng.standard_normal((out, inn // block, 1))) * 2e-3 + 1e-3)
            .astype(np.float16)
            .view(np.uint8)
        )
    return raw.reshape(out, -1)


def weight(kind, out, inn, rng):
    if kind in ("F32", "F16"):
        return (rng.standard_normal((out, inn)) * 0.02).astype(
            np.float32 if kind == "F32" else np.float16
        ), None
    if kind == "BF16":
        w = torch.from_numpy((rng.standard_normal((out, inn)) * 0.02).astype(np.float32)).bfloat16()
        return w.view(torch.int16).numpy().view(np.uint16), T.BF16
    if kind in LEGACY:
        return quantize((rng.standard_normal((out, inn)) * 0.02).astype(np.float32), T[kind]), T[kind]
    return packed(kind, out, inn, rng), T[kind]


def build(path, kind, layers=2, seed=0, split=0, types=None):
    """A tiny Llama GGUF: linear weights in `kind` (or per tensor from `types`), norms F32, token_embd F16."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(os.fspath(path), "llama", split_max_tensors=split)
    w.add_block_count(layers)
    w.add_uint32("llama.attention.head_count", HEADS)
    w.add_uint32("llama.attention.head_count_kv", KV_HEADS)
    w.add_string("general.name", "tiny")
    w.add_tensor("token_embd.weight", rng.standard_normal((VOCAB, HIDDEN)).astype(np.float16))
    for layer in range(layers):
        w.add_tensor(f"blk.{layer}.attn_norm.weight", np.ones(HIDDEN, np.float32))
        for n, (o, i) in DIMS.items():
            name = f"blk.{layer}.{n}.weight"
            data, raw = weight((types or {}).get(name, kind), o, i, rng)
            w.add_tensor(name, data, raw_dtype=raw)
    w.add_tensor("output.weight", (rng.standard_normal((VOCAB, HIDDEN)) * 0.02).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def adapter(scale=0.05, seed=1, layers=2):
    """Rank-4 LoRA on q, k, v and down_proj with Hugging Face names (Q/K rows in Hugging Face's order)."""
    g = torch.Generator().manual_seed(seed)
    ad = Adapter()
    for layer in range(layers):
        for n, hf in HF.items():
            o, i = DIMS[n]
            ad.add(
                Module(
                    f"model.layers.{layer}.{hf}",
                    torch.randn(4, i, generator=g) * scale,
                    torch.randn(o, 4, generator=g) * scale,
                    alpha=8.0,
                )
            )
    return ad


def llama_cpp_rows(rows, n_head):
    """llama.cpp's Q/K row order written out (convert_hf_to_gguf's permute): within each head, row 2i comes from the
    first rotary half's row i and row 2i + 1 from the second half's row i."""
    d = rows.shape[0] // n_head
    order = [h * d + (j // 2 if j % 2 == 0 else d // 2 + j // 2) for h in range(n_head) for j in range(d)]
    return rows[order]


def tensors(path):
    r = gguf.GGUFReader(os.fspath(path))
    return r, {t.name: t for t in r.tensors}


def values(t):
    shape = [int(d) for d in reversed(list(t.shape))]
    if t.tensor_type in (T.F32, T.F16):
        return torch.from_numpy(np.array(t.data, dtype=np.float64)).reshape(shape)
    if t.tensor_type == T.BF16:
        return (
            torch.from_numpy(np.array(t.data).view(np.int16).copy())
            .view(torch.bfloat16)
            .double()
            .reshape(shape)
        )
    return torch.from_numpy(dequantize(np.array(t.data), t.tensor_type).astype(np.float64)).reshape(shape)


def delta64(ad, gguf_name, terms=False):
    """The fp64 delta of a GGUF tensor in llama.cpp's row order (terms: the size of its terms, |B| |A| scale)."""
    layer, part = gguf_name.split(".")[1], gguf_name.split(".")[2]
    m = ad.modules[f"model.layers.{layer}.{HF[part]}"]
    B, A = (m.B.double().abs(), m.A.double().abs()) if terms else (m.B.double(), m.A.double())
    D = B @ A * m.scale
    if part in ("attn_q", "attn_k"):
        D = llama_cpp_rows(D, HEADS if part == "attn_q" else KV_HEADS)
    return D


def as_checkpoint(kind, shape, raw):
    """One tensor's GGUF bytes as a checkpoint of the QuantFormat interface."""
    return TensorDict({"w": torch.from_numpy(np.array(raw).reshape(-1).copy())}, {"w": (kind, tuple(shape))})


def grid_bounds(kind, base_tensor):
    """Each element's grid step |S| = |d * sc| and the lowest and highest value its sub-block can hold (the codec's
    grid, checked against gguf's dequantization in the test above)."""
    shape = tuple(int(d) for d in reversed(list(base_tensor.shape)))
    g = GGUFBlocks().grid(as_checkpoint(kind, shape, base_tensor.data), {"weight": "w"})
    S, Z = g.columns(0, len(g.g))
    S, Z = S.double(), (Z.double() if Z is not None else 0.0)
    a, b = S * (g.codebook.lo - Z), S * (g.codebook.hi - Z)  # Q4_0's d is negative where the extreme value is
    return S.abs(), torch.minimum(a, b), torch.maximum(a, b)


def merged_ffn_down(tmp_path, kind, strategy, **adapter_args):
    """(the base's blk.0.ffn_down tensor, the merged one, W + dW in fp64) of a one-layer `kind` base merged with
    `strategy`."""
    base = build(tmp_path / "base.gguf", kind, layers=1)
    ad = adapter(layers=1, **adapter_args)
    ad.save(tmp_path / "ad.safetensors")
    lorakit.merge(base, [tmp_path / "ad.safetensors"], tmp_path / "out.gguf", strategy=strategy, quiet=True)
    _, t0 = tensors(base)
    _, t1 = tensors(tmp_path / "out.gguf")
    name = "blk.0.ffn_down.weight"
    return t0[name], t1[name], values(t0[name]) + delta64(ad, name)


def block_d(raw, kind):
    """Each block's fp16 d in fp64 (the legacy types keep it in a block's first two bytes)."""
    return np.array(raw).reshape(-1, TYPES[kind].size)[:, :2].copy().view(np.float16)[:, 0].astype(np.float64)


@pytest.mark.parametrize("kind", list(TYPES))
def test_codecs_agree_with_gguf_dequantize_and_repack_byte_for_byte(kind):
    rng = np.random.default_rng(3)
    raw = (
        packed(kind, 6, 512, rng)
        if kind not in LEGACY
        else quantize((rng.standard_normal((6, 512)) * 0.1).astype(np.float32), T[kind])
    )

    fmt, m, ckpt = GGUFBlocks(), {"weight": "w"}, as_checkpoint(kind, (6, 512), raw)
    ref = dequantize(raw, T[kind]).astype(np.float32)
    assert np.array_equal(fmt.dequantize(ckpt, m).numpy(), ref)  # ggml's own arithmetic
    grid = fmt.grid(ckpt, m)
    S, Z = grid.columns(0, 512)
    c = grid.codebook.values(fmt.codes(ckpt, m))
    np.testing.assert_allclose(
        ((c - Z) * S if Z is not None else c * S).numpy(), ref, rtol=0, atol=1e-6 * np.abs(ref).max()
    )
    assert np.array_equal(fmt.encode(ckpt, m, fmt.codes(ckpt, m), grid)["w"].numpy(), raw.reshape(-1))


@pytest.mark.parametrize("kind", list(TYPES))
def test_fixture_quantizer_is_the_nearest_code_on_its_fit(kind):
    """examples.quantize_gguf (the benchmark's fixtures, --strategy rescale's fit): gguf's dequantization of its
    bytes is within half a step of W everywhere, and the steps are those of a min/max fit."""
    W = torch.randn(8, 512, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.02
    raw = quantize_gguf(W.float(), kind).numpy().reshape(8, -1)
    got = torch.from_numpy(dequantize(raw, T[kind]).astype(np.float64))

    class Info:
        shape, data = (512, 8), raw

    S, low, high = grid_bounds(kind, Info)
    assert bool(((got - W).abs() <= S / 2 * (1 + 1e-3) + 1e-9).all())
    assert float((low - W).clamp(min=0).max()) < 1e-7 and float((W - high).clamp(min=0).max()) < 1e-7


@pytest.mark.parametrize("kind", list(TYPES) + ["F16", "F32", "BF16"])
def test_merge_keeps_type_size_kvs_and_untouched_bytes(tmp_path, kind, cli):
    base = build(tmp_path / "base.gguf", kind)
    ad = adapter(scale=0.01)  # ||dW|| / ||W|| ~ 1e-2
    ad.save(tmp_path / "ad.safetensors")
    out = tmp_path / "out.gguf"
    assert (
        cli("merge", base, tmp_path / "ad.safetensors", "-o", out, "--strategy", "same-grid", "--quiet")[0]
        == 0
    )
    assert os.path.getsize(out) == os.path.getsize(base)
    (r0, t0), (r1, t1) = tensors(base), tensors(out)
    assert [
        (k, f.types, [bytes(p) for p in f.parts]) for k, f in r0.fields.items() if not k.startswith("GGUF.")
    ] == [
        (k, f.types, [bytes(p) for p in f.parts]) for k, f in r1.fields.items() if not k.startswith("GGUF.")
    ]
    assert list(t0) == list(t1)
    touched = 0
    for name, t in t0.items():
        assert t1[name].tensor_type == t.tensor_type
        part = name.split(".")[2] if name.startswith("blk.") else None
        if part not in HF:
            assert bytes(t1[name].data) == bytes(t.data), name  # untouched: byte for byte
            continue
        touched += 1
        target = values(t) + delta64(ad, name)
        err = (values(t1[name]) - target).abs()
        if kind in ("F16", "F32", "BF16"):  # exact in fp32, rounded once
            info = torch.finfo({"F16": torch.float16, "F32": torch.float32, "BF16": torch.bfloat16}[kind])
            # one rounding of the output, plus fp32's in W + B A (of the size of the terms, not of their sum)
            size = values(t).abs() + delta64(ad, name, terms=True)
            ulp = torch.maximum(size * 2 * info.eps, torch.full((), info.smallest_normal * info.eps))
            assert bool((err <= ulp).all()), name
        else:  # the nearest code on the stored grid: half a step, or the distance to the sub-block's range
            S, low, high = grid_bounds(kind, t)
            outside = (low - target).clamp(min=0) + (target - high).clamp(min=0)
            bound = torch.where(outside > 0, outside + S * 1e-4, S / 2 * (1 + 1e-4)) + 1e-9
            assert bool((err <= bound).all()), (name, float((err - bound).max()))
            # the half-step bound has teeth: random 2-bit codes sit on an extreme half the time, the rest rarely
            assert float((outside > 0).double().mean()) < (0.35 if TYPES[kind].bits <= 3 else 0.15), name
    assert touched == 8


def test_feedback_keeps_the_adapter_in_its_input_subspace(tmp_path):
    """||dW||/||W|| = 1e-2 on Q8_0: feedback keeps >= 90% and the aligned probe error stays small."""
    base = build(tmp_path / "base.gguf", "Q8_0")
    ad = adapter(scale=0.0072)
    ad.save(tmp_path / "ad.safetensors")
    report = lorakit.merge(
        base, [tmp_path / "ad.safetensors"], tmp_path / "out.gguf", strategy="feedback", quiet=True
    )
    q = report["quantization"]
    assert q["format"] == "gguf" and q["strategy"] == "feedback" and len(q["modules"]) == 8
    assert {m["type"] for m in q["modules"]} == {"Q8_0"}
    assert all(m["retention"] >= 0.9 for m in q["modules"]), q["modules"]
    rel = [m["relative_delta"] for m in q["modules"]]
    assert 0.007 < min(rel) and max(rel) < 0.014
    same = lorakit.merge(
        base, [tmp_path / "ad.safetensors"], tmp_path / "same.gguf", strategy="same-grid", quiet=True
    )["quantization"]
    assert q["mean_probe_error_aligned"] < 0.5 * same["mean_probe_error_aligned"]
    # the report's aligned error, recomputed from the written file through the gguf package
    _, t0 = tensors(base)
    _, t1 = tensors(tmp_path / "out.gguf")
    name = "blk.0.attn_q.weight"
    m = ad.modules["model.layers.0.self_attn.q_proj"]
    E = values(t1[name]) - values(t0[name]) - delta64(ad, name)
    A = m.A.double()
    assert float((E @ A.T).norm() / (delta64(ad, name) @ A.T).norm()) < 0.3


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_1", "Q5_0", "Q3_K", "Q4_K", "Q6_K", "Q2_K"])
def test_rescale_fits_fresh_block_scales(tmp_path, kind):
    """--strategy rescale: new d (and dmin, sub-block scales) that cover W + dW; checked by gguf's dequantization."""
    old, new, target = merged_ffn_down(tmp_path, kind, "rescale")
    got = values(new)
    assert bytes(new.data) != bytes(old.data)
    # the fresh grid (read back from the written bytes) holds every target: nearest code, half its step
    S, low, high = grid_bounds(kind, new)
    outside = (low - target).clamp(min=0) + (target - high).clamp(min=0)
    assert float((outside / S).max()) < 0.02  # covered, up to the fp16 rounding of d
    assert bool(((got - target).abs() <= S / 2 * (1 + 1e-3) + outside + 1e-9).all())
    # and the steps are those of a min/max fit: near each sub-block's range over its levels
    sub, levels = TYPES[kind].sub, (1 << TYPES[kind].bits) - 1
    blocks = target.reshape(target.shape[0], -1, sub)
    span = blocks.amax(-1).clamp(min=0) - blocks.amin(-1).clamp(max=0)
    ratio = S.reshape(target.shape[0], -1, sub)[..., 0] / (span / levels)
    assert 0.99 < float(ratio.median()) < 1.6, float(ratio.median())


@pytest.mark.parametrize("kind", ["Q4_0", "Q5_0", "Q6_K", "Q3_K", "Q8_0"])
def test_rescale_puts_the_longer_code_side_on_the_larger_extreme(tmp_path, kind):
    """Symmetric types store codes -Z0..Z0-1: ggml's quantizers give a block whose largest magnitude is positive a
    negative scale, so that it takes the code -Z0 (Q4_0: steps of max / 8, not / 7); rescale fits the same way.
    Q4_0 / Q5_0: d as gguf-py's (ggml's reference) quantizer sets it, up to d's fp16 rounding outward, where the
    other side fits in Z0 - 1 steps; where it does not, ggml clips it and rescale widens the step (at most Z0 / (Z0 -
    1) times) so that nothing is clipped. Q8_0: d positive, as ggml writes it, covering the range with the codes
    -128..127 (ggml's max |x| / 127, or up to 128 / 127 finer where the largest magnitude is negative)."""
    _, new, target = merged_ffn_down(tmp_path, kind, "rescale")
    shape = tuple(int(d) for d in reversed(list(new.shape)))
    S = GGUFBlocks().grid(as_checkpoint(kind, shape, new.data), {"weight": "w"}).S.T.double()
    sub = target.reshape(target.shape[0], -1, TYPES[kind].sub)
    extreme = sub.gather(-1, sub.abs().argmax(-1, keepdim=True))[..., 0]
    if kind == "Q8_0":
        assert bool((S > 0).all())
    else:
        assert bool(((S < 0) == (extreme > 0)).all())  # the sign of every (sub-)block's scale
    bound, low, high = grid_bounds(kind, new)
    assert bool(((values(new) - target).abs() <= bound / 2 * (1 + 1e-3) + 1e-9).all())
    if kind not in LEGACY:  # gguf-py's quantizer: the legacy types
        return
    ratio = S / torch.from_numpy(block_d(quantize(target.float().numpy(), T[kind]), kind)).reshape(S.shape)
    if kind == "Q8_0":
        assert float(ratio.min()) >= 127 / 128 * (1 - 2**-11) and float(ratio.max()) <= 1 + 2**-10
        assert float(ratio[extreme > 0].min()) >= 1 - 2**-11  # the positive side holds 127 codes, as ggml's
    else:
        z0 = TYPES[kind].zero
        other = torch.where(extreme > 0, -sub.amin(-1), sub.amax(-1))  # the opposite side's largest magnitude
        fits = other <= extreme.abs() * (z0 - 1) / z0
        assert 0.3 < float(fits.double().mean()) < 1
        assert float(ratio[fits].min()) >= 1 - 2**-11 and float(ratio[fits].max()) <= 1 + 2**-10
        assert float(ratio.min()) >= 1 - 2**-11 and float(ratio.max()) <= z0 / (z0 - 1) * (1 + 2**-10)


def test_refit_keeps_a_negative_scale_grid_that_holds_the_targets(tmp_path):
    """ggml's Q4_0 gives about half its blocks a negative d; refit's grid covers the stored range and the targets'
    in those as in positive ones: the same sign, |d| never below the stored one, and within fp16's rounding of it
    where the targets stay inside (the ends of a negative grid were once read swapped: such blocks were fitted to
    the targets alone)."""
    old, new, _ = merged_ffn_down(tmp_path, "Q4_0", "refit", scale=0.002)  # far inside every block's range
    d0, d1 = block_d(old.data, "Q4_0"), block_d(new.data, "Q4_0")
    assert 0.3 < float((d0 < 0).mean()) < 0.7
    assert np.array_equal(np.sign(d0), np.sign(d1))
    assert bool((np.abs(d1) >= np.abs(d0)).all())
    assert float(np.mean(np.abs(d1) <= np.abs(d0) * (1 + 2**-9))) > 0.9


def test_unsupported_types_refused_or_written_f16(tmp_path, cli):
    base = build(tmp_path / "base.gguf", "Q8_0", layers=1, types={"blk.0.attn_q.weight": "IQ4_NL"})
    ad = adapter(layers=1)
    ad.save(tmp_path / "ad.safetensors")
    out = tmp_path / "out.gguf"
    code, _, err = cli("merge", base, tmp_path / "ad.safetensors", "-o", out, "--quiet")
    assert code == 2 and "IQ4_NL" in err and "--dtype f16" in err
    assert not out.exists()
    with pytest.raises(
        lorakit.LorakitError,
        match=r"blk\.0\.attn_q\.weight'.*IQ4_NL.*--dtype f16|"
        r"blk\.0\.attn_q\.weight'.*IQ4_NL.*dtype",
    ):
        lorakit.merge(base, [tmp_path / "ad.safetensors"], out, quiet=True)
    report = lorakit.merge(base, [tmp_path / "ad.safetensors"], out, dtype="f16", quiet=True)
    assert any("IQ4_NL" in n and "F16" in n.upper() for n in report["notes"])
    _, t0 = tensors(base)
    _, t1 = tensors(out)
    assert t1["blk.0.attn_q.weight"].tensor_type == T.F16
    target = values(t0["blk.0.attn_q.weight"]) + delta64(ad, "blk.0.attn_q.weight")
    torch.testing.assert_close(values(t1["blk.0.attn_q.weight"]), target, rtol=1e-3, atol=1e-4)
    assert t1["blk.0.attn_k.weight"].tensor_type == T.Q8_0  # the others keep their type
    assert bytes(t1["blk.0.ffn_up.weight"].data) == bytes(t0["blk.0.ffn_up.weight"].data)


def test_split_gguf_in_split_gguf_out(tmp_path):
    base = build(tmp_path / "model.gguf", "Q4_K", split=6)
    first = tmp_path / "model-00001-of-00003.gguf"
    assert first.exists() and not (tmp_path / "model-00004-of-00003.gguf").exists()
    ad = adapter()
    ad.save(tmp_path / "ad.safetensors")
    report = lorakit.merge(first, [tmp_path / "ad.safetensors"], tmp_path / "merged.gguf", quiet=True)
    outs = [tmp_path / f"merged-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert report["files"] == [os.fspath(p) for p in outs] and report["merged_count"] == 8
    assert report["shard_count"] == 3
    for i, o in enumerate(outs, 1):
        src = tmp_path / f"model-0000{i}-of-00003.gguf"
        assert os.path.getsize(o) == os.path.getsize(src)
        (_, t0), (r1, t1) = tensors(src), tensors(o)
        assert r1.fields["split.no"].contents() == i - 1 and list(t0) == list(t1)
    # the splits read as one model: lorakit's own reader sees every tensor once
    from lorakit.bases import open_base

    view = open_base(outs[0]).view
    assert len(view.names) == 2 + 2 * (1 + len(DIMS))
    with pytest.raises(lorakit.LorakitError, match="split 2 of 3: pass the first one"):
        lorakit.merge(
            tmp_path / "model-00002-of-00003.gguf", [tmp_path / "ad.safetensors"], tmp_path / "x.gguf"
        )
    del base


def test_gguf_lora_merges_into_gguf_base(tmp_path):
    """A llama.cpp LoRA (llama.cpp names, permuted rows) into a GGUF base: heads from the base's KVs."""
    base = build(tmp_path / "base.gguf", "F32", layers=1)
    ad = adapter(layers=1)
    lora = tmp_path / "lora.gguf"
    cfg = tmp_path / "hf"
    cfg.mkdir()
    (cfg / "config.json").write_text(
        json.dumps({"num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS})
    )
    ad.save(lora, format="gguf", base=str(cfg))
    # llama.cpp's converter wrote no head counts into the LoRA: the reader takes them from the GGUF base
    lorakit.merge(base, [lora], tmp_path / "a.gguf", quiet=True)
    ad.save(tmp_path / "ad.safetensors")
    lorakit.merge(base, [tmp_path / "ad.safetensors"], tmp_path / "b.gguf", quiet=True)
    _, ta = tensors(tmp_path / "a.gguf")
    _, tb = tensors(tmp_path / "b.gguf")
    _, t0 = tensors(base)
    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight"):
        torch.testing.assert_close(values(ta[name]), values(tb[name]), rtol=0, atol=1e-7)
        torch.testing.assert_close(values(tb[name]), values(t0[name]) + delta64(ad, name), rtol=0, atol=1e-6)


def test_inspect_extract_convert_read_gguf_bases(tmp_path, cli):
    base = build(tmp_path / "base.gguf", "F32", layers=1)
    ad = adapter(layers=1)
    ad.save(tmp_path / "ad.safetensors")
    lorakit.merge(base, [tmp_path / "ad.safetensors"], tmp_path / "tuned.gguf", quiet=True)
    # inspect --base: ||dW|| / ||W|| against the GGUF tensor of each module
    report = lorakit.inspect(tmp_path / "ad.safetensors", base=base, spectrum=True, quiet=True)
    row = next(r for r in report["modules"] if r["module"] == "model.layers.0.self_attn.q_proj")
    _, t0 = tensors(base)
    assert row["base_norm"] == pytest.approx(float(values(t0["blk.0.attn_q.weight"]).norm()), rel=1e-6)
    # extract from two GGUFs: Hugging Face names and row order again
    lorakit.extract(base, tmp_path / "tuned.gguf", tmp_path / "ex.safetensors", rank=4, quiet=True)
    ex = lorakit.load(tmp_path / "ex.safetensors")
    assert set(ex.modules) == set(ad.modules)
    for name, m in ad.modules.items():
        torch.testing.assert_close(
            ex.modules[name].delta(torch.float64), m.delta(torch.float64), rtol=0, atol=1e-5
        )
    # convert --to gguf --base model.gguf: head counts from the base's KVs
    assert (
        cli(
            "convert",
            tmp_path / "ad.safetensors",
            "--to",
            "gguf",
            "--base",
            base,
            "-o",
            tmp_path / "lora.gguf",
            "--quiet",
        )[0]
        == 0
    )
    _, tl = tensors(tmp_path / "lora.gguf")
    b = torch.from_numpy(np.array(tl["blk.0.attn_q.weight.lora_b"].data, dtype=np.float64))
    m = ad.modules["model.layers.0.self_attn.q_proj"]
    torch.testing.assert_close(b.reshape(m.B.shape), llama_cpp_rows(m.B.double(), HEADS), rtol=0, atol=0)


def test_bad_gguf_bases_are_one_line_errors(tmp_path, cli):
    base = build(tmp_path / "base.gguf", "Q8_0", layers=1)
    ad = adapter(layers=1)
    ad.save(tmp_path / "ad.safetensors")
    data = base.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    lora = tmp_path / "lora.gguf"
    cfg = tmp_path / "hf"
    cfg.mkdir()
    (cfg / "config.json").write_text(
        json.dumps({"num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS})
    )
    ad.save(lora, format="gguf", base=str(cfg))
    cases = [
        ([str(cut)], "runs past the end of the file"),
        ([str(lora)], "llama.cpp LoRA adapter"),
        ([str(base), "-o", str(tmp_path / "o.safetensors")], "the output is GGUF"),
    ]
    for args, message in cases:
        argv = ["merge", *args[:1], tmp_path / "ad.safetensors", "-o", *(args[2:] or [tmp_path / "o.gguf"])]
        before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
        code, _, err = cli(*argv)
        assert code == 2 and message in err and "\n" not in err.strip() and "Traceback" not in err, err
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_original_strategy_from_the_f32_gguf(tmp_path):
    """--strategy original: W + dW quantized afresh from the full-precision GGUF the base was quantized from."""
    base = build(tmp_path / "base.gguf", "Q8_0", layers=1)
    full = build(tmp_path / "full.gguf", "F32", layers=1)  # the same draws: the weights the base quantized
    ad = adapter(layers=1)
    ad.save(tmp_path / "ad.safetensors")
    with pytest.raises(lorakit.LorakitError, match="GGUF it was quantized from"):
        lorakit.merge(
            base,
            [tmp_path / "ad.safetensors"],
            tmp_path / "x.gguf",
            strategy="original",
            full_precision_base=tmp_path / "ad.safetensors",
        )
    lorakit.merge(
        base,
        [tmp_path / "ad.safetensors"],
        tmp_path / "out.gguf",
        strategy="original",
        full_precision_base=full,
        quiet=True,
    )
    _, tf = tensors(full)
    _, t1 = tensors(tmp_path / "out.gguf")
    name = "blk.0.attn_k.weight"
    target = values(tf[name]) + delta64(ad, name)
    S, low, high = grid_bounds("Q8_0", t1[name])
    assert bool(((values(t1[name]) - target).abs() <= S / 2 * (1 + 1e-3) + 1e-9).all())
    assert float((low - target).clamp(min=0).max()) == 0 and float((target - high).clamp(min=0).max()) == 0


def test_embedding_and_stochastic(tmp_path):
    """An adapter on embed_tokens lands on token_embd (F16: exact); --strategy stochastic on Q5_K keeps the stored
    scales and rounds each code to a neighbour of the target, unbiased."""
    base = build(tmp_path / "base.gguf", "Q5_K", layers=1)
    g = torch.Generator().manual_seed(5)
    ad = Adapter()
    ad.add(
        Module(
            "model.embed_tokens",
            torch.randn(3, HIDDEN, generator=g) * 0.1,
            torch.randn(VOCAB, 3, generator=g) * 0.1,
            alpha=3.0,
            kind="embedding",
        )
    )  # dW = B A: [vocab, embd], as the weight
    o, i = DIMS["ffn_up"]
    ad.add(
        Module(
            "model.layers.0.mlp.up_proj",
            torch.randn(4, i, generator=g) * 0.05,
            torch.randn(o, 4, generator=g) * 0.05,
            alpha=4.0,
        )
    )
    ad.save(tmp_path / "ad.safetensors")
    report = lorakit.merge(
        base, [tmp_path / "ad.safetensors"], tmp_path / "out.gguf", strategy="stochastic", seed=3, quiet=True
    )
    assert report["merged_count"] == 2
    _, t0 = tensors(base)
    _, t1 = tensors(tmp_path / "out.gguf")
    want = values(t0["token_embd.weight"]) + ad.modules["model.embed_tokens"].delta(torch.float64)
    assert t1["token_embd.weight"].tensor_type == T.F16
    torch.testing.assert_close(values(t1["token_embd.weight"]), want, rtol=1e-3, atol=1e-3)
    name = "blk.0.ffn_up.weight"
    target = values(t0[name]) + ad.modules["model.layers.0.mlp.up_proj"].delta(torch.float64)
    S, low, high = grid_bounds("Q5_K", t0[name])
    got = values(t1[name])
    inside = (target > low) & (target < high)
    assert bool(((got - target).abs() <= S * (1 + 1e-4) + 1e-9)[inside].all())  # a neighbouring code
    # scales kept: the same grid read back from the output
    assert torch.equal(grid_bounds("Q5_K", t1[name])[0], S)
    # unbiased: the mean error is small next to the step
    assert abs(float((got - target)[inside].mean())) < 0.02 * float(S.mean())


def test_validate_names_gguf_files(tmp_path, cli):
    base = build(tmp_path / "base.gguf", "Q8_0", layers=1)
    code, out, _ = cli("validate", base)
    assert code == 1 and "GGUF model (llama.cpp), not an adapter file" in out
    cfg = tmp_path / "hf"
    cfg.mkdir()
    (cfg / "config.json").write_text(
        json.dumps({"num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS})
    )
    adapter(layers=1).save(tmp_path / "lora.gguf", format="gguf", base=str(cfg))
    code, out, _ = cli("validate", tmp_path / "lora.gguf")
    assert code == 0 and "a gguf adapter, not a lorakit file" in out and "--to lorakit" in out


def test_auto_chooses_per_module_on_a_gguf_of_mixed_types(tmp_path):
    """--strategy auto (the default) on a GGUF of mixed types, as Q4_K_M files are: each module's choice is the one
    its own measurements favour, never further from W + dW than its old codes, and the report counts them."""
    from lorakit.quant.requant import score

    types = {f"blk.{n}.ffn_down.weight": "Q4_K" for n in range(2)}
    base = build(tmp_path / "base.gguf", "Q8_0", types=types)
    adapter(scale=0.05).save(tmp_path / "ad.safetensors")
    report = lorakit.merge(base, [tmp_path / "ad.safetensors"], tmp_path / "out.gguf", quiet=True)
    q = report["quantization"]
    assert (
        q["strategy"].startswith("auto: ")
        and sum(int(p.split(" x ")[1]) for p in q["strategy"][6:].split(", ")) == 8
    )
    for m in q["modules"]:
        assert m["strategy"] == min(m["candidates"], key=m["candidates"].get) or score(m) <= 1.0
        assert score(m) <= 1.0 + 1e-9
    assert {m["type"] for m in q["modules"]} == {"Q8_0", "Q4_K"}


def test_a_delta_beyond_what_the_type_can_hold_is_dropped_with_a_warning(tmp_path, cli):
    """One module's delta 1e30 times too large: its merged weights leave fp16 scales' range, every candidate is
    further from W + dW than the old codes, so auto keeps them there; the report's mean counts each module once,
    so a warning names the module whose adapter was dropped; the others merge."""
    build(tmp_path / "b.gguf", "Q4_0")
    ad = adapter()
    m = ad.modules["model.layers.0.mlp.down_proj"]
    ad.add(Module(m.name, m.A, m.B * 1e30, alpha=m.alpha))
    ad.save(tmp_path / "a.safetensors")
    code, out, err = cli(
        "merge", tmp_path / "b.gguf", tmp_path / "a.safetensors", "-o", tmp_path / "o.gguf", "-q"
    )
    assert code == 0, err
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines() if line.startswith("  blk.")}
    assert rows["blk.0.ffn_down"] == "keep" and rows["blk.1.ffn_down"] != "keep"
    warning = [line for line in out.splitlines() if "larger than the weight itself" in line]
    assert len(warning) == 1 and "1 module(s)" in warning[0] and "blk.0.ffn_down" in warning[0], out


def test_an_adapter_whose_rows_the_base_heads_cannot_split_is_one_line(tmp_path, cli):
    """Q/K rows are put in llama.cpp's order before any shape check: an adapter made for another model (here 6 rows
    of k_proj for 2 KV heads: no rotary halves) names the base, the module and the mismatch, not only the heads."""
    base = build(tmp_path / "b.gguf", "Q8_0")
    ad = Adapter()
    ad.add(
        Module("model.layers.0.self_attn.k_proj", torch.randn(4, HIDDEN) * 0.05, torch.randn(6, 4), alpha=8.0)
    )
    ad.save(tmp_path / "a.safetensors")
    for argv in (
        ["inspect", tmp_path / "a.safetensors", "--base", base],
        ["merge", base, tmp_path / "a.safetensors", "-o", tmp_path / "o.gguf"],
    ):
        code, out, err = cli(*argv)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert (
            "b.gguf: tensor 'model.layers.0.self_attn.k_proj': head count 2 does not divide the 6 rows" in err
        )
        assert "of the adapter's B [6, 4]: it does not fit this base's attention heads" in err
    assert not (tmp_path / "o.gguf").exists()


def test_a_gguf_repo_on_the_hub_is_read_by_its_tag(tmp_path, cli, monkeypatch):
    """org/name-GGUF:Q8_0 (llama.cpp's -hf spelling) takes that one GGUF model of a repo of several; without a tag
    such a repo is refused with its tags, before anything is fetched; online, only the chosen file (or its splits)
    is asked for, and a repo of safetensors weights and GGUF files fetches no GGUF."""
    import huggingface_hub

    from test_first_hour import _hub_cache

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    os.makedirs("repo")
    for kind in ("Q8_0", "Q4_0"):
        build(tmp_path / "repo" / f"tiny-{kind}.gguf", kind)
    adapter().save("a.safetensors")
    _hub_cache(tmp_path / "cache", "org/tiny-GGUF", "repo")
    code, out, err = cli("merge", "org/tiny-GGUF:Q8_0", "a.safetensors", "-o", "hub.gguf", "-q")
    assert code == 0, err
    lorakit.merge("repo/tiny-Q8_0.gguf", ["a.safetensors"], "file.gguf", quiet=True)
    assert open("hub.gguf", "rb").read() == open("file.gguf", "rb").read()
    for argv, fragment in (
        (
            ["merge", "org/tiny-GGUF", "a.safetensors", "-o", "x.gguf"],
            "org/tiny-GGUF: the repo holds 2 GGUF models (Q4_0, Q8_0): name one as org/tiny-GGUF:TAG, e.g. "
            "org/tiny-GGUF:Q4_0",
        ),
        (["merge", "org/tiny-GGUF:Q5_K", "a.safetensors", "-o", "x.gguf"], "HF_HUB_OFFLINE is set"),
        (["inspect", "org/tiny-GGUF:Q8_0"], "picks one GGUF file of a model repo: only a base takes it"),
    ):
        assert_one_line_error(*cli(*argv), fragment)
    # online: the repo's file list decides what is fetched
    monkeypatch.delenv("HF_HUB_OFFLINE")
    listing = {
        "org/big-GGUF": [
            "README.md",
            "big-Q4_K_M.gguf",
            "Q8_0/big-Q8_0-00001-of-00002.gguf",
            "Q8_0/big-Q8_0-00002-of-00002.gguf",
            "mmproj-big-f16.gguf",
        ],
        "org/both": ["config.json", "model.safetensors", "both-Q4_K_M.gguf", "consolidated.safetensors"],
    }
    asked, ignored = [], []

    def snapshot_download(**options):
        if options.get("local_files_only"):
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        asked.append(options["allow_patterns"])
        ignored.append(options["ignore_patterns"])
        raise huggingface_hub.errors.LocalEntryNotFoundError("no network in this test")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo, revision=None: listing[repo])
    for base in ("org/big-GGUF:Q8_0", "org/big-GGUF:q4_k_m", "org/both"):
        cli("merge", base, "a.safetensors", "-o", "x.gguf", "-q")
    assert asked[0] == ["Q8_0/big-Q8_0-00001-of-00002.gguf", "Q8_0/big-Q8_0-00002-of-00002.gguf"]
    assert asked[1] == ["big-Q4_K_M.gguf"]
    assert "*.safetensors" in asked[2] and "*.gguf" not in asked[2]
    assert "consolidated*" in ignored[2] and "consolidated*" not in ignored[0]  # Mistral's second copy
    assert_one_line_error(
        *cli("merge", "org/big-GGUF", "a.safetensors", "-o", "x.gguf"),
        "the repo holds 2 GGUF models (Q4_K_M, Q8_0): name one as org/big-GGUF:TAG",
    )
    assert len(asked) == 3  # refused before any download
