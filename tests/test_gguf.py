"""GGUF LoRA through the real gguf package: llama.cpp names, KVs, shapes, Q/K permutation, one alpha."""

import json
import gguf
import numpy as np
import pytest
import torch

import lorakit
from lorakit import examples
from lorakit.core import Adapter, Module
from lorakit.errors import LorakitError
from lorakit.naming.llama_cpp import permute, unpermute

from conftest import assert_one_line_error, bits, shapes_of


def test_permute_matches_llama_cpp_layout_and_inverts():
    # 2 heads of dim 4: rows [h0: 0 1 2 3 | h1: 4 5 6 7] -> llama.cpp order interleaves the rotary halves
    rows = torch.arange(8.0)[:, None]
    assert permute(rows, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    x = torch.randn(48, 5)
    assert torch.equal(unpermute(permute(x, 4, 2), 4, 2), x)


def test_gguf_write_read_with_the_gguf_package(tiny_base, tmp_path, cli):
    folder, tensors = tiny_base
    ad = examples.random_adapter(
        shapes_of(tensors), targets=("q_proj", "k_proj", "v_proj", "down_proj"), rank=4, alpha=8.0
    )
    ad.modules["model.embed_tokens"] = Module(
        "model.embed_tokens", torch.randn(4, 64), torch.randn(256, 4), 8.0, kind="embedding"
    )
    ad.save(tmp_path / "a.safetensors")
    code, out, err = cli(
        "convert", tmp_path / "a.safetensors", "-o", tmp_path / "a.gguf", "--to", "gguf", "--base", folder
    )
    assert code == 0, err
    r = gguf.GGUFReader(str(tmp_path / "a.gguf"))
    assert r.fields["general.type"].contents() == "adapter"
    assert r.fields["adapter.type"].contents() == "lora"
    assert r.fields["general.architecture"].contents() == "llama"
    assert r.fields["adapter.lora.alpha"].contents() == 8.0
    shapes = {t.name: tuple(int(d) for d in reversed(list(t.shape))) for t in r.tensors}
    assert shapes["blk.0.attn_q.weight.lora_a"] == (4, 64) and shapes["blk.0.attn_q.weight.lora_b"] == (64, 4)
    assert shapes["blk.1.ffn_down.weight.lora_a"] == (4, 128) and shapes["blk.1.ffn_down.weight.lora_b"] == (
        64,
        4,
    )
    assert shapes["token_embd.weight.lora_a"] == (256, 4) and shapes["token_embd.weight.lora_b"] == (64, 4)
    q_b = next(t for t in r.tensors if t.name == "blk.0.attn_q.weight.lora_b")
    B = ad.modules["model.layers.0.self_attn.q_proj"].B
    assert np.array_equal(np.array(q_b.data).reshape(64, 4), permute(B, 4).numpy())
    # and back: bit-exact factors (the permutation undone with the head counts stored in the file)
    back = lorakit.load(tmp_path / "a.gguf")
    assert set(back.modules) == set(ad.modules)
    for name, m in ad.modules.items():
        n = back.modules[name]
        assert torch.equal(bits(n.A), bits(m.A)) and torch.equal(bits(n.B), bits(m.B)) and n.alpha == m.alpha


def test_gguf_single_alpha_folds_scale(tmp_path):
    ad = Adapter()
    ad.add(Module("model.layers.0.self_attn.v_proj", torch.randn(2, 8), torch.randn(4, 2), alpha=4.0))
    ad.add(Module("model.layers.0.mlp.up_proj", torch.randn(3, 8), torch.randn(16, 3), alpha=1.0))
    ad.save(tmp_path / "a.safetensors")
    r = lorakit.convert(tmp_path / "a.safetensors", tmp_path / "a.gguf", to="gguf")
    assert any("folded" in n for n in r["notes"])
    back = lorakit.load(tmp_path / "a.gguf")
    for name, m in ad.modules.items():
        assert torch.allclose(back.modules[name].delta(), m.delta(), rtol=2**-23, atol=1e-7)


def test_gguf_errors(tmp_path):
    ad = Adapter()
    ad.add(Module("model.layers.0.self_attn.q_proj", torch.randn(2, 8), torch.randn(8, 2), alpha=4.0))
    ad.save(tmp_path / "a.safetensors")
    with pytest.raises(LorakitError, match=r"pass base=\.\.\."):
        lorakit.convert(tmp_path / "a.safetensors", tmp_path / "a.gguf", to="gguf")
    ad.modules["vision.x"] = Module("vision.x", torch.randn(2, 8), torch.randn(8, 2), alpha=4.0)
    w = gguf.GGUFWriter(str(tmp_path / "b.gguf"), "llama")
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 2.0)
    w.add_tensor("blk.0.attn_v.weight.lora_a", np.zeros((2, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(LorakitError, match="blk.0.attn_v.*wrong pairing"):
        lorakit.load(tmp_path / "b.gguf")
    (tmp_path / "c.gguf").write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    with pytest.raises(LorakitError, match="c.gguf: GGUF header runs past the end of the file"):
        lorakit.load(tmp_path / "c.gguf")


def _adapter_gguf(path, alpha, tensors):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    (w.add_string if isinstance(alpha, str) else w.add_float32)("adapter.lora.alpha", alpha)
    for name, t in tensors.items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_alpha_not_a_number_and_an_empty_adapter(tmp_path, tiny_base, cli):
    """adapter.lora.alpha written as a string: one line naming the key and value (it was a TypeError's text); an
    adapter with no tensors merges, and the report says it changed nothing."""
    pair = {
        "blk.0.attn_q.weight.lora_a": np.ones((2, 64), np.float32),
        "blk.0.attn_q.weight.lora_b": np.ones((64, 2), np.float32),
    }
    bad = _adapter_gguf(tmp_path / "s.gguf", "8", pair)
    assert_one_line_error(*cli("inspect", bad), "s.gguf", "adapter.lora.alpha is '8': not a number")
    empty = _adapter_gguf(tmp_path / "e.gguf", 8.0, {})
    folder, _ = tiny_base
    code, out, err = cli("merge", folder, empty, "-o", tmp_path / "m", "-q")
    assert code == 0 and "0 of 21 tensors changed" in out, err
    assert "1 adapter(s) hold no module or tensor, so they change nothing" in out


def test_gguf_head_counts_from_the_adapters_base_path_and_qwen2(tmp_path):
    """Without --base, the adapter's own base_model folder gives the head counts (as llama.cpp's converter does);
    Qwen2 is converted as qwen2, whose Q/K rows llama.cpp does not permute."""
    import json

    folder = tmp_path / "base"
    tensors = examples.write_llama_checkpoint(str(folder))
    ad = examples.random_adapter(shapes_of(tensors), targets=("q_proj",), rank=2)
    ad.base_model = str(folder)
    ad.save(tmp_path / "a.safetensors")
    lorakit.convert(tmp_path / "a.safetensors", tmp_path / "a.gguf", to="gguf")
    back = lorakit.load(tmp_path / "a.gguf")
    name = "model.layers.0.self_attn.q_proj"
    assert torch.equal(back.modules[name].B, ad.modules[name].B)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "qwen2"}))
    lorakit.convert(tmp_path / "a.safetensors", tmp_path / "q.gguf", to="gguf")
    r = gguf.GGUFReader(str(tmp_path / "q.gguf"))
    assert r.fields["general.architecture"].contents() == "qwen2"
    b = next(t for t in r.tensors if t.name == "blk.0.attn_q.weight.lora_b")
    assert np.array_equal(np.array(b.data).reshape(64, 2), ad.modules[name].B.numpy())  # not permuted
    assert torch.equal(lorakit.load(tmp_path / "q.gguf").modules[name].B, ad.modules[name].B)


