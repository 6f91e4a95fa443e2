"""lorakit.bases: one Base per container kind, its records exact, its names and shapes as the engine sees them."""

import json
import os

import pytest
import torch

import lorakit
from lorakit import examples
from lorakit.bases import open_base
from lorakit.core import Adapter, Module
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


def hub_snapshot(folder, cache, repo="org--model"):
    """`folder` laid out as the Hugging Face cache holds a download: cache/models--org--model/snapshots/rev/..., every
    file a relative link to its blob (sub-folders real), as snapshot_download leaves it on Linux."""
    root = cache / f"models--{repo}"
    snapshot = root / "snapshots" / "rev"
    os.makedirs(root / "blobs")
    for dirpath, _, files in os.walk(folder):
        rel = os.path.relpath(dirpath, folder)
        os.makedirs(snapshot / rel, exist_ok=True)
        for f in files:
            blob = root / "blobs" / f"{len(os.listdir(root / 'blobs'))}"
            os.replace(os.path.join(dirpath, f), blob)
            link = snapshot / rel / f
            os.symlink(os.path.relpath(blob, link.parent), link)
    return snapshot


@pytest.mark.parametrize("kind", ["sharded", "pipeline"])
def test_a_base_in_the_hugging_face_cache_merges_as_its_plain_folder(tmp_path, kind):
    """Hub ids land in the cache, whose files are links to blobs outside the snapshot folder: a sharded checkpoint
    (its index naming the linked shards) and a diffusers pipeline merge to the same bytes as their plain copies (both
    were refused: 'not a file of the model folder', 'a link out of its component folder'), and the base is named
    by its repo id."""
    import shutil

    from test_kohya import diffusers_base, kohya_file

    if kind == "sharded":
        examples.write_llama_checkpoint(str(tmp_path / "plain"), shards=3)
        ad = Adapter()
        ad.add(Module("model.layers.0.self_attn.q_proj", torch.ones(2, 64) / 8, torch.ones(64, 2) / 8, 2.0))
        ad.base_model = "someone/else"
        ad.save(tmp_path / "a.safetensors")
    else:
        diffusers_base(tmp_path / "plain")
        kohya_file(tmp_path / "a.safetensors")
    shutil.copytree(tmp_path / "plain", tmp_path / "copy")
    cached = hub_snapshot(tmp_path / "copy", tmp_path / "cache")
    reports = {}
    for name, base in (("plain", tmp_path / "plain"), ("cached", cached)):
        reports[name] = lorakit.merge(
            base, [tmp_path / "a.safetensors"], tmp_path / f"out-{name}", quiet=True
        )
    outputs = [tmp_path / f"out-{name}" for name in ("plain", "cached")]
    files = [
        sorted(os.path.relpath(os.path.join(d, f), o) for d, _, fs in os.walk(o) for f in fs) for o in outputs
    ]
    assert files[0] == files[1] and len(files[0]) >= (5 if kind == "sharded" else 3)
    for f in files[0]:
        assert not os.path.islink(outputs[1] / f)
        assert (outputs[0] / f).read_bytes() == (outputs[1] / f).read_bytes(), f
    if kind == "sharded":
        assert "merging into 'org/model'" in " ".join(reports["cached"]["notes"])
