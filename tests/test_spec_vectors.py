"""Every conformance vector gives its manifest's result; the generator is deterministic; spec and code agree."""

import json
import os
import re

import pytest

from lorakit import validate
from lorakit.spec import CODES

HERE = os.path.dirname(__file__)
VECTORS = os.path.join(HERE, "..", "spec", "vectors")
SPEC = os.path.join(HERE, "..", "spec", "lorakit-adapter-v1.md")
MANIFEST = json.load(open(os.path.join(VECTORS, "manifest.json")))


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_vector(name, cli):
    expect = MANIFEST[name]["expect"]
    report = validate([os.path.join(VECTORS, name)])
    result = report["files"][0]
    errors = [p["code"] for p in result["problems"] if not p["code"].startswith("LK3")]
    code, out, _ = cli("validate", os.path.join(VECTORS, name))
    if expect == "valid":
        assert result["valid"] and errors == [] and code == 0
    else:
        assert not result["valid"] and errors[0] == expect and code == 1
        assert expect in out


def test_manifest_covers_every_error_code():
    expected = {v["expect"] for v in MANIFEST.values()}
    # LK4xx are the codes of other formats' readers (PEFT types), LK5xx the engines' (validate --for): no lorakit
    # file can carry them, LK6xx a base's (validate --base)
    error_codes = {c for c in CODES if not c.startswith(("LK3", "LK4", "LK5", "LK6")) and c != "LK001"}
    assert error_codes <= expected


def test_vectors_regenerate_bit_identically(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_vectors", os.path.join(VECTORS, "make_vectors.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    manifest = mod.main(str(tmp_path))
    assert manifest == MANIFEST
    for name in MANIFEST:
        assert (tmp_path / name).read_bytes() == open(os.path.join(VECTORS, name), "rb").read(), name


def test_spec_document_lists_exactly_the_codes():
    text = open(SPEC).read()
    documented = set(re.findall(r"^\| (LK\d{3}) \| ([a-z-]+) \|", text, flags=re.M))
    assert documented == {(c, rule) for c, (rule, _) in CODES.items()}


def test_warnings_do_not_invalidate(cli):
    report = validate([os.path.join(VECTORS, "valid_newer_minor.safetensors")])
    codes = [p["code"] for p in report["files"][0]["problems"]]
    assert report["valid"] and codes == ["LK302", "LK301"]


def test_validate_json_and_exit_codes(cli, tmp_path):
    good = os.path.join(VECTORS, "valid_linear.safetensors")
    bad = os.path.join(VECTORS, "invalid_rank_mismatch.safetensors")
    code, out, _ = cli("validate", good, bad, "--json")
    r = json.loads(out)
    assert code == 1 and r["valid"] is False
    assert [f["valid"] for f in r["files"]] == [True, False]
    p = r["files"][1]["problems"][0]
    assert p == {
        "code": "LK204",
        "rule": "rank-mismatch",
        "tensor": "layers.0.q_proj.lora_B",
        "message": "lora_A has rank 4 but lora_B has rank 3",
    }
    code, out, _ = cli("validate", good, tmp_path / "missing.safetensors")
    assert code == 2 and "LK001" in out and "no such file" in out
    code, out, _ = cli("validate", tmp_path)
    assert code == 2 and "is a directory" in out


def test_validate_points_other_formats_to_convert(tmp_path):
    from safetensors.torch import save_file
    import torch

    f = tmp_path / "adapter_model.safetensors"
    save_file({"base_model.model.x.lora_A.weight": torch.zeros(2, 3)}, str(f))
    r = validate([str(f)])
    assert not r["valid"] and r["files"][0]["problems"][0]["code"] == "LK105"
