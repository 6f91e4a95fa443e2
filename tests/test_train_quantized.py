"""Training on a quantized base kept as its codes (#28): each frozen layer dequantizes exactly as its format does,
QLoRA's NF4 is bitsandbytes', a GPTQ / GGUF base trains as its dequantized fp32 weights do, the loss curve of
--quantize nf4 is PEFT + bitsandbytes', and an adapter trained on codes merges back into them."""

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import peft
import pytest
import torch
import torch.nn.functional as F
import transformers

gguf = pytest.importorskip("gguf")
bnb_functional = pytest.importorskip("bitsandbytes.functional")

import lorakit  # noqa: E402
from lorakit import examples  # noqa: E402
from lorakit.bases import open_base  # noqa: E402
from lorakit.examples import TensorDict, quantize_gguf  # noqa: E402
from lorakit.naming.llama_cpp import hf_config, permute  # noqa: E402
from lorakit.quant.gguf import TYPES, GGUFBlocks  # noqa: E402
from lorakit.training import frozen, lora, native  # noqa: E402
from lorakit.training.data import get_batch, load_data, split  # noqa: E402
from lorakit.training.loop import compute_dtype, learning_rate  # noqa: E402
from lorakit.training.model import LlamaForCausalLM  # noqa: E402
from lorakit.training.model import dequantized  # noqa: E402

ALL_LINEAR = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
GGUF_SIZE = dict(layers=2, hidden=256, intermediate=512, vocab=64, heads=4, kv_heads=2)
GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    d = tmp_path_factory.mktemp("qtask")
    examples.write_permutation_task(str(d))
    return d


def train(base, data, out, **kw):
    """fp32 compute unless a test says otherwise: these compare training on codes with the dequantized weights."""
    args = dict(rank=8, alpha=16, targets=ALL_LINEAR, steps=10, lr=3e-3, batch=16, seq_len=32, eval_every=0)
    args["dtype"] = "float32"
    return lorakit.train(base, data, out, quiet=True, force=True, **{**args, **kw})


@pytest.mark.parametrize("fmt", ["gptq", "awq", "nf4", "int8", "fp8", "fp8-block"])
def test_frozen_layers_dequantize_as_their_format(fmt, tmp_path):
    examples.write_quantized_llama(tmp_path, fmt, hidden=128, intermediate=256)
    model, base = LlamaForCausalLM.from_pretrained(str(tmp_path)), open_base(tmp_path)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, frozen.FrozenLinear)}
    assert len(layers) == 14
    for name, layer in layers.items():
        assert torch.equal(layer.dequantize(), base.view.get(name + ".weight")), name
        # the layer holds what the checkpoint stores, not fp32 weights: at most 1.25 byte a weight (int8 / fp8
        # codes, a scale a row), 0.75 for 4-bit codes with group scales and zeros
        table = sum(
            t.numel() * t.element_size() for t in (layer.table, layer.lut) if t is not None
        )  # 1-2 KB a layer, whatever its size
        per_weight = (layer.stored_bytes() - table) / (layer.out_features * layer.in_features)
        assert per_weight <= (0.75 if fmt in ("gptq", "awq", "nf4") else 1.25), (name, per_weight)


