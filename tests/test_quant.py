"""Quantized bases: dequantization against each format's formula written independently here, merge -> write -> read
round trips that keep the layout, config and untouched bytes, the survival report against fp64, clean errors."""

import json
import os

import numpy as np
import pytest
import torch

import lorakit
from lorakit import examples
from lorakit.core import Adapter, Module
from lorakit.io import Checkpoint
from lorakit.errors import LorakitError
from lorakit.io import write_safetensors
from lorakit.bases import open_base

from conftest import assert_one_line_error


def detect(ckpt, path):
    """(format, {module: members}) of the quantized checkpoint at `path`, as its opened base finds them."""
    view = open_base(path).view
    return view.handler, {k[: -len(".weight")]: v for k, v in view.quantized.items()}


OUT, IN, G = 64, 128, 32
gen = torch.Generator().manual_seed(0)
W = torch.randn(OUT, IN, generator=gen) / IN**0.5  # the full-precision weight of the quantized module
NF4_LEVELS = [
    -1.0,
    -0.6962,
    -0.5251,
    -0.3949,
    -0.2844,
    -0.1848,
    -0.0911,
    0.0,
    0.0796,
    0.1609,
    0.2461,
    0.3379,
    0.4407,
    0.5626,
    0.7230,
    1.0,
]


