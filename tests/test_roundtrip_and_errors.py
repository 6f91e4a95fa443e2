"""save -> load is bit-exact for every allowed dtype; bad input gets one clean line, exit 2, and no output."""

import os
import struct

import pytest
import torch

import lorakit
from lorakit import examples
from lorakit.core import Adapter, Module
from lorakit.errors import LorakitError

from conftest import assert_one_line_error, bits, listdir_all, write_unchecked


def full_adapter(dtype):
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    ad = Adapter(
        base_model="m",
        base_fingerprint="sha256:" + "0" * 64,
        user_metadata={"note": "hello"},
        provenance={"operation": "test", "created": "2026-01-01T00:00:00Z"},
    )
    ad.add(Module("lin", r(4, 10), r(6, 4), alpha=7.25))
    ad.add(Module("conv", r(2, 3, 3, 3), r(5, 2, 1, 1), alpha=0.1))
    ad.add(Module("emb", r(3, 8), r(20, 3), alpha=3.0, kind="embedding"))
    ad.add(Module("t", r(2, 6), r(9, 2), alpha=1.0, kind="linear_t", bias=r(9)))
    ad.add(Module("dora", r(2, 10), r(6, 2), alpha=2.0, magnitude=r(6).abs(), dora_axis=0))
    ad.replacements["score.weight"] = r(2, 4)
    return ad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_save_load_is_bit_exact(tmp_path, dtype):
    ad = full_adapter(dtype)
    p1, p2 = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    ad.save(p1)
    back = lorakit.load(p1)
    assert back.base_model == "m" and back.user_metadata == {"note": "hello"}
    assert back.provenance == ad.provenance | {"tool": back.provenance["tool"]}
    for name, m in ad.modules.items():
        n = back.modules[name]
        assert (n.kind, n.alpha, n.dora_axis) == (m.kind, m.alpha, m.dora_axis)
        for t in ("A", "B", "bias", "magnitude"):
            a, b = getattr(m, t), getattr(n, t)
            assert (a is None) == (b is None)
            if a is not None:
                assert b.dtype == dtype and torch.equal(bits(a), bits(b))
    assert torch.equal(bits(back.replacements["score.weight"]), bits(ad.replacements["score.weight"]))
    back.save(p2)
    assert p1.read_bytes() == p2.read_bytes()


def test_alpha_is_stored_exactly_in_fp32(tmp_path):
    ad = Adapter()
    ad.add(Module("x", torch.ones(3, 2), torch.ones(2, 3), alpha=1 / 3))
    ad.save(tmp_path / "a.safetensors")
    assert lorakit.load(tmp_path / "a.safetensors").modules["x"].alpha == float(torch.tensor(1 / 3))


def corrupt_files(tmp_path):
    good = tmp_path / "good.safetensors"
    examples.random_adapter({"l.0.q_proj.weight": (8, 8)}).save(good)
    data = good.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    files = {
        "truncated": (data[: len(data) - 10], "bytes", "LK102"),
        "not_json": (struct.pack("<Q", 8) + b"not json", "not valid JSON", "LK101"),
        "offsets_past_end": (data[: 8 + n] + b"\0" * 4, "run past the end", "LK102"),
    }
    header = data[8 : 8 + n].replace(b'"shape":[4,8]', b'"shape":[4,4]')
    files["wrong_shape"] = (struct.pack("<Q", n) + header + data[8 + n :], "shape [4, 4]", "LK102")
    out = {}
    for name, (blob, fragment, code) in files.items():
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(blob)
        out[name] = (p, fragment, code)
    return out


def test_bad_input_clean_errors(cli, tmp_path):
    for name, (path, fragment, code) in corrupt_files(tmp_path).items():
        c, out, err = cli("inspect", path)
        assert_one_line_error(c, out, err, str(path), fragment, code)
        c, out, err = cli("validate", path)
        assert c == 1 and code in out, (name, out)
    c, out, err = cli("inspect", tmp_path / "nope.safetensors")
    assert_one_line_error(c, out, err, "nope.safetensors", "no such file")
    (tmp_path / "folder").mkdir()
    c, out, err = cli("inspect", tmp_path / "folder")
    assert_one_line_error(c, out, err, "folder")


