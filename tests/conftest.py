import os

import pytest
import torch
from click.testing import CliRunner

from lorakit import examples
from lorakit.cli import main


@pytest.fixture(autouse=True)
def no_hub_downloads(tmp_path_factory, monkeypatch):
    """Hub ids resolve against an empty cache of the test's own, offline: the suite never reaches a network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path_factory.mktemp("hub-cache")))


@pytest.fixture
def cli():
    """Run the CLI in-process: returns (exit_code, stdout, stderr)."""
    runner = CliRunner()

    def run(*args):
        r = runner.invoke(main, [str(a) for a in args])
        if r.exception is not None and not isinstance(r.exception, SystemExit):
            raise r.exception
        return r.exit_code, r.stdout, r.stderr

    return run


@pytest.fixture
def tiny_base(tmp_path):
    """A tiny Llama-style fp32 checkpoint folder and its tensors."""
    folder = tmp_path / "base"
    tensors = examples.write_llama_checkpoint(str(folder))
    return folder, tensors


def shapes_of(tensors):
    return {k: tuple(v.shape) for k, v in tensors.items()}


def assert_one_line_error(code, out, err, *fragments, exit_code=2):
    assert code == exit_code, (code, out, err)
    lines = [line for line in err.splitlines() if line.startswith("lorakit:")]  # progress bars aside
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def listdir_all(folder):
    return sorted(os.listdir(folder))


def bits(t):
    """A tensor's raw bits, for bitwise comparisons that also hold for NaN and -0.0."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def write_unchecked(adapter, path):
    """Write an adapter in the spec's layout without the writer's checks: how tests make the broken files that
    `save` (rightly) refuses to write."""
    from lorakit.formats.lorakit_v1 import to_tensors
    from lorakit.io import write_safetensors

    write_safetensors(path, *to_tensors(adapter))


# a tiny Llama for the tests that build real transformers + PEFT models
TINY_LLAMA = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
    tie_word_embeddings=False,
)


def tiny_flux_transformer(**config):
    """A tiny Flux transformer of diffusers' own class (one double and one single block, hidden 8), seeded."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(
        **{
            "patch_size": 1,
            "in_channels": 4,
            "num_layers": 1,
            "num_single_layers": 1,
            "attention_head_dim": 4,
            "num_attention_heads": 2,
            "joint_attention_dim": 8,
            "pooled_projection_dim": 8,
            "axes_dims_rope": (2, 2),
            **config,
        }
    )