def test_llama_cpp_converter_style_lora_gguf_q8_0_and_no_head_counts(tmp_path, cli):
    """What convert_lora_to_gguf.py --outtype q8_0 writes: Q8_0 factors and no head-count KVs. inspect reads it
    (no statistic depends on llama.cpp's Q/K row order); converting still needs the head counts, and gets them from
    --base; the values are gguf's own Q8_0 dequantization."""
    from gguf.quants import dequantize, quantize

    folder = tmp_path / "base"
    examples.write_llama_checkpoint(str(folder))
    g = torch.Generator().manual_seed(3)
    A, B = torch.randn(32, 64, generator=g), torch.randn(64, 32, generator=g)  # rank 32: a Q8_0 block per row
    w = gguf.GGUFWriter(str(tmp_path / "l.gguf"), "llama")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 16.0)
    qt = gguf.GGMLQuantizationType.Q8_0
    for part, t in (("lora_a", A), ("lora_b", B)):
        q = quantize(t.numpy(), qt)
        w.add_tensor(f"blk.0.attn_q.weight.{part}", q, raw_shape=q.shape, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    code, out, err = cli("inspect", tmp_path / "l.gguf", "--json")
    assert code == 0, err
    assert json.loads(out)["module_count"] == 1 and json.loads(out)["rank_alpha"][0]["rank"] == 32
    code, out, err = cli("convert", tmp_path / "l.gguf", "-o", tmp_path / "a.safetensors", "--to", "lorakit")
    assert code == 2 and "needs the head counts" in err
    ad = lorakit.load(tmp_path / "l.gguf", base=str(folder))
    m = ad.modules["model.layers.0.self_attn.q_proj"]
    deq = lambda t: torch.from_numpy(dequantize(quantize(t.numpy(), qt), qt).astype(np.float32))  # noqa: E731
    assert torch.equal(m.A, deq(A))
    from lorakit.naming.llama_cpp import unpermute

    n_head = json.loads((folder / "config.json").read_text())["num_attention_heads"]
    assert torch.equal(m.B, unpermute(deq(B), n_head).contiguous())


def test_peft_base_layer_copies_skipped_for_gguf(tmp_path):
    """PEFT's save of an embed_tokens LoRA carries base_layer.weight (read as a replacement): to GGUF it is skipped
    when it equals the base, as llama.cpp's converter does, and refused when it differs (a resized vocabulary)."""
    from lorakit.core import Module
    from lorakit.io import TensorFile

    folder = tmp_path / "base"
    tensors = examples.write_llama_checkpoint(str(folder))
    ad = examples.random_adapter(shapes_of(tensors), targets=("q_proj",), rank=2)
    E = TensorFile(next(folder.glob("*.safetensors"))).get("model.embed_tokens.weight")
    ad.add(
        Module("model.embed_tokens", torch.randn(2, E.shape[1]), torch.randn(E.shape[0], 2), 2.0, "embedding")
    )
    ad.replacements["model.embed_tokens.weight"] = E.clone()
    ad.save(tmp_path / "a.safetensors")
    r = lorakit.convert(tmp_path / "a.safetensors", tmp_path / "a.gguf", to="gguf", base=str(folder))
    assert any("skipped 1 copy(ies) of base weights" in n and "equal to the base" in n for n in r["notes"])
    names = {t.name for t in gguf.GGUFReader(str(tmp_path / "a.gguf")).tensors}
    assert "token_embd.weight.lora_a" in names and not any("base_layer" in n for n in names)
    ad.replacements["model.embed_tokens.weight"] = E + 1
    ad.save(tmp_path / "b.safetensors")
    with pytest.raises(LorakitError, match="differs from the base"):
        lorakit.convert(tmp_path / "b.safetensors", tmp_path / "b.gguf", to="gguf", base=str(folder))
