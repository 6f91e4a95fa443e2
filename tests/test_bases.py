"""lorakit.bases: one Base per container kind, its records exact, its names and shapes as the engine sees them."""

import json
import os

import pytest
import torch

import lorakit
from lorakit import examples
from lorakit.bases import open_base
from lorakit.errors import LorakitError
from lorakit.io import write_safetensors


def test_records_are_the_stored_bytes(tmp_path):
    """Each record's span holds exactly the tensor's stored bytes; a quantized module is one record of its
    full-precision shape, standing for its packed members."""
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(0)) / 8
    stored = {f"l.q.{k}": v for k, v in examples.quantize(W, "gptq", group_size=32).items()}
    stored["norm.weight"] = torch.arange(8, dtype=torch.float32)
    os.makedirs(tmp_path / "q")
    write_safetensors(tmp_path / "q" / "model.safetensors", stored)
    with open(tmp_path / "q" / "config.json", "w") as f:
        json.dump({"quantization_config": examples.quantization_config("gptq", 32)}, f)
    base = open_base(tmp_path / "q")
    assert base.kind == "safetensors" and base.quantized
    norm, q = base.records["norm.weight"], base.records["l.q.weight"]
    with open(norm.file, "rb") as f:
        f.seek(norm.span[0])
        assert f.read(norm.span[1] - norm.span[0]) == stored["norm.weight"].numpy().tobytes()
    assert (norm.shape, norm.dtype, norm.quant, norm.members) == ((8,), "F32", None, ())
    assert q.shape == (32, 64) and q.quant == "gptq" and "l.q.qweight" in q.members
    assert set(base.records) == {"norm.weight", "l.q.weight"}  # the packed members hide behind their module
    assert torch.allclose(base.get("l.q.weight"), W, atol=0.2 * W.abs().max())  # 4 bits: within a grid step


def test_pipeline_base_prefixes_its_components(tmp_path):
    root = tmp_path / "pipe"
    for component, shape in (("unet", (8, 4)), ("text_encoder", (6, 3))):
        os.makedirs(root / component)
        write_safetensors(root / component / "model.safetensors", {"a.weight": torch.ones(shape)})
    (root / "model_index.json").write_text("{}")
    os.makedirs(root / "scheduler")
    base = open_base(root)
    assert base.kind == "diffusers-pipeline" and sorted(base.components) == ["text_encoder", "unet"]
    assert base.shapes() == {"unet.a.weight": (8, 4), "text_encoder.a.weight": (6, 3)}
    assert base.shape("unet.a.weight") == (8, 4) and torch.equal(
        base.get("text_encoder.a.weight"), torch.ones(6, 3)
    )
    with pytest.raises(LorakitError, match="no such tensor in the pipeline"):
        base.get("vae.a.weight")


def test_an_opened_base_serves_readers_and_commands(tmp_path):
    """The same Base object goes to a reader (kohya names resolved) and to merge, which opens nothing again."""
    examples.write_llama_checkpoint(tmp_path / "base")
    shapes = open_base(tmp_path / "base").shapes()
    ad = examples.random_adapter(shapes, rank=2)
    ad.save(tmp_path / "a.safetensors")
    lorakit.convert(tmp_path / "a.safetensors", tmp_path / "k.safetensors", to="kohya")
    base = open_base(tmp_path / "base")
    back = lorakit.load(tmp_path / "k.safetensors", base=base)
    assert sorted(back.modules) == sorted(ad.modules)
    report = lorakit.merge(base, [tmp_path / "k.safetensors"], tmp_path / "out", quiet=True)
    assert report["merged_count"] == len(ad.modules) and report["base"] == os.fspath(tmp_path / "base")
    merged = open_base(tmp_path / "out")
    name = next(iter(ad.modules))
    want = base.get(f"{name}.weight").double() + ad.modules[name].delta().double()
    assert torch.allclose(merged.get(f"{name}.weight").double(), want, rtol=1e-6, atol=1e-6)
