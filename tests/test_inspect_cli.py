"""inspect: summary, grouping, spectrum from factors vs a dense fp64 SVD, ||dW||/||W||; CLI basics."""

import json
import os
import subprocess
import sys

import torch

from lorakit import examples, inspect
from lorakit.core import Adapter, Module

from conftest import assert_one_line_error, shapes_of


def test_inspect_summary_and_groups(tiny_base, tmp_path, cli):
    folder, tensors = tiny_base
    ad = examples.random_adapter(
        shapes_of(tensors), targets=("q_proj", "v_proj", "down_proj"), rank=4, alpha=8.0, base_model="tiny"
    )
    ad.modules["model.layers.1.mlp.down_proj"] = Module(
        "model.layers.1.mlp.down_proj", torch.zeros(2, 128), torch.zeros(64, 2), alpha=16.0
    )
    ad.user_metadata["trigger"] = "sks"
    p = tmp_path / "a.safetensors"
    ad.save(p)
    r = inspect(p)
    assert r["format"] == "lorakit" and r["spec_version"] == "1.1" and r["base_model"] == "tiny"
    assert r["module_count"] == 6 and r["file_size"] == p.stat().st_size
    assert r["params"] == sum(m.A.numel() + m.B.numel() for m in ad.modules.values())
    assert r["ranks"] == {2: 1, 4: 5}
    assert {(t["target"], t["count"]) for t in r["targets"]} == {
        ("q_proj", 2),
        ("v_proj", 2),
        ("down_proj", 2),
    }
    assert {"rank": 2, "alpha": 16.0, "module_count": 1} in r["rank_alpha"]
    assert r["metadata"] == {"trigger": "sks"} and r["dtypes"] == {"float32": 12}
    code, out, _ = cli("inspect", p)
    assert code == 0 and "q_proj x 2 layers" in out and "r=2 alpha=16: 1 module(s)" in out
    code, out, _ = cli("inspect", p, "--json")
    assert json.loads(out)["module_count"] == 6
    code, out, _ = cli("inspect", p, "-v")
    assert "model.layers.1.mlp.down_proj" in out


def test_spectrum_matches_dense_fp64_svd(tiny_base, tmp_path, cli):
    folder, tensors = tiny_base
    ad = examples.random_adapter(shapes_of(tensors), rank=5, alpha=3.0)
    p = tmp_path / "a.safetensors"
    ad.save(p)
    r = inspect(p, spectrum=True, base=str(folder), quiet=True)
    for row in r["modules"]:
        m = ad.modules[row["module"]]
        dense = (m.B.double() @ m.A.double()) * (3.0 / 5)
        S = torch.linalg.svdvals(dense)[:5]
        assert torch.allclose(torch.tensor(row["singular_values"], dtype=torch.float64), S, rtol=1e-10)
        assert abs(row["norm"] - dense.norm().item()) < 1e-10 * dense.norm().item()
        W = tensors[row["module"] + ".weight"].double()
        assert abs(row["relative_norm"] - dense.norm().item() / W.norm().item()) < 1e-10
        p_ = S / S.sum()
        assert abs(row["effective_rank"] - torch.exp(-(p_ * p_.log()).sum()).item()) < 1e-9
    code, out, _ = cli("inspect", p, "--spectrum", "--base", folder, "--quiet")
    assert code == 0 and "||dW||/||W||" in out


def test_spectrum_base_mismatch_is_clean_error(tmp_path, cli, tiny_base):
    folder, _ = tiny_base
    ad = Adapter()
    ad.add(Module("model.layers.0.self_attn.q_proj", torch.ones(2, 32), torch.ones(64, 2), alpha=1.0))
    ad.save(tmp_path / "a.safetensors")
    c, out, err = cli("inspect", tmp_path / "a.safetensors", "--spectrum", "--base", folder, "-q")
    assert_one_line_error(c, out, err, "model.layers.0.self_attn.q_proj.weight", "[64, 64]", "[64, 32]")


def test_inspect_without_spectrum_reads_no_tensor_data(tmp_path):
    # NaN factors are only found by reading data: inspect (header only) must still succeed.
    ad = examples.random_adapter({"l.0.q_proj.weight": (8, 8)})
    ad.modules["l.0.q_proj"].B[:] = float("nan")
    from lorakit.formats.lorakit_v1 import to_tensors
    from lorakit.io import write_safetensors

    write_safetensors(tmp_path / "nan.safetensors", *to_tensors(ad))  # save() refuses to write NaN
    assert inspect(tmp_path / "nan.safetensors")["module_count"] == 1


def test_help_does_not_import_torch_and_version():
    code = (
        "import sys; from lorakit.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "inspect" in r.stdout and "validate" in r.stdout
    r = subprocess.run([sys.executable, "-m", "lorakit.cli", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and "lorakit, version 0.1.0" in r.stdout


def test_demo_runs(tmp_path, cli):
    code, out, _ = cli("demo", "--keep", tmp_path / "demo", "--quiet")
    assert code == 0, out
    assert "valid" in out and "q_proj x 2 layers" in out
    assert (tmp_path / "demo" / "adapter.safetensors").exists()
    assert cli("demo", "--keep", tmp_path / "demo", "--quiet")[0] == 0  # an earlier demo's folder: run again
    (tmp_path / "notes.txt").write_text("mine")
    code, out, err = cli(
        "demo", "--keep", tmp_path, "--quiet"
    )  # a folder with the user's files: never written
    assert code == 2 and "holds other files (demo, notes.txt): the demo writes" in err, err
    assert sorted(os.listdir(tmp_path)) == ["demo", "notes.txt"]
    code, out, err = cli("demo", "--keep", tmp_path / "notes.txt", "--quiet")
    assert code == 2 and "is not a folder: --keep takes a folder" in err


def test_inspect_says_what_reading_found(tmp_path, cli):
    """A PEFT folder whose target_modules leave out a module the file holds, and one whose initialisation moved its
    base (PiSSA): inspect says so (it said nothing; convert and merge did)."""
    ad = Adapter()
    for name, (out, inn) in (
        ("model.layers.0.self_attn.q_proj", (8, 8)),
        ("model.layers.0.mlp.up_proj", (16, 8)),
    ):
        ad.add(Module(name, torch.randn(2, inn), torch.randn(out, 2), alpha=4.0))
    ad.save(tmp_path / "p", format="peft")
    config_path = tmp_path / "p" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "target_modules": ["q_proj"]}))
    code, out, err = cli("inspect", tmp_path / "p")
    assert code == 0 and "note: WARNING: adapter_config.json does not target 1 module(s)" in out, err
    assert inspect(tmp_path / "p")["notes"][0].startswith("WARNING: adapter_config.json does not target 1")
    # validate: still valid (a warning, LK304), exit 0
    code, out, err = cli("validate", tmp_path / "p", "--json")
    (result,) = json.loads(out)["files"]
    assert code == 0 and result["valid"] and [p["code"] for p in result["problems"]] == ["LK304"]
    config_path.write_text(json.dumps({**config, "init_lora_weights": "pissa"}))
    code, out, err = cli("inspect", tmp_path / "p")
    assert "note: not a weight change of the base as it is: PiSSA trained it against" in out
