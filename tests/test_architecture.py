"""The layers stay layers: the core is pure, every list of choices exists once (and the README lists every entry),
formats take only the options they declare, and the quantized-checkpoint fixtures are exact."""

import os
import re
import subprocess
import sys

import pytest
import torch

import lorakit
from lorakit import examples
from lorakit.errors import LorakitError
from lorakit.formats import FORMATS, get_format, load
from lorakit.io.dtypes import ALIASES, DTYPES, USER_DTYPES, user_dtype
from lorakit.methods import METHODS, get_method
from lorakit.quant import FORMATS as QUANT_FORMATS, STRATEGIES, format_class

README = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()


def test_core_imports_no_outer_layer():
    code = (
        "import sys, lorakit.core, lorakit.core.algebra, lorakit.core.linalg, lorakit.core.lycoris\n"
        "bad = [m for m in sys.modules if m.split('.')[:2] in (['lorakit', 'io'], ['lorakit', 'formats'], "
        "['lorakit', 'quant'], ['lorakit', 'engine'], ['lorakit', 'methods'], ['lorakit', 'commands'])]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    "package", ["lorakit.formats", "lorakit.quant", "lorakit.methods", "lorakit.io", "lorakit.cli"]
)
def test_registries_import_without_torch(package):
    subprocess.run(
        [sys.executable, "-c", f"import sys, {package}\nassert 'torch' not in sys.modules"], check=True
    )


def test_every_registered_entry_resolves():
    for name in FORMATS:
        assert get_format(name).name == name
    for name in QUANT_FORMATS:
        assert format_class(name).name == name
    for name in METHODS:
        assert callable(get_method(name))
    for st in DTYPES:
        assert DTYPES[st][0] == torch.empty(0, dtype=getattr(torch, DTYPES[st][1])).element_size()
    for alias, short in ALIASES.items():
        assert user_dtype(alias) == user_dtype(short)


def _readme_table_first_column(header):
    """The first-column entries of the README table whose header row starts with `| header |`."""
    table = re.search(r"\n\| " + re.escape(header) + r" \|.*\n(\|.*\|\n)+", README).group(0)
    return {row.split("|")[1].strip().split()[0].strip("`") for row in table.strip().splitlines()[2:]}


def test_readme_lists_every_registered_entry():
    assert set(FORMATS) <= _readme_table_first_column("format | read")
    assert set(STRATEGIES) <= _readme_table_first_column("strategy")
    assert set(METHODS) <= _readme_table_first_column("method")
    assert set(QUANT_FORMATS) <= _readme_table_first_column("format | what")
    for name in USER_DTYPES:
        assert f"`{name}`" in README


def test_cli_choices_come_from_the_registries():
    from click.testing import CliRunner
    from lorakit.cli import main

    help_text = (
        CliRunner().invoke(main, ["merge", "--help"]).output
        + CliRunner().invoke(main, ["combine", "--help"]).output
    )
    for name in [*STRATEGIES, *METHODS]:
        assert name in help_text


def test_reader_options_it_does_not_take_are_an_error(tmp_path):
    ad = examples.random_adapter(examples.llama_shapes(), rank=2)
    ad.save(tmp_path / "a.safetensors")
    os.makedirs(tmp_path / "base")
    with pytest.raises(LorakitError, match="lorakit reader does not use --alpha"):
        load(tmp_path / "a.safetensors", alpha=3.0)
    with pytest.raises(LorakitError, match="neither by the lorakit reader nor by the peft writer"):
        lorakit.convert(tmp_path / "a.safetensors", tmp_path / "p", to="peft", base=str(tmp_path / "base"))


def test_module_kind_is_checked():
    with pytest.raises(LorakitError, match="kind 'conv' does not fit factors of ndim 2"):
        lorakit.Module("m", torch.zeros(2, 4), torch.zeros(3, 2), alpha=1.0, kind="conv")
    with pytest.raises(LorakitError, match="kind 'dense'"):
        lorakit.Module("m", torch.zeros(2, 4), torch.zeros(3, 2), alpha=1.0, kind="dense")


@pytest.mark.parametrize("fmt", ["fp8", "int8", "gptq", "awq"])
def test_quantize_fixture_is_nearest_on_its_grid(fmt):
    """examples.quantize (the benchmarks' and tests' quantizer): dequantized within half a grid step of W."""
    from lorakit.examples import TensorDict
    from lorakit.quant.fp8 import FP8Channel
    from lorakit.quant.gptq_awq import AWQ, GPTQ
    from lorakit.quant.int8 import Int8Channel

    W = torch.randn(64, 256, generator=torch.Generator().manual_seed(1)) / 16
    stored = examples.quantize(W, fmt, group_size=64)
    fmt_obj = {"fp8": FP8Channel(), "int8": Int8Channel(), "gptq": GPTQ(4, 64), "awq": AWQ(64)}[fmt]
    ckpt = TensorDict(stored)
    members = {k: k for k in stored}
    grid = fmt_obj.grid(ckpt, members)
    S, Z = grid.columns(0, W.shape[1])
    S, Z = (
        S.double().expand_as(W),
        (Z.double().expand_as(W) if Z is not None else torch.zeros_like(W.double())),
    )
    # the reference: the nearest codebook value in fp64, by brute force over the whole codebook
    U = W.double() / S + Z
    book = grid.codebook
    if fmt == "fp8":  # every finite float8_e4m3fn value, independently of the implementation
        C = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).double()
        C = C[torch.isfinite(C)].unique()
    else:
        C = torch.arange(book.lo, book.hi + 1).double()
    codes = C[(U[..., None] - C).abs().argmin(-1)]
    ref = S * (codes - Z)
    assert torch.allclose(fmt_obj.dequantize(ckpt, members).double(), ref, rtol=1e-6, atol=1e-9)


def test_convert_base_sees_through_a_quantized_base(tmp_path):
    """`convert --base` reads the base through WeightView like merge does: a GPTQ base resolves kohya names."""
    import json
    from lorakit.io import write_safetensors

    shapes = examples.llama_shapes()
    tensors = examples.random_tensors(shapes)
    stored = {}
    for name, t in tensors.items():
        if name.endswith("proj.weight"):
            stored.update(
                {f"{name[:-7]}.{k}": v for k, v in examples.quantize(t, "gptq", group_size=32).items()}
            )
        else:
            stored[name] = t
    os.makedirs(tmp_path / "gptq")
    write_safetensors(tmp_path / "gptq" / "model.safetensors", stored)
    with open(tmp_path / "gptq" / "config.json", "w") as f:
        json.dump(
            {**examples.llama_config(), "quantization_config": examples.quantization_config("gptq", 32)}, f
        )
    ad = examples.random_adapter(shapes, rank=2)
    ad.save(tmp_path / "a.safetensors")
    lorakit.convert(tmp_path / "a.safetensors", tmp_path / "k.safetensors", to="kohya")
    report = lorakit.convert(
        tmp_path / "k.safetensors", tmp_path / "b.safetensors", to="lorakit", base=str(tmp_path / "gptq")
    )
    back = lorakit.load(tmp_path / "b.safetensors")
    assert sorted(back.modules) == sorted(ad.modules), report["notes"]
    for name, m in ad.modules.items():
        assert torch.allclose(back.modules[name].delta(), m.delta(), rtol=1e-6, atol=1e-7)