@pytest.mark.parametrize("fmt", ["gptq", "awq", "nf4", "int8", "fp8-block"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_cpu_workspace_dequantizes_bit_for_bit(fmt, dtype, tmp_path):
    """Training dequantizes into buffers reused by every layer (no heap churn): the same bits as a fresh
    dequantization rounded once to the compute dtype, whatever layer used the buffers before."""
    examples.write_quantized_llama(tmp_path, fmt, hidden=128, intermediate=256)
    model = LlamaForCausalLM.from_pretrained(str(tmp_path))
    layers = [m for m in model.modules() if isinstance(m, frozen.FrozenLinear)]
    workspace = frozen.Workspace()
    for layer in layers + layers[::-1]:  # large after small and small after large
        W = layer.dequantize(dtype, workspace)
        assert W.dtype == dtype and W.shape == layer.weight_shape
        assert torch.equal(W, layer.dequantize().to(dtype))
    kernel = [m for m in layers if m.lut is not None]  # 4-bit codes in groups of 16k: the C kernel's
    assert bool(kernel) == (fmt in ("gptq", "awq", "nf4"))
    if kernel and native.kernel() is None:  # only where the machine cannot build it
        assert native_unavailable_here()
    elif kernel:
        assert set(workspace.buffers) == {("weight", dtype)}  # written once, without torch's temporaries


def test_without_the_c_kernel_training_says_so_and_learns_the_same(task, tmp_path, monkeypatch):
    a = train(task / "base", task / "data.npy", tmp_path / "a.safetensors", quantize="nf4")
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("CC", "false")  # a compiler that fails
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    b = train(task / "base", task / "data.npy", tmp_path / "b.safetensors", quantize="nf4")
    assert native.kernel() is None and a["losses"] == b["losses"]
    assert any("dequantized by pure torch" in n for n in b["notes"])
    assert not any("pure torch" in n for n in a["notes"]) or native_unavailable_here()


def test_a_cached_kernel_that_does_not_load_is_built_again(tmp_path):
    """A file in the kernel cache cut short (a crash while another process copied it, a full disk) is not trusted:
    the next process builds the kernel again (each step in its own process: a loaded library is never rewritten)."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    probe = "from lorakit.training import native; print(native.kernel() is not None)"
    first = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    built = list((tmp_path / "lorakit" / "kernels").glob("*.so"))
    if native_unavailable_here():
        assert first.stdout.strip() == "False"
        return
    assert first.stdout.strip() == "True" and len(built) == 1
    built[0].write_bytes(b"not a shared library")
    again = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert again.stdout.strip() == "True" and built[0].stat().st_size > 1000


def native_unavailable_here():
    return not torch.cpu._is_avx512_supported() or shutil.which(os.environ.get("CC", "cc")) is None


def test_auto_compute_dtype_is_bf16_for_codes_on_a_cpu_with_bf16_instructions():
    cpu, bf16_cpu = torch.device("cpu"), torch.cpu._is_avx512_bf16_supported()
    assert compute_dtype("auto", cpu, codes=True) == (torch.bfloat16 if bf16_cpu else torch.float32)
    assert compute_dtype("auto", cpu, codes=False) == torch.float32  # a dense base: the exact reference
    assert compute_dtype("auto", torch.device("cuda"), codes=False) == torch.bfloat16
    assert compute_dtype("float32", cpu, codes=True) == torch.float32


# bytes a weight a FrozenLinear keeps for each GGML type (the 256 codes' values aside): 4-bit codes or fewer two a
# byte, wider ones a byte; fp16 scales (and mins) in fp16, the K types' as their fp16 d and integer sub-block scales
GGML_BYTES = {
    "Q8_0": 1.0625,
    "Q4_0": 0.5625,
    "Q4_1": 0.625,
    "Q5_0": 1.0625,
    "Q5_1": 1.125,
    "Q2_K": 0.65,
    "Q3_K": 0.575,
    "Q4_K": 0.58,
    "Q5_K": 1.08,
    "Q6_K": 1.075,
}


@pytest.mark.parametrize("kind", sorted(TYPES))
def test_frozen_gguf_blocks_dequantize_as_ggml(kind):
    W = torch.randn(64, 1024, generator=torch.Generator().manual_seed(1)) * 0.02
    ckpt = TensorDict({"w": quantize_gguf(W, kind)}, {"w": (kind, (64, 1024))})
    fmt = GGUFBlocks()
    layer = frozen.FrozenLinear(fmt.stored(ckpt, {"weight": "w"}))
    expected = fmt.dequantize(ckpt, {"weight": "w"})
    assert torch.equal(layer.dequantize(), expected)
    for dtype in (torch.float32, torch.bfloat16):  # the training path (the C kernel for the 2-4 bit types)
        assert torch.equal(layer.dequantize(dtype, frozen.Workspace()), expected.to(dtype))
    assert (layer.lut is not None) == (kind in ("Q2_K", "Q3_K", "Q4_0", "Q4_1", "Q4_K"))  # codes of <= 4 bits
    table = sum(t.numel() * t.element_size() for t in (layer.table, layer.lut) if t is not None)
    assert layer.stored_bytes() - table <= GGML_BYTES[kind] * W.numel() + 16


@pytest.mark.parametrize("shape", [(512, 1024), (384, 160)])  # rows of 160: blocks of 64 span rows
def test_nf4_on_load_is_bitsandbytes_qlora(shape):
    """QLoRA's recipe (nf4, blocks of 64, double quantization) against bitsandbytes itself: the 4-bit codes are
    the same; the absmax values too, except in the few blocks where bitsandbytes' CPU binary search picks the
    other of two 8-bit codes a value lies halfway between (its reference implementation, the nearest code, is
    lorakit's)."""
    W = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02
    packed, state = bnb_functional.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
    theirs = bnb_flat_dequantize(packed, state)
    ours = frozen.nf4_stored(W)
    flat = packed.reshape(-1)
    assert torch.equal(
        torch.stack([flat >> 4, flat & 15], 1).reshape(-1), ours.codes.reshape(-1).to(torch.uint8)
    )
    assert torch.equal(frozen.dynamic_map(), state.state2.code)
    absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    mine = ours.grid.S.T.reshape(-1, 64 // math.gcd(shape[1], 64))[
        :, 0
    ]  # a block's value from its first segment
    assert (absmax != mine).float().mean() < 0.005
    assert ((absmax - mine).abs() / absmax).max() < 0.02  # one step of the 8-bit dynamic code
    layer = frozen.FrozenLinear(ours)
    assert torch.equal(layer.dequantize(), ours.dequantize())
    assert ((layer.dequantize() - theirs).abs().max() / W.abs().max()) < 0.01
    # the goal for NF4: <= 0.6 byte a weight; rows that are not whole blocks keep a scale per segment of gcd(in,
    # 64) columns (5 a row of 160: 0.66 byte a weight)
    assert layer.stored_bytes() / W.numel() <= (0.6 if shape[1] % 64 == 0 else 0.7)


def bnb_flat_dequantize(packed, state):
    """bitsandbytes' NF4 dequantization as its reference backend (backends/default) computes it: blocks over the
    flattened weight. Its CPU C++ kernel (0.50.2) disagrees with its own quantizer for rows that are not whole blocks
    (rows of 160: 5% of the largest weight off), so the tests take the reference formula."""
    absmax = state.absmax
    if state.nested:
        absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    flat = packed.view(torch.uint8).reshape(-1)
    n = math.prod(state.shape)
    codes = torch.stack([flat >> 4, flat & 15], 1).reshape(-1)[:n].long()
    values = state.code.float()[codes] * absmax.float().repeat_interleave(state.blocksize)[:n]
    return values.reshape(state.shape)


def test_backward_saves_no_weight_and_matches_fp64():
    W = torch.randn(96, 128, generator=torch.Generator().manual_seed(2)) * 0.05
    layer = frozen.FrozenLinear(frozen.quantize(W, "int8"), bias=torch.randn(96))
    x = torch.randn(4, 7, 128, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = layer(x)
    assert sum(saved) < W.numel()  # neither W nor its dequantized copy is kept for backward
    g = torch.randn_like(y)
    y.backward(g)
    Wd = layer.dequantize().double()
    assert torch.allclose(y.double(), x.double() @ Wd.T + layer.bias.double(), atol=1e-5)
    assert torch.allclose(x.grad.double(), g.double() @ Wd, atol=1e-5)


def test_gptq_base_trains_as_its_dequantized_weights(tmp_path, task):
    """Kept as codes or dequantized to fp32 first: the same training, loss for loss."""
    data = task / "data.npy"
    examples.write_quantized_llama(tmp_path / "q", "gptq", vocab=64)
    dense = write_dequantized(tmp_path / "q", tmp_path / "dense")
    a = train(tmp_path / "q", data, tmp_path / "a.safetensors")
    b = train(dense, data, tmp_path / "b.safetensors")
    assert a["frozen_layers"] == 14 and b["frozen_layers"] == 0
    assert a["base_codes"] == {"format": "gptq", "source": "base"}
    rel = np.abs(np.array(a["losses"]) - b["losses"]) / np.array(b["losses"])
    assert rel.max() <= 1e-4 and a["losses"][-1] < a["losses"][0]


@pytest.mark.parametrize("kind", ["Q4_K", "Q8_0", "Q4_1"])
def test_gguf_base_trains_as_its_dequantized_weights(kind, tmp_path):
    """A llama.cpp GGUF (its names, Q/K row order and config from its KVs) trains in place, as its codes."""
    examples.write_permutation_task(str(tmp_path))
    tensors = examples.random_tensors(examples.llama_shapes(**GGUF_SIZE), seed=3)
    model = write_gguf(tmp_path / "m.gguf", tensors, kind)
    dense = write_dequantized(model, tmp_path / "dense")
    ref = LlamaForCausalLM.from_pretrained(str(tmp_path / "dense"))
    kept = LlamaForCausalLM.from_pretrained(str(model))
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(kept(ids), ref(ids), atol=1e-5)
    data = tmp_path / "data.npy"
    a = train(model, data, tmp_path / "a.safetensors")
    b = train(dense, data, tmp_path / "b.safetensors")
    assert a["frozen_layers"] == 14 and a["base_codes"]["format"] == "gguf"
    rel = np.abs(np.array(a["losses"]) - b["losses"]) / np.array(b["losses"])
    assert rel.max() <= 1e-4
    # the adapter is in Hugging Face names; lorakit merge puts it back into the GGUF's own rows and types
    # (stochastic rounding: unbiased, so a wrong row or type would show; the default auto is checked after)
    merged, default = tmp_path / "merged.gguf", tmp_path / "default.gguf"
    report = lorakit.merge(
        model, [str(tmp_path / "a.safetensors")], merged, strategy="stochastic", quiet=True
    )
    assert report["quantization"]["format"] == "gguf"
    lorakit.merge(model, [str(tmp_path / "a.safetensors")], default, quiet=True)
    with torch.no_grad():
        runtime = adapted(str(model), tmp_path / "a.safetensors")(ids)
        unmerged = (kept(ids) - runtime).abs().max()
        error = (LlamaForCausalLM.from_pretrained(str(merged))(ids) - runtime).abs().max()
        assert error < 0.5 * unmerged  # (Q4_K keeps the least: 0.37 here)
        assert (LlamaForCausalLM.from_pretrained(str(default))(ids) - runtime).abs().max() < unmerged


def test_qlora_loss_curve_matches_peft_and_bitsandbytes(task, tmp_path):
    """lorakit train --quantize nf4 against PEFT on transformers' model quantized by bitsandbytes (nf4, double
    quantization, fp32 compute), from the same initial factors, on the same batches with the same schedule."""
    steps, lr, batch, seq = 30, 3e-3, 16, 32
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    hf = transformers.LlamaForCausalLM.from_pretrained(
        task / "base", quantization_config=config, device_map="cpu", dtype=torch.float32
    )
    torch.manual_seed(0)
    lora_config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=ALL_LINEAR.split(","), lora_dropout=0.0)
    pm = peft.get_peft_model(hf, lora_config)
    pm.save_pretrained(tmp_path / "init")  # PEFT's initial factors: lorakit starts from them too
    ours = train(
        task / "base",
        task / "data.npy",
        tmp_path / "a.safetensors",
        steps=steps,
        quantize="nf4",
        resume=str(tmp_path / "init"),
    )
    assert ours["frozen_layers"] == 14 and ours["base_codes"]["format"] == "nf4"
    kind, tokens = load_data(task / "data.npy", 64)
    train_data, _ = split(kind, tokens, seq)
    g = torch.Generator().manual_seed(0)
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    pm.train()  # (bitsandbytes repacks 4-bit weights for its CPU kernel in eval mode only)
    theirs = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, steps, lr, max(1, steps // 10))
        x, y = get_batch(kind, train_data, batch, seq, g)
        logits = pm(input_ids=x).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        theirs.append(loss.item())
    rel = np.abs(np.array(ours["losses"]) - theirs) / np.array(theirs)
    assert rel.max() < 0.01, (ours["losses"], theirs)
    assert theirs[-1] < theirs[0] / 2  # it learns: the comparison is of a real curve


def test_trained_on_codes_merges_back_into_them(task, tmp_path, cli):
    """The adapter records the quantized base; merged into it, the codes are the ones training saw: a
    full-precision merge gives the runtime logits, a merge kept in the format says what requantization cost."""
    examples.write_quantized_llama(tmp_path / "q", "nf4", vocab=64)
    r = train(tmp_path / "q", task / "data.npy", tmp_path / "a.safetensors", steps=20)
    ad = lorakit.load(tmp_path / "a.safetensors")
    assert ad.base_identity == open_base(tmp_path / "q").identity
    assert ad.provenance["base_codes"] == {"format": "nf4", "source": "base"} == r["base_codes"]
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        runtime = adapted(str(tmp_path / "q"), tmp_path / "a.safetensors")(ids)
        lorakit.merge(
            tmp_path / "q", [str(tmp_path / "a.safetensors")], tmp_path / "fp", dtype="float32", quiet=True
        )
        dense = LlamaForCausalLM.from_pretrained(str(tmp_path / "fp"))(ids)
        assert (dense - runtime).abs().max() <= 1e-4
        code, out, err = cli(
            "merge",
            tmp_path / "q",
            tmp_path / "a.safetensors",
            "-o",
            tmp_path / "kept",
            "--strategy",
            "rescale",
            "--json",
        )
        assert code == 0, err
        report = json.loads(out)
        assert not any("base identity differs" in n for n in report["notes"])
        survival = report["quantization"]
        assert survival["format"] == "nf4" and 0 < survival["mean_retention"] <= 1.0
        kept = LlamaForCausalLM.from_pretrained(str(tmp_path / "kept"))
        assert sum(isinstance(m, frozen.FrozenLinear) for m in kept.modules()) == 14
        base = LlamaForCausalLM.from_pretrained(str(tmp_path / "q"))(ids)
        # requantized: nearer the adapted model than the base is
        assert (kept(ids) - runtime).abs().max() < (base - runtime).abs().max()


def test_checkpointing_changes_nothing_but_memory(task, tmp_path):
    a = train(task / "base", task / "data.npy", tmp_path / "a.safetensors", quantize="nf4")
    b = train(
        task / "base", task / "data.npy", tmp_path / "b.safetensors", quantize="nf4", checkpointing=True
    )
    assert np.allclose(a["losses"], b["losses"], rtol=1e-6)
    assert b["memory_estimate"]["activations"] < a["memory_estimate"]["activations"]
    c = train(task / "base", task / "data.npy", tmp_path / "c.safetensors")
    assert a["memory_estimate"]["base"] < c["memory_estimate"]["base"]
    # the parts: the codes are the frozen layers' bytes; the rest of the base is its full-precision tensors
    parts = a["memory_estimate"]
    assert parts["codes"] == a["frozen_bytes"] and c["memory_estimate"]["codes"] == 0
    assert parts["base"] == parts["codes"] + parts["weights"]
    assert parts["total"] == sum(
        parts[k] for k in ("codes", "weights", "trainable", "activations", "workspace")
    )


def test_bad_quantized_training_is_refused_before_the_first_step(task, tmp_path, cli):
    examples.write_quantized_llama(tmp_path / "q", "int8", vocab=64)
    base = ["train", "--data", task / "data.npy", "-o", tmp_path / "x.safetensors"]
    code, _, err = cli(*base, "--base", tmp_path / "q", "--quantize", "nf4")
    assert code == 2 and "already quantized (int8)" in err and "leave --quantize out" in err
    code, _, err = cli(*base, "--base", task / "base", "--quantize", "nf3")
    assert code == 2 and "nf3" in err
    code, _, err = cli(*base, "--base", task / "base", "--max-memory", "lots")
    assert code == 2 and "cannot read --max-memory 'lots'" in err
    code, _, err = cli(*base, "--base", task / "base", "--max-memory", "2MB")
    assert code == 2 and "over --max-memory 2MB" in err and "--checkpointing" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "x.safetensors").exists()
    # without --max-memory, a run over all the machine's memory could only end killed: refused before the first step
    from lorakit.devices import device_memory

    ram = device_memory(torch.device("cpu"))
    code, _, err = cli(*base, "--base", task / "base", "--batch", "10000000", "--seq-len", "8")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    from lorakit.render import human_size

    assert (
        f"over all {human_size(ram)} of memory this machine has: use --quantize nf4, --checkpointing" in err
    )
    assert not (tmp_path / "x.safetensors").exists()


# ----------------------------------------------------------------------------- helpers
def adapted(base, adapter):
    """lorakit's model on `base` with the adapter applied at runtime."""
    model = LlamaForCausalLM.from_pretrained(base)
    ad = lorakit.load(adapter)
    lora.inject(model, ALL_LINEAR, rank=8, alpha=16)
    lora.load_into(model, ad)
    return model


def write_dequantized(base, folder):
    """The fp32 Hugging Face folder of a base's dequantized weights (Hugging Face names and row order)."""
    config, tensors = dequantized(open_base(base))
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    examples.write_sharded(folder, tensors)
    return folder


def write_gguf(path, tensors, kind):
    """A llama-architecture GGUF of HF-named tensors: llama.cpp's names, Q/K rows permuted, linear weights in
    `kind` (GGML blocks by lorakit's quantizer), norms F32, embeddings F16, the head F32."""
    c = GGUF_SIZE
    w = gguf.GGUFWriter(os.fspath(path), "llama")
    w.add_block_count(c["layers"])
    w.add_uint32("llama.embedding_length", c["hidden"])
    w.add_uint32("llama.feed_forward_length", c["intermediate"])
    w.add_uint32("llama.attention.head_count", c["heads"])
    w.add_uint32("llama.attention.head_count_kv", c["kv_heads"])
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float32("llama.rope.freq_base", 10000.0)
    for name, t in tensors.items():
        if name == "model.embed_tokens.weight":
            w.add_tensor("token_embd.weight", t.half().numpy())
        elif name == "lm_head.weight":
            w.add_tensor("output.weight", t.numpy())
        elif name == "model.norm.weight":
            w.add_tensor("output_norm.weight", t.numpy())
        else:
            layer, rest = name[len("model.layers.") :].split(".", 1)
            module = rest[: -len(".weight")]
            g = f"blk.{layer}.{GGUF_NAMES[module]}.weight"
            if t.dim() == 1:
                w.add_tensor(g, t.numpy())
                continue
            if module in ("self_attn.q_proj", "self_attn.k_proj"):
                t = permute(t, c["heads"], c["kv_heads"] if module.endswith("k_proj") else None)
            raw = quantize_gguf(t.float().contiguous(), kind).numpy().reshape(t.shape[0], -1)
            w.add_tensor(g, raw, raw_dtype=gguf.GGMLQuantizationType[kind])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_config_is_read_from_its_keys(tmp_path):
    tensors = examples.random_tensors(examples.llama_shapes(**GGUF_SIZE), seed=3)
    base = open_base(write_gguf(tmp_path / "m.gguf", tensors, "Q8_0"))
    config = hf_config(base.kv, 64, tied=False)
    assert (
        config["hidden_size"] == 256
        and config["num_key_value_heads"] == 2
        and config["rms_norm_eps"] == pytest.approx(1e-6)
    )


def test_merge_says_which_codes_the_adapter_saw(task, tmp_path):
    train(task / "base", task / "data.npy", tmp_path / "a.safetensors", quantize="int8", steps=2)
    r = lorakit.merge(task / "base", [str(tmp_path / "a.safetensors")], tmp_path / "m", quiet=True)
    assert any("trained on int8 codes of this base made on load" in n for n in r["notes"])
    examples.write_quantized_llama(tmp_path / "q", "fp8", vocab=64)
    train(tmp_path / "q", task / "data.npy", tmp_path / "b.safetensors", steps=2)
    r = lorakit.merge(task / "base", [str(tmp_path / "b.safetensors")], tmp_path / "m2", quiet=True)
    assert any("was trained on a fp8 base; merging into a full-precision one" in n for n in r["notes"])


def test_gptq_beats_nearest_on_a_fixed_hessian():
    """GPTQ's objective: with the inputs' second moment H fixed, the weighted error tr(E H E^T) of --strategy gptq
    is below round-to-nearest's on the same grid and below feedback through the adapter's A alone; H compressed to
    its top eigenpairs plus the mean of the rest does nearly as well as H itself."""
    from lorakit.core import Module
    from lorakit.quant import requant
    from lorakit.quant.int8 import Int8Channel
    from lorakit.training.calibration import top_factor

    g = torch.Generator().manual_seed(7)
    out, inn, r = 32, 128, 4
    W = torch.randn(out, inn, generator=g) * 0.02
    tensors = {f"w.{k}": v for k, v in examples.quantize(W, "int8").items()}
    members = {"weight": "w.weight", "weight_scale": "w.weight_scale"}
    mixing = torch.randn(inn, inn, generator=g) * torch.logspace(0, -2, inn)[None, :]  # a decaying spectrum
    X = torch.randn(2048, inn, generator=g) @ mixing.T
    H = (X.T @ X).double()
    module = Module(
        "w", torch.randn(r, inn, generator=g) * 0.1, torch.randn(out, r, generator=g) * 0.01, alpha=4
    )
    fmt = Int8Channel()
    target = fmt.dequantize(examples.TensorDict(tensors), members).double() + module.delta().double()

    def weighted_error(strategy, inputs=None):
        stored = {k: v.clone() for k, v in tensors.items()}
        new, _ = requant.requantize(
            fmt, examples.TensorDict(stored), members, [(module, 1.0)], 1.0, strategy, inputs=inputs
        )
        E = fmt.dequantize(examples.TensorDict({**stored, **new}), members).double() - target
        return float(torch.trace(E @ H @ E.T))

    nearest = weighted_error("same-grid")
    exact = weighted_error("gptq", top_factor(H, rank=inn))
    assert exact < 0.5 * nearest and exact < weighted_error("feedback")
    assert weighted_error("gptq", top_factor(H, rank=32)) < 0.7 * nearest


def test_merge_with_calibration_reports_the_model_s_kl(task, tmp_path, cli):
    examples.write_quantized_llama(tmp_path / "q", "int8", vocab=64, hidden=128, intermediate=256)
    train(tmp_path / "q", task / "data.npy", tmp_path / "a.safetensors", steps=30)
    code, out, err = cli(
        "merge",
        tmp_path / "q",
        tmp_path / "a.safetensors",
        "-o",
        tmp_path / "c",
        "--calibration",
        task / "data.npy",
        "--json",
        "-q",
    )
    assert code == 0, err
    q = json.loads(out)["quantization"]
    assert list(q)[:3] == ["kl", "kl_no_adapter", "kl_tokens"] and q["kl"] < q["kl_no_adapter"]
    assert q["strategy"].startswith("auto: gptq x ") and all(
        "probe_error_calibration" in m for m in q["modules"]
    )
    from lorakit.training.calibration import calibrate, estimate

    ad = lorakit.load(tmp_path / "a.safetensors")
    calibration = calibrate(open_base(tmp_path / "q"), [("a", ad, 1.0)], task / "data.npy")
    assert estimate(calibration, tmp_path / "c", tmp_path / "q")["kl"] == pytest.approx(q["kl"], rel=1e-6)
    for strategy in ("feedback", "same-grid", "rescale"):  # without the data: worse on the model's output
        lorakit.merge(
            tmp_path / "q",
            [str(tmp_path / "a.safetensors")],
            tmp_path / strategy,
            strategy=strategy,
            quiet=True,
        )
        assert q["kl"] < estimate(calibration, tmp_path / strategy, tmp_path / "q")["kl"]
    code, _, err = cli(
        "merge",
        tmp_path / "q",
        tmp_path / "a.safetensors",
        "-o",
        tmp_path / "x",
        "--calibration",
        task / "data.npy",
        "--strategy",
        "rescale",
    )
    assert code == 2 and "--calibration is for --strategy gptq (auto picks it), not 'rescale'" in err
    code, _, err = cli(
        "merge",
        task / "base",
        tmp_path / "a.safetensors",
        "-o",
        tmp_path / "x",
        "--calibration",
        task / "data.npy",
    )
    assert code == 2 and "--calibration is for quantized bases" in err and not (tmp_path / "x").exists()


def test_calibrated_merge_warns_when_the_model_ends_further_than_without_it(task, tmp_path, cli, monkeypatch):
    """--calibration's model-level figures decide a warning of their own: a merged model further from the adapted
    one than the base is said in words with the ways out that fit; nearer, or equal (every code kept: the grid's
    warning says it), is not."""
    from lorakit.engine.report import model_worse
    from lorakit.training import calibration

    examples.write_quantized_llama(tmp_path / "q", "nf4", vocab=64, hidden=128, intermediate=256)
    train(tmp_path / "q", task / "data.npy", tmp_path / "a.safetensors", steps=5)
    args = ["merge", tmp_path / "q", tmp_path / "a.safetensors", "-o", tmp_path / "c", "--force"]
    args += ["--calibration", task / "data.npy", "--json", "-q"]
    code, out, err = cli(*args)
    report = json.loads(out)
    q = report["quantization"]
    assert code == 0 and q["kl"] < q["kl_no_adapter"] and model_worse(q) is None
    assert not any("further from the adapted model" in n for n in report["notes"])
    assert model_worse({**q, "kl": q["kl_no_adapter"]}) is None
    measured = calibration.estimate
    monkeypatch.setattr(  # the figures of a merge that moved the model away (the engine's output stands as it is)
        calibration, "estimate", lambda *a: {**measured(*a), "kl": 2 * measured(*a)["kl_no_adapter"]}
    )
    code, out, err = cli(*args)
    report = json.loads(out)
    warning = [n for n in report["notes"] if "further from the adapted model" in n]
    q = report["quantization"]
    assert code == 0 and len(warning) == 1, report["notes"]
    assert f"KL {q['kl']:.3e} per token against {q['kl_no_adapter']:.3e} on 1024 held-out" in warning[0]
    assert "--for vllm" in warning[0] and "--dtype bf16" in warning[0] and "an 8-bit base" in warning[0]
    assert "--calibration DATA" not in warning[0]  # it was given


def test_quantize_nf4_on_rows_that_are_not_whole_blocks(tmp_path):
    """A model whose MLP rows are 160 wide: --quantize nf4 keeps bitsandbytes' blocks of 64 across rows, each
    frozen layer is nf4_stored of its weight, and the loss falls as it does at 128-wide rows."""
    base, data = examples.write_permutation_task(str(tmp_path))
    examples.write_llama_checkpoint(tmp_path / "wide", vocab=64, hidden=64, intermediate=160)
    r = train(tmp_path / "wide", data, tmp_path / "a.safetensors", quantize="nf4", steps=30)
    assert r["base_codes"]["format"] == "nf4" and r["frozen_layers"] == 14
    assert r["losses"][-1] < r["losses"][0]
    model = LlamaForCausalLM.from_pretrained(str(tmp_path / "wide"), quantize="nf4")
    down = model.model.layers[0].mlp.down_proj
    W = open_base(tmp_path / "wide").view.get("model.layers.0.mlp.down_proj.weight")
    assert down.in_features == 160 and torch.equal(down.dequantize(), frozen.nf4_stored(W).dequantize())