def test_nan_and_shape_errors_name_the_tensor(tmp_path, cli):
    ad = examples.random_adapter({"l.0.q_proj.weight": (8, 8)})
    ad.modules["l.0.q_proj"].A[0, 0] = float("nan")
    with pytest.raises(
        LorakitError, match=r"refused.safetensors: tensor 'l.0.q_proj.lora_A': \[LK208\] 1 NaN"
    ):
        ad.save(tmp_path / "refused.safetensors")
    assert not os.path.exists(tmp_path / "refused.safetensors")
    write_unchecked(ad, tmp_path / "nan.safetensors")
    with pytest.raises(LorakitError, match=r"nan.safetensors: tensor 'l.0.q_proj.lora_A': \[LK208\] 1 NaN"):
        lorakit.load(tmp_path / "nan.safetensors")
    c, out, _ = cli("validate", tmp_path / "nan.safetensors")
    assert c == 1 and "LK208 non-finite l.0.q_proj.lora_A" in out
    bad = Adapter()
    bad.add(Module("m", torch.ones(2, 4), torch.ones(3, 5), alpha=1.0))
    write_unchecked(bad, tmp_path / "shape.safetensors")
    with pytest.raises(
        LorakitError, match=r"tensor 'm.lora_B': \[LK204\] lora_A has rank 2 but lora_B has rank 5"
    ):
        lorakit.load(tmp_path / "shape.safetensors")


def test_output_is_atomic_and_never_overwritten(tmp_path, monkeypatch):
    ad = examples.random_adapter({"l.0.q_proj.weight": (8, 8)})
    out = tmp_path / "out.safetensors"
    ad.save(out)
    before = out.read_bytes()
    with pytest.raises(LorakitError, match="output exists"):
        ad.save(out)
    assert out.read_bytes() == before
    import lorakit.formats.lorakit_v1 as fmt

    def broken_write(path, tensors, metadata=None):
        open(path, "wb").write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fmt, "write_safetensors", broken_write)
    with pytest.raises(
        LorakitError, match="new.safetensors: cannot write the output: No space left on device"
    ):
        ad.save(tmp_path / "new.safetensors")
    assert listdir_all(tmp_path) == ["out.safetensors"]
    with pytest.raises(LorakitError, match="No space left"):
        ad.save(out, force=True)
    assert out.read_bytes() == before and listdir_all(tmp_path) == ["out.safetensors"]


def test_dtypes_outside_the_spec_are_written_as_f32_and_said(tmp_path):
    """F64 factors: written as F32 (rounded once), and save's notes say so; an integer tensor is refused."""
    ad = Adapter()
    A = torch.full((2, 4), 1 / 3, dtype=torch.float64)
    ad.add(Module("m", A, torch.ones(3, 2), alpha=1.0))
    notes = ad.save(tmp_path / "x.safetensors")
    assert notes == [
        "1 F64 tensor(s) written as F32, e.g. m.lora_A (the spec's dtypes: F32, F16, BF16; rounded once)"
    ]
    assert torch.equal(lorakit.load(tmp_path / "x.safetensors").modules["m"].A, A.float())
    ad.replacements["w.weight"] = torch.ones(3, dtype=torch.int32)
    with pytest.raises(LorakitError, match="int32 is not allowed"):
        ad.save(tmp_path / "y.safetensors")
    assert listdir_all(tmp_path) == ["x.safetensors"]


def test_load_detects_format_from_content_not_name(tmp_path):
    ad = examples.random_adapter({"l.0.q_proj.weight": (8, 8)})
    ad.save(tmp_path / "weird.bin")
    assert set(lorakit.load(tmp_path / "weird.bin").modules) == {"l.0.q_proj"}
    (tmp_path / "junk.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(LorakitError, match=r"junk.safetensors: \[LK101\] header is not valid JSON"):
        lorakit.load(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"something.else": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(LorakitError, match="other.safetensors: not a recognized adapter"):
        lorakit.load(tmp_path / "other.safetensors")
