"""loralib .pt: plain state dicts only (weights_only), alpha required, embedding orientation from the base."""

import pickle

import pytest
import torch

import lorakit
from lorakit.errors import LorakitError
from lorakit.io import write_safetensors


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_loralib_linear_and_embedding(tmp_path, cli):
    A, B = torch.randn(4, 16), torch.randn(8, 4)
    EA, EB = torch.randn(4, 30), torch.randn(16, 4)  # loralib Embedding: A [r, num], B [dim, r]
    torch.save({"enc.q.lora_A": A, "enc.q.lora_B": B, "emb.lora_A": EA, "emb.lora_B": EB}, tmp_path / "l.pt")
    write_safetensors(
        tmp_path / "base.safetensors", {"enc.q.weight": torch.zeros(8, 16), "emb.weight": torch.zeros(30, 16)}
    )
    c, out, err = cli("convert", tmp_path / "l.pt", "-o", tmp_path / "a.safetensors", "--to", "lorakit")
    assert c == 2 and "do not store alpha" in err and "--alpha" in err
    c, out, err = cli(
        "convert",
        tmp_path / "l.pt",
        "-o",
        tmp_path / "a.safetensors",
        "--to",
        "lorakit",
        "--alpha",
        "8",
        "--base",
        tmp_path / "base.safetensors",
    )
    assert c == 0, err
    ad = lorakit.load(tmp_path / "a.safetensors")
    assert torch.allclose(ad.modules["enc.q"].delta(torch.float64), 2 * B.double() @ A.double(), atol=1e-12)
    emb = ad.modules["emb"]
    assert emb.kind == "embedding" and emb.shape == (30, 16)
    assert torch.allclose(emb.delta(torch.float64), 2 * (EB.double() @ EA.double()).T, atol=1e-12)


def test_refuses_arbitrary_pickles(tmp_path, cli, capfd):
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"x.lora_A": Evil()}, f, protocol=2)
    with pytest.raises(LorakitError, match="not a plain tensor state dict"):
        lorakit.load(tmp_path / "evil.pt", alpha=1.0)
    assert "pwned" not in capfd.readouterr().out
    torch.save({"x.lora_A": torch.zeros(2, 3), "meta": {"lr": 1}}, tmp_path / "mixed.pt")
    c, out, err = cli("inspect", tmp_path / "mixed.pt")
    assert c == 2 and "mixed.pt" in err and "Traceback" not in err
    torch.save({"x.lora_A": torch.zeros(2, 3)}, tmp_path / "half.pt")
    with pytest.raises(LorakitError, match="'x'.*wrong pairing"):
        lorakit.load(tmp_path / "half.pt", alpha=1.0)