def pack_rows(q, bits):
    """Reference packing: `32 // bits` values of consecutive rows (dim 0) per int32, lowest bits first."""
    q = np.asarray(q, dtype=np.uint64)
    per = 32 // bits
    out = np.zeros((q.shape[0] // per, q.shape[1]), dtype=np.uint64)
    for i in range(q.shape[0]):
        out[i // per] |= q[i] << np.uint64(bits * (i % per))
    return torch.from_numpy(out.astype(np.uint32).view(np.int32))


def pack_cols(q, bits, order=None):
    q = np.asarray(q, dtype=np.uint64)
    per = 32 // bits
    order = order or list(range(per))
    out = np.zeros((q.shape[0], q.shape[1] // per), dtype=np.uint64)
    for c in range(q.shape[1] // per):
        for slot, col in enumerate(order):
            out[:, c] |= q[:, c * per + col] << np.uint64(bits * slot)
    return torch.from_numpy(out.astype(np.uint32).view(np.int32))


def make(folder, kind):
    """A checkpoint with one quantized module `l.q` (and an untouched quantized `l.k`), a norm, and its config.
    Returns (folder, reference dequantization of l.q in fp64)."""
    os.makedirs(folder)
    t, qc = {"norm.weight": torch.ones(IN)}, None

    def fp8(name, Wm, per_channel, dtype=torch.bfloat16):
        s = (Wm.abs().amax(1, keepdim=True) if per_channel else Wm.abs().amax().reshape(1)) / 448
        s = s.to(dtype)
        t[f"{name}.weight"] = (Wm / s.float()).to(torch.float8_e4m3fn)
        t[f"{name}.weight_scale"] = s
        t[f"{name}.input_scale"] = torch.ones(1)
        return t[f"{name}.weight"].double() * s.double()

    def gptq(name, Wm, bits, sym, v1, desc_act):
        maxq = 2**bits - 1
        g_idx = (torch.randperm(IN, generator=gen) if desc_act else torch.arange(IN)) // G
        groups = IN // G
        scales, zeros = torch.zeros(groups, OUT), torch.zeros(groups, OUT)
        for gi in range(groups):
            cols = Wm[:, g_idx == gi]
            lo, hi = cols.min(1).values.clamp(max=0), cols.max(1).values.clamp(min=0)
            scales[gi] = ((hi - lo) / maxq).clamp(min=1e-8)
            zeros[gi] = torch.full((OUT,), float((maxq + 1) // 2)) if sym else torch.round(-lo / scales[gi])
        scales = scales.half()
        q = torch.clamp(torch.round(Wm.T / scales.float()[g_idx] + zeros[g_idx]), 0, maxq).to(torch.int64)
        t[f"{name}.qweight"] = pack_rows(q.numpy(), bits)
        t[f"{name}.qzeros"] = pack_cols((zeros - (1 if v1 else 0)).to(torch.int64).numpy(), bits)
        t[f"{name}.scales"] = scales
        t[f"{name}.g_idx"] = g_idx.to(torch.int32)
        ref = np.zeros((IN, OUT))
        for k in range(IN):  # W^T[k, n] = scales[g[k], n] * (q[k, n] - z[g[k], n])
            ref[k] = scales[g_idx[k]].double().numpy() * (q[k].numpy() - zeros[g_idx[k]].numpy())
        return torch.from_numpy(ref.T.copy())

    def awq(name, Wm):
        Wg = Wm.T.reshape(IN // G, G, OUT)
        lo, hi = Wg.amin(1).clamp(max=0), Wg.amax(1).clamp(min=0)
        scales = ((hi - lo) / 15).clamp(min=1e-8).half()
        zeros = torch.round(-lo / scales.float()).clamp(0, 15)
        g = torch.arange(IN) // G
        q = torch.clamp(torch.round(Wm.T / scales.float()[g] + zeros[g]), 0, 15).to(torch.int64)
        order = [0, 2, 4, 6, 1, 3, 5, 7]
        t[f"{name}.qweight"] = pack_cols(q.numpy(), 4, order)
        t[f"{name}.qzeros"] = pack_cols(zeros.to(torch.int64).numpy(), 4, order)
        t[f"{name}.scales"] = scales
        return ((q.double() - zeros.double()[g]) * scales.double()[g]).T.contiguous()

    def int8(name, Wm, bnb):
        amax = Wm.abs().amax(1)
        if bnb:
            t[f"{name}.weight"] = torch.round(Wm * 127 / amax[:, None]).to(torch.int8)
            t[f"{name}.weight.SCB"] = amax
            return t[f"{name}.weight"].double() * amax.double()[:, None] / 127
        s = (amax / 127)[:, None]
        t[f"{name}.weight"] = torch.round(Wm / s).clamp(-128, 127).to(torch.int8)
        t[f"{name}.weight_scale"] = s
        return t[f"{name}.weight"].double() * s.double()

    def nf4(name, Wm, nested):
        flat = Wm.reshape(-1)
        absmax = flat.reshape(-1, 64).abs().amax(1)
        levels = torch.tensor(NF4_LEVELS)
        codes = (flat.reshape(-1, 64) / absmax[:, None]).reshape(-1, 1).sub(levels).abs().argmin(1)
        t[f"{name}.weight"] = ((codes[0::2] << 4) | codes[1::2]).to(torch.uint8).reshape(-1, 1)
        t[f"{name}.weight.quant_map"] = levels
        state = {"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": list(Wm.shape)}
        used = absmax.double()
        if nested:
            offset = float(absmax.mean())
            centered = absmax - offset
            nested_absmax = (
                centered.reshape(-1, 256 if centered.numel() >= 256 else centered.numel()).abs().amax(1)
            )
            nested_map = torch.linspace(-1, 1, 256)
            block = centered.numel() // nested_absmax.numel()
            idx = (
                (centered.reshape(-1, block) / nested_absmax[:, None])
                .reshape(-1, 1)
                .sub(nested_map)
                .abs()
                .argmin(1)
            )
            t[f"{name}.weight.absmax"] = idx.to(torch.uint8)
            t[f"{name}.weight.nested_absmax"] = nested_absmax
            t[f"{name}.weight.nested_quant_map"] = nested_map
            state.update(nested_blocksize=block, nested_offset=offset)
            used = nested_map.double()[idx] * nested_absmax.double().repeat_interleave(block) + offset
        else:
            t[f"{name}.weight.absmax"] = absmax
        t[f"{name}.weight.quant_state.bitsandbytes__nf4"] = torch.tensor(
            list(json.dumps(state).encode()), dtype=torch.uint8
        )
        return (levels.double()[codes].reshape(-1, 64) * used.to(torch.float64)[:, None]).reshape(Wm.shape)

    other = torch.randn(OUT, IN, generator=gen) / IN**0.5
    if kind in ("fp8-channel", "fp8-tensor", "fbgemm"):
        ref = fp8("l.q", W, kind != "fp8-tensor", torch.float32 if kind == "fbgemm" else torch.bfloat16)
        fp8("l.k", other, True)
        qc = (
            {"quant_method": "fbgemm_fp8"}
            if kind == "fbgemm"
            else {"quant_method": "compressed-tensors", "format": "float-quantized"}
        )
    elif kind == "fp8-block":
        bw = torch.randn(256, 384, generator=gen) / 20
        s = torch.zeros(2, 3)
        for i in range(2):
            for j in range(3):
                s[i, j] = bw[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128].abs().amax() / 448
        se = s.repeat_interleave(128, 0).repeat_interleave(128, 1)
        t["l.q.weight"] = (bw / se).to(torch.float8_e4m3fn)
        t["l.q.weight_scale_inv"] = s
        ref = t["l.q.weight"].double() * se.double()
        qc = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    elif kind.startswith("gptq"):
        bits, sym, v1 = (4, True, True) if kind == "gptq4" else (8, False, False)
        ref = gptq("l.q", W, bits, sym, v1, desc_act=True)
        gptq("l.k", other, bits, sym, v1, desc_act=False)
        qc = {
            "quant_method": "gptq",
            "bits": bits,
            "group_size": G,
            "sym": sym,
            "desc_act": True,
            "checkpoint_format": "gptq" if v1 else "gptq_v2",
        }
    elif kind == "awq":
        ref, _ = awq("l.q", W), awq("l.k", other)
        qc = {"quant_method": "awq", "bits": 4, "group_size": G, "version": "gemm", "zero_point": True}
    elif kind in ("int8", "bnb-int8"):
        ref = int8("l.q", W, kind == "bnb-int8")
        int8("l.k", other, kind == "bnb-int8")
        qc = {"quant_method": "bitsandbytes" if kind == "bnb-int8" else "compressed-tensors"}
    elif kind in ("nf4", "nf4-double"):
        ref = nf4("l.q", W, kind == "nf4-double")
        qc = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    write_safetensors(os.path.join(folder, "model.safetensors"), t, {"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"model_type": "llama", "quantization_config": qc}, f)
    return ref


KINDS = [
    "fp8-channel",
    "fp8-tensor",
    "fbgemm",
    "fp8-block",
    "int8",
    "bnb-int8",
    "gptq4",
    "gptq8",
    "awq",
    "nf4",
    "nf4-double",
]


@pytest.mark.parametrize("kind", KINDS)
def test_dequantize_matches_the_format_formula(tmp_path, kind):
    ref = make(tmp_path / "q", kind)
    ckpt = Checkpoint(tmp_path / "q")
    handler, mods = detect(ckpt, str(tmp_path / "q"))
    got = handler.dequantize(ckpt, mods["l.q"]).double()
    assert torch.allclose(got, ref, rtol=1e-6, atol=1e-7), (got - ref).abs().max()
    assert tuple(handler.shape(ckpt, mods["l.q"])) == tuple(ref.shape)


def adapter_for(shape, rel, tmp_path, seed=1):
    g = torch.Generator().manual_seed(seed)
    A, B = torch.randn(8, shape[1], generator=g), torch.randn(shape[0], 8, generator=g)
    scale = rel * float(W.norm() if shape == W.shape else 1.0) / float((B @ A).norm())
    ad = Adapter()
    ad.add(Module("l.q", A, B * scale, alpha=8.0))
    ad.save(tmp_path / "a.safetensors", force=True)
    return ad


WRITABLE = KINDS  # every kind read is also written (merged and kept in its format)


@pytest.mark.parametrize("kind", WRITABLE)
@pytest.mark.parametrize("strategy", ["feedback", "same-grid", "stochastic", "rescale"])
def test_merge_round_trip_keeps_layout_and_reports_survival(tmp_path, kind, strategy):
    ref = make(tmp_path / "q", kind)
    ad = adapter_for(tuple(ref.shape), 2e-2, tmp_path)
    if kind == "nf4-double" and strategy == "rescale":
        with pytest.raises(LorakitError, match="fresh scales for double-quantized NF4"):
            lorakit.merge(
                tmp_path / "q", [str(tmp_path / "a.safetensors")], tmp_path / "out", strategy=strategy
            )
        return
    r = lorakit.merge(
        tmp_path / "q", [str(tmp_path / "a.safetensors")], tmp_path / "out", strategy=strategy, quiet=True
    )
    before, after = Checkpoint(tmp_path / "q"), Checkpoint(tmp_path / "out")
    assert (tmp_path / "out" / "config.json").read_bytes() == (tmp_path / "q" / "config.json").read_bytes()
    for name in before.where:
        e0, e1 = before.entry(name), after.entry(name)
        assert (e0.dtype, e0.shape) == (e1.dtype, e1.shape), name
        if not name.startswith("l.q."):
            assert before.shards[before.where[name]].raw(name) == after.shards[after.where[name]].raw(name), (
                name
            )
    assert set(after.where) == set(before.where)
    # the report against a direct fp64 computation from the files
    handler, mods = detect(after, str(tmp_path / "out"))
    W_new = handler.dequantize(after, mods["l.q"]).double()
    dW = ad.modules["l.q"].delta(torch.float64)
    dQ = W_new - ref
    rho = float((dQ * dW).sum() / (dW * dW).sum())
    nu = float((dQ - rho * dW).norm() / dW.norm())
    row = next(m for m in r["quantization"]["modules"] if m["module"] == "l.q")
    assert abs(row["retention"] - rho) < 1e-4 and abs(row["noise"] - nu) < 1e-4
    assert r["quantization"]["format"] == handler.name


@pytest.mark.parametrize("threads", [1, 3])
def test_a_module_split_across_shards_is_computed_once(tmp_path, threads, monkeypatch):
    """An AWQ module whose packed tensors lie in two shards (as Hugging Face's sharding leaves them): one computation
    gives all three, whatever the workers, byte for byte what the single-file merge writes."""
    from safetensors.torch import load_file

    make(tmp_path / "q", "awq")
    adapter_for((OUT, IN), 2e-2, tmp_path)
    tensors = load_file(str(tmp_path / "q" / "model.safetensors"))
    split = {
        "model-00001-of-00002.safetensors": [n for n in tensors if n != "l.q.scales" and n != "l.q.qzeros"],
        "model-00002-of-00002.safetensors": ["l.q.qzeros", "l.q.scales"],
    }
    os.makedirs(tmp_path / "s")
    for file, names in split.items():
        write_safetensors(str(tmp_path / "s" / file), {n: tensors[n] for n in names}, {"format": "pt"})
    with open(tmp_path / "s" / "model.safetensors.index.json", "w") as f:
        json.dump(
            {"metadata": {}, "weight_map": {n: file for file, names in split.items() for n in names}}, f
        )
    (tmp_path / "s" / "config.json").write_bytes((tmp_path / "q" / "config.json").read_bytes())
    one = lorakit.merge(tmp_path / "q", [str(tmp_path / "a.safetensors")], tmp_path / "o1", quiet=True)
    from lorakit.quant import requant

    calls, requantize = [], requant.requantize
    monkeypatch.setattr(requant, "requantize", lambda *a, **k: calls.append(a[2]) or requantize(*a, **k))
    two = lorakit.merge(
        tmp_path / "s", [str(tmp_path / "a.safetensors")], tmp_path / "o2", quiet=True, threads=threads
    )
    assert len(calls) == 1
    assert one["quantization"]["modules"] == two["quantization"]["modules"]
    a, b = Checkpoint(tmp_path / "o1"), Checkpoint(tmp_path / "o2")
    assert (
        set(a.where) == set(b.where)
        and os.path.basename(b.where["l.q.scales"]) == "model-00002-of-00002.safetensors"
    )
    for name in a.where:
        assert a.shards[a.where[name]].raw(name) == b.shards[b.where[name]].raw(name), name


def test_feedback_keeps_the_delta_where_same_grid_loses_it(tmp_path, cli):
    make(tmp_path / "q", "fp8-channel")
    adapter_for((OUT, IN), 1e-2, tmp_path)
    code, out, err = cli(
        "merge",
        tmp_path / "q",
        tmp_path / "a.safetensors",
        "-o",
        tmp_path / "sg",
        "--strategy",
        "same-grid",
        "--json",
        "-q",
    )
    same = json.loads(out)["quantization"]
    code, out, err = cli(
        "merge",
        tmp_path / "q",
        tmp_path / "a.safetensors",
        "-o",
        tmp_path / "fb",
        "--strategy",
        "feedback",
        "-q",
    )
    assert code == 0 and "quantized merge (fp8, strategy feedback)" in out
    code, out, err = cli(
        "merge",
        tmp_path / "q",
        tmp_path / "a.safetensors",
        "-o",
        tmp_path / "fb2",
        "--strategy",
        "feedback",
        "--json",
        "-q",
    )
    fb = json.loads(out)["quantization"]
    assert fb["mean_retention"] > 0.9 and same["mean_retention"] < 0.5
    assert fb["mean_probe_error_aligned"] < 0.5 * same["mean_probe_error_aligned"]
    # the loud warning gives the ways out and recommends no strategy this merge did not measure
    code, out, err = cli(
        "merge",
        tmp_path / "q",
        tmp_path / "a.safetensors",
        "-o",
        tmp_path / "sg2",
        "--strategy",
        "same-grid",
        "-q",
    )
    assert "WARNING: the fp8 grid cannot hold this adapter" in out and "--calibration DATA" in out
    assert "--strategy" not in out.split("Ways out")[1]


def test_original_strategy_and_onto(tmp_path):
    make(tmp_path / "q", "int8")
    os.makedirs(tmp_path / "full")
    write_safetensors(tmp_path / "full" / "model.safetensors", {"l.q.weight": W})
    ad = adapter_for((OUT, IN), 5e-2, tmp_path)
    with pytest.raises(LorakitError, match="need --full-precision-base"):
        lorakit.merge(tmp_path / "q", [str(tmp_path / "a.safetensors")], tmp_path / "o", strategy="original")
    r = lorakit.merge(
        tmp_path / "q",
        [str(tmp_path / "a.safetensors")],
        tmp_path / "o",
        strategy="original",
        full_precision_base=str(tmp_path / "full"),
        quiet=True,
    )
    out = Checkpoint(tmp_path / "o")
    handler, mods = detect(out, str(tmp_path / "o"))
    target = W.double() + ad.modules["l.q"].delta(torch.float64)
    err = (handler.dequantize(out, mods["l.q"]).double() - target).abs()
    step = target.abs().amax(1, keepdim=True) / 127
    assert (err <= step / 2 + 1e-6).all()  # a fresh nearest quantization of W + dW
    assert "l.q" in [m["module"] for m in r["quantization"]["modules"]]


@pytest.mark.parametrize("kind", ["nf4", "nf4-double", "gptq4"])
def test_dequantized_output(tmp_path, kind):
    ref = make(tmp_path / "q", kind)
    ad = adapter_for(tuple(ref.shape), 1e-2, tmp_path)
    lorakit.merge(tmp_path / "q", [str(tmp_path / "a.safetensors")], tmp_path / "o", dtype="fp32", quiet=True)
    out = Checkpoint(tmp_path / "o")
    assert torch.allclose(
        out.get("l.q.weight").double(), ref + ad.modules["l.q"].delta(torch.float64), atol=1e-5
    )
    assert not any(n.startswith("l.q.") and n != "l.q.weight" for n in out.where)
    assert "quantization_config" not in json.loads((tmp_path / "o" / "config.json").read_text())
    r = lorakit.merge(  # the strategy is not read: said
        tmp_path / "q",
        [str(tmp_path / "a.safetensors")],
        tmp_path / "o2",
        dtype="fp32",
        strategy="rescale",
        quiet=True,
    )
    assert (
        "strategy rescale was not used: --dtype writes every quantized module in full precision" in r["notes"]
    )
    assert Checkpoint(tmp_path / "o2").get("l.q.weight").equal(out.get("l.q.weight"))


def test_extract_from_a_quantized_base_is_refused_or_dequantized(tmp_path):
    ref = make(tmp_path / "q", "nf4")
    # the dequantized model as the "tuned" one plus a planted delta: extract sees through the quantized base
    os.makedirs(tmp_path / "tuned")
    D = torch.randn(OUT, 2, generator=gen).double() @ torch.randn(2, IN, generator=gen).double() * 0.01
    write_safetensors(
        tmp_path / "tuned" / "model.safetensors",
        {"l.q.weight": (ref + D).float(), "norm.weight": torch.ones(IN)},
    )
    r = lorakit.extract(tmp_path / "q", tmp_path / "tuned", tmp_path / "e.safetensors", rank=2, quiet=True)
    e = lorakit.load(tmp_path / "e.safetensors")
    assert (e.modules["l.q"].delta(torch.float64) - D).norm() / D.norm() < 1e-4
    assert r["modules"][0]["module"] == "l.q"


def test_unknown_and_corrupt_layouts(tmp_path, cli):
    make(tmp_path / "q", "gptq4")
    adapter_for((OUT, IN), 1e-2, tmp_path)
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    cfg["quantization_config"]["quant_method"] = "hqq"
    (tmp_path / "q" / "config.json").write_text(json.dumps(cfg))
    c, out, err = cli("merge", tmp_path / "q", tmp_path / "a.safetensors", "-o", tmp_path / "o")
    assert c == 2 and "quantization method 'hqq' is not supported" in err
    del cfg["quantization_config"]
    (tmp_path / "q" / "config.json").write_text(json.dumps(cfg))
    c, out, err = cli("merge", tmp_path / "q", tmp_path / "a.safetensors", "-o", tmp_path / "o")
    assert c == 2 and "unknown quantized layout" in err
    # corrupt: qzeros of the wrong shape
    make(tmp_path / "q2", "gptq4")
    t = Checkpoint(tmp_path / "q2")
    tensors = {n: t.get(n).clone() for n in t.where}
    tensors["l.q.qzeros"] = tensors["l.q.qzeros"][:, :3]
    write_safetensors(tmp_path / "q2" / "model.safetensors", tensors)
    c, out, err = cli("merge", tmp_path / "q2", tmp_path / "a.safetensors", "-o", tmp_path / "o")
    assert c == 2 and "GPTQ tensors do not fit together" in err and "l.q.qweight" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kind", ["fp8-channel", "int8"])
def test_dequantize_matches_compressed_tensors(tmp_path, kind):
    """The real compressed-tensors library dequantizes the same stored tensors to the same weights."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    make(tmp_path / "q", kind)
    ckpt = Checkpoint(tmp_path / "q")
    handler, mods = detect(ckpt, str(tmp_path / "q"))
    q, s = ckpt.get("l.q.weight"), ckpt.get("l.q.weight_scale")
    args = QuantizationArgs(
        num_bits=8, type="float" if kind == "fp8-channel" else "int", strategy="channel", symmetric=True
    )
    theirs = dequantize(
        q,
        s.float(),
        torch.zeros_like(s.float()).to(torch.int8 if kind == "int8" else s.dtype),
        args,
        dtype=torch.float32,
    )
    assert torch.allclose(handler.dequantize(ckpt, mods["l.q"]), theirs, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_dequantize_matches_bitsandbytes(tmp_path, double_quant):
    """Tensors quantized by the real bitsandbytes (CPU) and saved under transformers' names dequantize exactly."""
    import bitsandbytes.functional as bnbf

    q, state = bnbf.quantize_4bit(W, quant_type="nf4", blocksize=64, compress_statistics=double_quant)
    os.makedirs(tmp_path / "q")
    write_safetensors(
        tmp_path / "q" / "model.safetensors",
        {"l.q.weight": q, **{f"l.q.weight.{k}": v for k, v in state.as_dict(packed=True).items()}},
    )
    (tmp_path / "q" / "config.json").write_text(
        json.dumps({"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}})
    )
    ckpt = Checkpoint(tmp_path / "q")
    handler, mods = detect(ckpt, str(tmp_path / "q"))
    assert torch.equal(handler.dequantize(ckpt, mods["l.q"]), bnbf.dequantize_4bit(q, state))


def test_int8_dequantize_matches_bitsandbytes(tmp_path):
    import bitsandbytes.functional as bnbf

    CB, SCB = bnbf.int8_vectorwise_quant(W)[:2]
    os.makedirs(tmp_path / "q")
    write_safetensors(tmp_path / "q" / "model.safetensors", {"l.q.weight": CB, "l.q.weight.SCB": SCB})
    (tmp_path / "q" / "config.json").write_text(
        json.dumps({"quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": True}})
    )
    ckpt = Checkpoint(tmp_path / "q")
    handler, mods = detect(ckpt, str(tmp_path / "q"))
    assert torch.allclose(
        handler.dequantize(ckpt, mods["l.q"]), bnbf.int8_vectorwise_dequant(CB, SCB), atol=1e-7
    )


@pytest.mark.parametrize("shape", [(OUT, IN), (48, 160)])  # rows of 160: blocks of 64 span rows
@pytest.mark.parametrize(
    "double_quant, strategy",
    [(False, "feedback"), (True, "feedback"), (False, "same-grid"), (True, "same-grid"), (False, "rescale")],
)
def test_nf4_write_is_read_back_by_bitsandbytes(tmp_path, double_quant, strategy, shape):
    """A QLoRA adapter merged back into its NF4 base stays NF4: same absmax blocks (and nested statistics), codes
    re-rounded (rescale: fresh absmax values); the real bitsandbytes dequantizes the written tensors to what lorakit
    reports."""
    import bitsandbytes.functional as bnbf
    from bitsandbytes.functional import QuantState

    Wm = (
        W if shape == (OUT, IN) else torch.randn(shape, generator=torch.Generator().manual_seed(5)) / 160**0.5
    )
    q, state = bnbf.quantize_4bit(Wm, quant_type="nf4", blocksize=64, compress_statistics=double_quant)
    os.makedirs(tmp_path / "q")
    stored = {"l.q.weight": q, **{f"l.q.weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
    write_safetensors(tmp_path / "q" / "model.safetensors", stored)
    (tmp_path / "q" / "config.json").write_text(
        json.dumps({"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}})
    )
    W_old = bnb_flat_dequantize(q, state).double()
    ad = adapter_for(shape, 1e-2, tmp_path)
    r = lorakit.merge(
        tmp_path / "q", [str(tmp_path / "a.safetensors")], tmp_path / "o", strategy=strategy, quiet=True
    )
    out = Checkpoint(tmp_path / "o")
    tensors = {n: out.get(n) for n in out.where}
    assert {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()} == {
        n: (t.dtype, tuple(t.shape)) for n, t in stored.items()
    }
    for n in stored:
        if n != "l.q.weight" and not (strategy == "rescale" and n.endswith(".absmax")):
            assert torch.equal(tensors[n], stored[n]), n  # the statistics kept byte for byte
    state2 = QuantState.from_dict(
        {k[len("l.q.weight.") :]: v for k, v in tensors.items() if k != "l.q.weight"}, device="cpu"
    )
    theirs = bnb_flat_dequantize(tensors["l.q.weight"], state2).double()
    handler, mods = detect(out, str(tmp_path / "o"))
    assert torch.equal(theirs.float(), handler.dequantize(out, mods["l.q"]))
    dW = ad.modules["l.q"].delta(torch.float64)
    rho = float(((theirs - W_old) * dW).sum() / (dW * dW).sum())
    row = r["quantization"]["modules"][0]
    assert abs(row["retention"] - rho) < 1e-4
    if strategy == "feedback":
        assert rho > 0.8


def bnb_flat_dequantize(packed, state):
    """bitsandbytes' NF4 dequantization as its reference backend (backends/default) computes it: blocks over the
    flattened weight. Its CPU C++ kernel (0.50.2) disagrees with its own quantizer for rows that are not whole blocks,
    so rows of 160 are checked against the reference formula (equal to dequantize_4bit where rows are whole blocks,
    checked here too)."""
    import bitsandbytes.functional as bnbf

    absmax = state.absmax
    if state.nested:
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    flat = packed.view(torch.uint8).reshape(-1)
    n = int(np.prod(state.shape))
    codes = torch.stack([flat >> 4, flat & 15], 1).reshape(-1)[:n].long()
    values = state.code.float()[codes] * absmax.float().repeat_interleave(state.blocksize)[:n]
    if state.shape[-1] % state.blocksize == 0:
        assert torch.equal(values.reshape(state.shape), bnbf.dequantize_4bit(packed, state))
    return values.reshape(state.shape)


def _fp8_values():
    """Every finite float8_e4m3fn value, independently of the implementation."""
    v = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).double()
    return v[torch.isfinite(v)]


def _codebooks():
    from lorakit.quant.rounding import FP8, Table, Uniform

    return {
        "int8": (Uniform(-128, 127, torch.int8), torch.arange(-128, 128)),
        "int4": (Uniform(0, 15, torch.uint8), torch.arange(16)),
        "fp8": (FP8(), None),
        "nf4": (Table(torch.tensor(NF4_LEVELS)), torch.tensor(NF4_LEVELS)),
    }


@pytest.mark.parametrize("name", ["int8", "int4", "fp8", "nf4"])
def test_rounding_against_fp64_nearest_over_the_codebook(name):
    """Each codebook's own fast path (native FP8 cast, round + clamp, table search) against brute force in fp64."""
    book, levels = _codebooks()[name]
    if levels is None:
        levels = _fp8_values()
    levels = levels.double().unique()
    span = float(levels.max() - levels.min())
    g = torch.Generator().manual_seed(3)
    U = (torch.rand(20000, generator=g) * 1.2 - 0.1) * span + float(levels.min())  # some beyond the range
    dist = (U.double()[:, None] - levels).abs()
    ref = levels[dist.argmin(1)]
    two = dist.topk(2, largest=False).values
    clear = two[:, 0] < two[:, 1]  # ties (exactly halfway) may go either way
    stored, values = book.round(U.clone())
    for got in (values, book.values(stored), book.column_rounder(len(U))(U.clone(), torch.empty_like(U))):
        assert torch.equal(got.double()[clear], ref[clear])
        assert bool((got.double() - U.double()).abs().le(two[:, 0] + 1e-9).all())


@pytest.mark.parametrize("name", ["int8", "int4", "fp8", "nf4"])
def test_stochastic_rounding_draws_against_fp64(name):
    """Each codebook's branch-free draw is the fp64 rule on the same uniform r: the code above U when r < (U - lo) /
    (hi - lo) (lo <= U <= hi the neighbouring codes), over the whole range (FP8: subnormals, exact codes, beyond +-448,
    both signs); and the stored codes hold the values drawn."""
    book, levels = _codebooks()[name]
    if levels is None:
        levels = _fp8_values()
    levels = levels.double().unique()
    g = torch.Generator().manual_seed(7)
    span = float(levels.max() - levels.min())
    U = (torch.rand(60000, generator=g) * 1.2 - 0.1) * span + float(levels.min())
    if name == "fp8":  # every binade, and the codes themselves
        U = torch.cat(
            [
                U,
                torch.randn(60000, generator=g) * torch.exp2(torch.randint(-12, 9, (60000,), generator=g)),
                levels.float(),
                -levels.float(),
            ]
        )
    stored, drawn = book.stochastic(U.clone(), torch.Generator().manual_seed(11))
    r = torch.rand(U.shape, generator=torch.Generator().manual_seed(11)).double()
    u = U.double().clamp(float(levels.min()), float(levels.max()))
    i = torch.searchsorted(levels, u, right=True).clamp(1, len(levels) - 1)
    lo, hi = levels[i - 1], levels[i]
    ref = torch.where(r < (u - lo) / (hi - lo), hi, lo)
    ref = torch.where(u == hi, hi, ref)  # (the top code itself)
    assert torch.equal(book.values(stored), drawn)
    if name == "fp8":
        assert not bool(torch.signbit(drawn[drawn == 0]).any())  # one zero
    # ceil(U - r) (integer grids, FP8 subnormals) may differ where U - r rounds onto an integer in fp32
    assert int((drawn.double() != ref).sum()) <= int(((r - (u - lo) / (hi - lo)).abs() < 1e-6).sum())
    assert int((drawn.double() != ref).sum()) < 5


@pytest.mark.parametrize("name", ["int4", "fp8", "nf4"])
def test_stochastic_rounding_is_unbiased(name):
    book, _ = _codebooks()[name]
    U = torch.full((200000,), 0.3 if name != "int4" else 6.3)
    v = book.round(U[:1].clone())[1]
    stored, drawn = book.stochastic(U.clone(), torch.Generator().manual_seed(0))
    assert torch.equal(book.values(stored), drawn)
    drawn = drawn.double()
    values = sorted(drawn.unique().tolist())
    assert (
        len(values) == 2 and float(v) in values and values[0] < 0.3 + (6 if name == "int4" else 0) < values[1]
    )
    step = values[1] - values[0]
    assert abs(float(drawn.mean()) - float(U[0])) < 4 * step / 200000**0.5


def _feedback_reference(T, S, Z, levels, A, damp=1e-6):
    """The column-by-column algorithm in fp64 (lorakit 0.1's): round column j after repaying R G_j."""
    a = A.double().T
    r = a.shape[1]
    M = (a[:, :, None] * a[:, None, :]).flip(0).cumsum(0).flip(0)
    G = torch.linalg.solve(
        M + damp * M[0].diagonal().mean() * torch.eye(r, dtype=torch.float64), a[:, :, None]
    )[..., 0]
    R = torch.zeros(T.shape[0], r, dtype=torch.float64)
    codes = torch.empty_like(T, dtype=torch.float64)
    for j in range(T.shape[1]):
        u = (T[:, j].double() - R @ G[j]) / S[:, j].double() + Z[:, j].double()
        c = levels[(u[:, None] - levels).abs().argmin(1)]
        codes[:, j] = c
        R += torch.outer(S[:, j].double() * (c - Z[:, j].double()) - T[:, j].double(), a[j])
    return codes


@pytest.mark.parametrize("name", ["int4", "fp8", "nf4"])
def test_blocked_feedback_matches_the_column_by_column_fp64_result(name):
    from lorakit.quant.rounding import feedback_block, feedback_gains

    book, levels = _codebooks()[name]
    if levels is None:
        levels = _fp8_values()
    levels = levels.double().unique()
    g = torch.Generator().manual_seed(5)
    out, inn, r = 48, 300, 6
    A = torch.randn(r, inn, generator=g)
    span = float(levels.max() - levels.min())
    S = torch.full((out, inn), 1.0)
    Z = (
        torch.full((out, inn), float(levels.min() + levels.max()) / 2)
        if name == "int4"
        else torch.zeros(out, inn)
    )
    T = (torch.rand(out, inn, generator=g) - 0.5) * span * 0.8 + Z
    ref = _feedback_reference(T, S, Z, levels, A)
    G, R = feedback_gains(A), torch.zeros(out, r)
    blocks = [
        feedback_block(
            T[:, j0 : j0 + 128],
            S[:, j0 : j0 + 128],
            Z[:, j0 : j0 + 128] if name == "int4" else None,
            book,
            A[:, j0 : j0 + 128],
            G[j0 : j0 + 128],
            R,
        )
        for j0 in range(0, inn, 128)
    ]
    ours = torch.cat([c.T for c, _ in blocks], 1).double()
    # the errors it returns are W_new - T
    E = torch.cat([e.T for _, e in blocks], 1).double()
    assert torch.allclose(E, S.double() * (ours - Z.double()) - T.double(), atol=1e-5)
    assert (
        float((ours == ref).double().mean()) > 0.99
    )  # fp32 vs fp64: a few codes at rounding boundaries flip
    aligned = lambda c: float(((S.double() * (c - Z.double()) - T.double()) @ A.double().T).norm())  # noqa: E731
    nearest = levels[((T.double() / S + Z)[..., None] - levels).abs().argmin(-1)]
    assert aligned(ours) < 1.1 * aligned(ref) and aligned(ours) < 0.2 * aligned(nearest)
    # one shared scale per row (per-channel grids, groups of 16+): the code-unit path, the same result
    S = (0.5 + torch.rand(out, 1, generator=g)).expand(out, inn)
    T = T * S
    ref = _feedback_reference(T, S, Z, levels, A)
    G, R = feedback_gains(A), torch.zeros(out, r)
    shared = torch.cat(
        [
            feedback_block(
                T[:, j0 : j0 + 128],
                S[:, :1],
                Z[:, :1] if name == "int4" else None,
                book,
                A[:, j0 : j0 + 128],
                G[j0 : j0 + 128],
                R,
            )[0].T
            for j0 in range(0, inn, 128)
        ],
        1,
    ).double()
    assert float((shared == ref).double().mean()) > 0.99
    assert aligned(shared) < 1.1 * aligned(ref)


@pytest.mark.parametrize("row_major", [True, False])
def test_fit_takes_each_groups_range_exactly(row_major):
    """--strategy rescale's fit: the min and max of the targets per (column group, row), over blocks of columns, for
    every grouping (per channel, groups that blocks hold whole or cut, a block inside a group, act-order g_idx) in
    both block layouts, against a direct reduction."""
    from types import SimpleNamespace
    from lorakit.quant.requant import fit

    g = torch.Generator().manual_seed(4)
    out, inn = 24, 600
    T = torch.randn(out, inn, generator=g, dtype=torch.float64)
    cases = [
        (torch.zeros(inn, dtype=torch.long), 256),
        (torch.arange(inn) // 64, 256),
        (torch.arange(inn) // 128, 64),
        ((torch.arange(inn) // 64)[torch.randperm(inn, generator=g)], 256),
    ]
    for groups, columns in cases:
        n = int(groups.max()) + 1
        old = SimpleNamespace(S=torch.zeros(n, out), g=groups)
        fmt = SimpleNamespace(fit=lambda ckpt, members, lo, hi: (lo, hi))
        blocks = []
        for j0 in range(0, inn, columns):
            block = T[:, j0 : j0 + columns].float()
            blocks.append(
                (j0, min(inn, j0 + columns), block.contiguous() if row_major else block.T.contiguous().T)
            )
        lo, hi = fit(fmt, None, None, old, blocks)
        for k in range(n):
            assert torch.equal(lo[k], T[:, groups == k].amin(1).float()), (k, columns)
            assert torch.equal(hi[k], T[:, groups == k].amax(1).float()), (k, columns)


def test_table_lookup_is_exact_for_any_levels():
    """The bin lookup behind non-uniform tables, on levels it was not tuned for (clustered, uneven, unsorted), against
    brute force in fp64; inputs right next to every midpoint and beyond both ends."""
    from lorakit.quant.rounding import Table

    g = torch.Generator().manual_seed(11)
    levels = torch.cat([torch.rand(12, generator=g) * 0.01, torch.randn(4, generator=g) * 3])
    levels = levels[torch.randperm(16, generator=g)]
    book = Table(levels)
    s = levels.double().sort().values
    mid = (s[1:] + s[:-1]) / 2
    near = torch.cat([mid - 1e-5, mid + 1e-5]).float()
    U = torch.cat(
        [near, (torch.rand(20000, generator=g) * 1.4 - 0.7) * float(s[-1] - s[0]) + float(s.mean())]
    )
    dist = (U.double()[:, None] - s).abs()
    ref = s[dist.argmin(1)]
    stored, values = book.round(U.clone())
    assert torch.equal(values.double(), ref) and torch.equal(book.values(stored).double(), ref)
    assert torch.equal(
        levels[stored.long()].double(), ref
    )  # stored codes index the table as given (unsorted)


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_K", "int8"])
def test_refit_covers_a_delta_that_leaves_the_range(kind):
    """--strategy refit: where W + dW leaves the stored range (here the delta doubles one weight of a block), the
    block's scale is refitted instead of clipping it: the module's error (against W + dW, in fp64) is below the
    kept grid's (same-grid: the clipped weight) and the codes keep their size; a delta inside the range keeps the
    stored grid (refit = same-grid, byte for byte)."""
    from lorakit.examples import TensorDict, quantize, quantize_gguf
    from lorakit.quant import requant
    from lorakit.quant.gguf import GGUFBlocks
    from lorakit.quant.int8 import Int8Channel

    g = torch.Generator().manual_seed(5)
    out, inn = 8, 256
    W = torch.randn(out, inn, generator=g) * 0.02
    if kind == "int8":
        fmt, tensors, kinds = Int8Channel(), {f"w.{k}": v for k, v in quantize(W, "int8").items()}, None
        members = {"weight": "w.weight", "weight_scale": "w.weight_scale"}
    else:
        fmt, members = GGUFBlocks(), {"weight": "w"}
        tensors, kinds = {"w": quantize_gguf(W, kind)}, {"w": (kind, (out, inn))}
    ckpt = TensorDict(tensors, kinds)
    W_deq = fmt.dequantize(ckpt, members).double()
    row, col = 3, int(W_deq[3].abs().argmax())
    B = torch.zeros(out, 1)
    B[row] = float(W_deq[row, col])  # dW doubles the row's largest weight: out of its block's range
    A = torch.zeros(1, inn)
    A[0, col] = 1.0
    big = Module("w", A, B, alpha=1.0)
    target = W_deq + (B @ A).double()

    def error(strategy, module):
        stored = {k: v.clone() for k, v in tensors.items()}
        new, _ = requant.requantize(fmt, TensorDict(stored, kinds), members, [(module, 1.0)], 1.0, strategy)
        merged = TensorDict({**stored, **new}, kinds)
        return merged, (fmt.dequantize(merged, members).double() - target)

    kept, clipped = error("same-grid", big)
    refit, refitted = error("refit", big)
    assert refitted.norm() < 0.5 * clipped.norm()
    assert refitted[row, col].abs() < 0.25 * clipped[row, col].abs()
    assert all(refit.entry(k).nbytes == ckpt.entry(k).nbytes for k in members.values())
    # a delta well inside the range (on the row's smallest weight): the stored grid, the same bytes as same-grid
    A_small = torch.zeros(1, inn)
    A_small[0, int(W_deq[row].abs().argmin())] = 1.0
    small = Module("w", A_small, B * 1e-2, alpha=1.0)
    target = W_deq + (B * 1e-2 @ A_small).double()
    a, _ = error("same-grid", small)
    b, _ = error("refit", small)
    for k in members.values():
        assert torch.equal(a.get(k), b.get(k)), k


def _merge(tmp_path, base, adapter, name, **options):
    return lorakit.merge(base, [str(adapter)], tmp_path / name, quiet=True, **options)["quantization"]


def _score(row):
    from lorakit.quant.requant import score

    return score(row)


def test_auto_keeps_the_codes_of_a_delta_far_under_the_step(tmp_path, cli):
    """A delta far under a grid step: every candidate is further from W + dW than the old codes (nearest rounds
    back or flips a code by a whole step, random rounding adds noise), so auto keeps them: the module's bytes are
    the base's, the report says 'keep', and a merge where nothing survives warns in words with the ways out."""
    examples.write_quantized_llama(tmp_path / "q", "nf4", hidden=128, intermediate=256)
    shapes = examples.llama_shapes(hidden=128, intermediate=256)
    examples.random_adapter(shapes, targets=examples.LINEAR_TARGETS, magnitude=1e-4).save(
        tmp_path / "a.safetensors"
    )
    q = _merge(tmp_path, tmp_path / "q", tmp_path / "a.safetensors", "auto")
    assert q["strategy"] == "auto: keep x 14" and q["verdict"]["effect_kept"] == 0.0
    assert all(m["probe_error_random"] == 1.0 and m["codes_changed"] == 0 for m in q["modules"])
    assert (tmp_path / "auto" / "model.safetensors").read_bytes() == (
        tmp_path / "q" / "model.safetensors"
    ).read_bytes()
    code, out, err = cli("merge", tmp_path / "q", tmp_path / "a.safetensors", "-o", tmp_path / "cli", "-q")
    assert code == 0 and out.splitlines()[1].startswith("quantized merge (nf4, strategy auto: keep x 14)")
    warning = [line for line in out.splitlines() if "WARNING" in line]
    assert len(warning) == 1 and "the nf4 grid cannot hold this adapter" in warning[0], out
    for way in ("--for vllm", "--dtype bf16", "an 8-bit base", "--calibration DATA"):
        assert way in warning[0], way
    assert "--strategy" not in warning[0].split("Ways out")[1]  # no strategy this merge did not measure


@pytest.mark.parametrize("fmt", ["int8", "nf4", "gptq", "fp8-block"])
def test_auto_takes_the_strategy_that_measures_best(tmp_path, fmt):
    """A delta near the grid step: auto's error on each module is within 10% of the best fixed strategy's, measured
    by each strategy's own whole-module report; where it chose a deterministic strategy, the module's tensors are
    that strategy's, byte for byte."""
    from lorakit import examples

    examples.write_quantized_llama(tmp_path / "q", fmt, hidden=128, intermediate=256, group_size=64)
    shapes = examples.llama_shapes(hidden=128, intermediate=256)
    examples.random_adapter(shapes, targets=examples.LINEAR_TARGETS, magnitude=0.1).save(
        tmp_path / "a.safetensors"
    )
    auto = _merge(tmp_path, tmp_path / "q", tmp_path / "a.safetensors", "auto")
    fixed = ("same-grid", "stochastic", "rescale", "refit")
    reports = {s: _merge(tmp_path, tmp_path / "q", tmp_path / "a.safetensors", s, strategy=s) for s in fixed}
    rows = {s: {m["module"]: m for m in r["modules"]} for s, r in reports.items()}
    ckpt = {s: Checkpoint(tmp_path / s) for s in ("auto", *fixed)}
    for m in auto["modules"]:
        best = min(_score(rows[s][m["module"]]) for s in fixed)
        assert _score(m) <= 1.1 * best + 1e-9 and _score(m) <= 1.0, (m["module"], m["candidates"])
        if m["strategy"] in ("same-grid", "rescale", "refit"):
            names = [n for n in ckpt["auto"].where if n.startswith(m["module"] + ".")]
            for n in names:
                assert torch.equal(ckpt["auto"].get(n), ckpt[m["strategy"]].get(n)), n
    assert len({m["strategy"] for m in auto["modules"]}) >= 1


def test_auto_is_never_further_than_the_old_codes(tmp_path):
    """Property: over random modules (formats, shapes, grids) and deltas of any strength, the module auto writes is
    never further from W + dW on its probes than the old codes (score <= 1, keep's), and the report's verdict is
    the modules' RMS error."""
    from lorakit import examples

    rng = torch.Generator().manual_seed(7)
    formats = ["int8", "fp8", "nf4", "gptq", "awq", "fp8-block"]
    for case in range(10):
        fmt = formats[case % len(formats)]
        hidden = 64 * int(torch.randint(1, 3, (1,), generator=rng))
        folder = tmp_path / f"q{case}"
        examples.write_quantized_llama(
            folder, fmt, seed=case, hidden=hidden, intermediate=2 * hidden, group_size=64
        )
        shapes = examples.llama_shapes(hidden=hidden, intermediate=2 * hidden)
        magnitude = float(10 ** (-4 + 4 * torch.rand(1, generator=rng)))
        ad = examples.random_adapter(shapes, targets=examples.LINEAR_TARGETS, magnitude=magnitude, seed=case)
        ad.save(tmp_path / f"a{case}.safetensors")
        q = _merge(tmp_path, folder, tmp_path / f"a{case}.safetensors", f"o{case}")
        errors = [_score(m) for m in q["modules"]]
        assert max(errors) <= 1.0 + 1e-9, (fmt, magnitude, max(errors))
        assert q["verdict"]["output_error"] == pytest.approx((sum(errors) / len(errors)) ** 0.5)


def _factors(layers, kinds, rank, shared, seed=0):
    """[(module name, B)]: for each kind a width d; B of every layer either writes into 4 directions its kind
    shares across layers (as the residual stream's gradient makes a trained adapter's) plus a little noise, or is
    independent Gaussian noise (random factors)."""
    g = torch.Generator().manual_seed(seed)
    factors = []
    for kind, d in kinds.items():
        G = torch.randn(d, 4, generator=g)
        for layer in range(layers):
            noise = torch.randn(d, rank, generator=g)
            B = G @ torch.randn(4, rank, generator=g) + 0.5 * noise if shared else noise
            factors.append((f"model.layers.{layer}.{kind}", B))
    return factors


def test_coherence_tells_shared_directions_from_chance():
    """An adapter whose modules of a kind share output directions across layers is coherent (bias weighted
    COHERENT_BIAS_WEIGHT times); independent random factors sit at chance (z about 0, weight 1), in many draws;
    kinds with fewer than 3 modules say nothing."""
    from lorakit.quant.requant import COHERENCE_Z, COHERENT_BIAS_WEIGHT, coherence

    kinds = {"q_proj": 256, "down_proj": 256, "up_proj": 512}
    c = coherence(_factors(8, kinds, 16, shared=True))
    assert c.z > 5 * COHERENCE_Z and c.bias_weight == COHERENT_BIAS_WEIGHT
    zs = [coherence(_factors(8, kinds, 16, shared=False, seed=s)).z for s in range(20)]
    assert max(abs(z) for z in zs) < 4 and all(
        coherence(_factors(8, kinds, 16, False, s)).bias_weight == 1.0 for s in range(3)
    )
    assert coherence(_factors(2, kinds, 16, shared=True)).bias_weight == 1.0  # 2 layers: no group of 3
    assert coherence([]).z == 0.0


def test_auto_weighs_the_bias_of_a_coherent_adapter():
    """A delta far under an int8 step: alone (weight 1) auto keeps the codes, its error the adapter's own; with the
    bias weighted (a coherent adapter) it takes unbiased rounding: retention near 1, and its weighted score under
    keep's (the weight itself)."""
    from lorakit.examples import TensorDict, quantize
    from lorakit.quant import requant
    from lorakit.quant.int8 import Int8Channel

    g = torch.Generator().manual_seed(3)
    out, inn = 256, 256
    W = torch.randn(out, inn, generator=g) * 0.02
    fmt, members = Int8Channel(), {"weight": "w.weight", "weight_scale": "w.weight_scale"}
    tensors = {f"w.{k}": v for k, v in quantize(W, "int8").items()}
    step = float(tensors["w.weight_scale"].mean())
    A, B = torch.randn(4, inn, generator=g), torch.randn(out, 4, generator=g)
    B *= 0.05 * step / float((B @ A).std())
    module = Module("w", A, B, alpha=4.0)
    rows = {}
    for weight in (1.0, requant.COHERENT_BIAS_WEIGHT):
        stored = {k: v.clone() for k, v in tensors.items()}
        new, rows[weight] = requant.requantize(
            fmt, TensorDict(stored), members, [(module, 1.0)], 1.0, "auto", bias_weight=weight
        )
    assert rows[1.0]["strategy"] == "keep" and rows[1.0]["retention"] == 0.0
    chosen = rows[requant.COHERENT_BIAS_WEIGHT]
    assert chosen["strategy"] == "stochastic" and chosen["bias_weight"] == requant.COHERENT_BIAS_WEIGHT
    assert abs(chosen["retention"] - 1) < 0.1
    assert requant.weighted(chosen, requant.COHERENT_BIAS_WEIGHT) < requant.COHERENT_BIAS_WEIGHT


def test_a_merge_reports_the_coherence_auto_weighed(tmp_path, cli):
    """Through the CLI: an adapter whose modules share output directions across layers is reported coherent (z and
    the weight, in JSON and in words); a random one is not, and auto then scores as before."""
    examples.write_quantized_llama(tmp_path / "q", "int8", layers=4, hidden=128, intermediate=256)
    shapes = examples.llama_shapes(layers=4, hidden=128, intermediate=256)
    ad = examples.random_adapter(shapes, targets=examples.LINEAR_TARGETS, magnitude=1e-3)
    ad.save(tmp_path / "random.safetensors")
    g = torch.Generator().manual_seed(1)
    shared = {}
    for name, m in ad.modules.items():
        kind, (d, r) = name.rsplit(".", 1)[-1], m.B.shape
        G = shared.setdefault(kind, torch.randn(d, 4, generator=g))
        B = G @ torch.randn(4, r, generator=g) + 0.5 * torch.randn(d, r, generator=g)
        m.B = B * (float(m.B.norm()) / float(B.norm()))
    ad.save(tmp_path / "coherent.safetensors")
    for name, weight in (("coherent", 30.0), ("random", 1.0)):
        code, out, err = cli(
            "merge",
            tmp_path / "q",
            tmp_path / f"{name}.safetensors",
            "-o",
            tmp_path / f"j{name}",
            "-q",
            "--json",
        )
        q = json.loads(out)["quantization"]
        coherence = q["coherence"]
        assert code == 0 and coherence["bias_weight"] == weight and (coherence["z"] > 10) == (weight > 1), out
        # the verdict weighs each module's error as auto did: its weighted score over the weight (keep: 1)
        from lorakit.quant.requant import weighted

        rms = (sum(weighted(m, weight) / weight for m in q["modules"]) / len(q["modules"])) ** 0.5
        assert q["verdict"]["output_error"] == pytest.approx(rms)
        code, out, err = cli(
            "merge", tmp_path / "q", tmp_path / f"{name}.safetensors", "-o", tmp_path / f"t{name}", "-q"
        )
        assert ("share output directions across layers" in out) == (weight > 1), out


def test_merge_report_is_short_by_default_whole_with_v_in_natural_order(tmp_path, cli):
    from lorakit import examples

    examples.write_quantized_llama(tmp_path / "q", "int8", layers=11, hidden=64, intermediate=128)
    shapes = examples.llama_shapes(layers=11, hidden=64, intermediate=128)
    examples.random_adapter(shapes, targets=examples.LINEAR_TARGETS, magnitude=0.1).save(
        tmp_path / "a.safetensors"
    )
    code, out, err = cli("merge", tmp_path / "q", tmp_path / "a.safetensors", "-o", tmp_path / "m", "-q")
    rows = [line for line in out.splitlines() if line.startswith("  model.layers.")]
    assert code == 0 and len(rows) == 8 and "(-v: every one)" in out, out
    code, out, err = cli(
        "merge", tmp_path / "q", tmp_path / "a.safetensors", "-o", tmp_path / "v", "-q", "-v"
    )
    rows = [line.split()[0] for line in out.splitlines() if line.startswith("  model.layers.")]
    assert len(rows) == 77 and rows.index("model.layers.2.mlp.down_proj") < rows.index(
        "model.layers.10.mlp.down_proj"
    )
    code, out, err = cli(
        "merge", tmp_path / "q", tmp_path / "a.safetensors", "-o", tmp_path / "j", "-q", "--json"
    )
    modules = [m["module"] for m in json.loads(out)["quantization"]["modules"]]
    assert modules == [r.removesuffix(".weight") for r in rows] and len(modules) == 77


@pytest.mark.parametrize(
    "fmt, tensor, dtype, message",
    [
        (
            "gptq",
            "model.layers.0.mlp.up_proj.scales",
            torch.int32,
            "scales is I32: expected F32 or BF16 or F16",
        ),
        ("gptq", "model.layers.0.mlp.up_proj.qzeros", torch.uint8, "qzeros is U8: expected I32"),
        (
            "awq",
            "model.layers.0.mlp.up_proj.scales",
            torch.uint8,
            "scales is U8: expected F32 or BF16 or F16",
        ),
        ("nf4", "model.layers.0.mlp.up_proj.weight.absmax", torch.int32, "absmax is I32, expected"),
    ],
)
def test_quantized_tensors_of_another_dtype_are_refused(tmp_path, cli, fmt, tensor, dtype, message):
    """A scale or zero point stored in another dtype than its format's reads as other numbers: refused in one line
    (each merged with exit 0 before; found by fuzzing)."""

    def change(config, tensors):
        tensors[tensor] = tensors[tensor].to(dtype)

    code, out, err = merge_changed(tmp_path, cli, fmt, change, "model.layers.0.mlp.up_proj")
    assert_one_line_error(code, out, err, message)
    assert not (tmp_path / "out").exists()


def merge_changed(tmp_path, cli, fmt, change, module):
    """`lorakit merge` of a LoRA on `module` into a small `fmt` base whose config and tensors `change` edited."""
    from safetensors.torch import load_file, save_file

    examples.write_quantized_llama(tmp_path / "q", fmt, hidden=128, intermediate=256)
    shard, config_path = next((tmp_path / "q").glob("*.safetensors")), tmp_path / "q" / "config.json"
    tensors, config = load_file(shard), json.load(open(config_path))
    change(config, tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    json.dump(config, open(config_path, "w"))
    out, inn = (128, 256) if "down_proj" in module else (256, 128)
    a = Adapter()
    a.add(Module(module, torch.randn(4, inn) * 0.02, torch.randn(out, 4) * 0.02, alpha=4.0))
    a.save(tmp_path / "a.safetensors")
    return cli("merge", tmp_path / "q", tmp_path / "a.safetensors", "-o", tmp_path / "out")


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda c, t: c["quantization_config"].update(group_size={}),
            "GPTQ group_size {}: expected a positive",
        ),
        (
            lambda c, t: c["quantization_config"].update(group_size=64),
            "scales has 8 groups: group_size 64 of 256 inputs makes 4",
        ),
        (
            lambda c, t: t.update(
                {"model.layers.1.mlp.down_proj.g_idx": torch.full((256,), 9, dtype=torch.int32)}
            ),
            "g_idx holds groups outside 0..7",
        ),
    ],
)
def test_gptq_groups_against_the_config_and_g_idx(tmp_path, cli, change, message):
    """GPTQ's groups as the config and g_idx say them, checked against the scales (a group_size that is no number
    read every column with the first group's scale, exit 0; found by fuzzing)."""
    code, out, err = merge_changed(tmp_path, cli, "gptq", change, "model.layers.1.mlp.down_proj")
    assert_one_line_error(code, out, err, message)
    assert not (tmp_path / "out").exists()


def test_awq_group_size_that_is_no_number_is_refused(tmp_path, cli):
    change = lambda c, t: c["quantization_config"].update(group_size="x")  # noqa: E731 (it was a division by "x")
    code, out, err = merge_changed(tmp_path, cli, "awq", change, "model.layers.1.mlp.down_proj")
    assert_one_line_error(code, out, err, "AWQ group_size 'x': expected a positive integer")


def _row(error, retention):
    return {"probe_error_random": error, "probe_error_aligned": error, "retention": retention}


def test_auto_picks_the_smallest_weighted_error_and_keeps_the_codes_within_the_tie():
    """pick: the smallest error wins; keep unless the best beats it by TIE; with the bias weighted (a coherent
    adapter) the choice is made on the weighted errors."""
    from lorakit.quant.requant import TIE, pick

    keep = _row(1.0, 0.0)
    assert pick({"keep": keep, "same-grid": _row(0.5, 0.9), "rescale": _row(0.51, 0.9)}) == "same-grid"
    assert pick({"keep": keep, "rescale": _row(0.5, 0.9), "same-grid": _row(0.51, 0.9)}) == "rescale"
    assert pick({"keep": keep, "same-grid": _row((1 - TIE / 2) ** 0.5, 0.1)}) == "keep"
    assert pick({"keep": keep, "same-grid": _row((1 - 2 * TIE) ** 0.5, 0.1)}) == "same-grid"
    # weighted 30x: rescale's bias (1 - 0.9)^2 x 29 = 0.29 on top of 0.25 against stochastic's 0.3 alone
    trials = {"keep": keep, "stochastic": _row(0.3**0.5, 1.0), "rescale": _row(0.5, 0.9)}
    assert pick(trials) == "rescale" and pick(trials, bias_weight=30.0) == "stochastic"
