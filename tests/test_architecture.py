"""The layers stay layers: the core is pure, every list of choices exists once (and the README lists every entry),
formats take only the options they declare, and the quantized-checkpoint fixtures are exact."""

import importlib
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
    with pytest.raises(LorakitError, match="neither by the lorakit reader nor by the diffusers writer"):
        lorakit.convert(
            tmp_path / "a.safetensors", tmp_path / "p", to="diffusers", base=str(tmp_path / "base")
        )


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


# ---------------------------------------------------------------- the layers, checked on the source
LORAKIT = os.path.join(os.path.dirname(__file__), "..", "lorakit")


def _layer(module):
    """lorakit.engine.plan -> engine; lorakit.cli -> cli; lorakit -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _import_graph():
    """{layer: {layers it imports}}, every import statement counted (those inside functions too)."""
    import ast

    graph = {}
    for folder, _, files in os.walk(LORAKIT):
        for file in (f for f in files if f.endswith(".py")):
            path = os.path.join(folder, file)
            rel = os.path.relpath(path, os.path.join(LORAKIT, ".."))[: -len(".py")].split(os.sep)
            package = rel if file == "__init__.py" else rel[:-1]
            module = ".".join(rel[:-1] if file == "__init__.py" else rel)
            for node in ast.walk(ast.parse(open(path).read())):
                if isinstance(node, ast.ImportFrom):
                    base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
                    target = ".".join(p for p in (base, node.module) if p)
                    targets = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
                elif isinstance(node, ast.Import):
                    targets = [a.name for a in node.names]
                else:
                    continue
                for t in targets:
                    if t.startswith("lorakit") and _layer(t) != _layer(module):
                        graph.setdefault(_layer(module), set()).add(_layer(t))
    return graph


def test_no_import_circle_between_layers():
    graph = _import_graph()

    def reaches(start, goal, seen):
        return any(
            n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in graph.get(start, ())
        )

    circles = sorted(layer for layer in graph if reaches(layer, layer, {layer}))
    assert not circles, circles
    assert not graph["core"] & {"io", "formats", "quant", "engine", "bases", "commands", "naming"}
    assert not graph["naming"] - {"core", "errors"}  # name maps read no files
    for reader in os.listdir(os.path.join(LORAKIT, "formats")):  # adapter readers read adapters only
        text = open(os.path.join(LORAKIT, "formats", reader)).read() if reader.endswith(".py") else ""
        assert "..quant" not in text and "..bases." not in text, reader


def test_functions_stay_short_and_commands_know_no_container():
    import ast

    for layer in ("engine", "bases", "commands"):
        for file in sorted(f for f in os.listdir(os.path.join(LORAKIT, layer)) if f.endswith(".py")):
            text = open(os.path.join(LORAKIT, layer, file)).read()
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, ast.FunctionDef):
                    assert node.end_lineno - node.lineno < 60, f"{layer}/{file}: {node.name}"
            if layer == "commands":
                words = re.findall(r"gguf|diffusers|pipeline|shard", " ".join(_code_words(text)).lower())
                assert not words, (file, words)
    merge_source = open(os.path.join(LORAKIT, "commands", "merge.py")).read()
    assert merge_source.count("\n") <= 120


def _code_words(text):
    """Identifiers and string literals of a module's code: not its comments, not its docstrings."""
    import ast

    tree = ast.parse(text)
    docs = {
        id(n.body[0].value)
        for n in ast.walk(tree)
        if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef))
        and n.body
        and isinstance(n.body[0], ast.Expr)
        and isinstance(n.body[0].value, ast.Constant)
    }
    for n in ast.walk(tree):
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs:
            yield n.value
        elif isinstance(n, (ast.Name, ast.Attribute, ast.FunctionDef, ast.alias, ast.keyword, ast.arg)):
            yield (
                getattr(n, "id", None) or getattr(n, "attr", None) or getattr(n, "name", None) or n.arg or ""
            )


def _count_calls(monkeypatch, name):
    """Wrap lorakit's function `name` everywhere it was imported; returns the list of first arguments seen."""
    seen, original = [], None
    for module in [m for n, m in sys.modules.items() if n.startswith("lorakit")]:
        f = getattr(module, name, None)
        if callable(f) and getattr(f, "__module__", "").startswith("lorakit"):
            original = original or f
            if f is original:

                def counted(path, *args, **kwargs):
                    seen.append(os.path.realpath(os.fspath(path)))
                    return original(path, *args, **kwargs)

                monkeypatch.setattr(module, name, counted)
    assert original is not None, name
    return seen


def test_merge_parses_each_shard_header_and_config_once(tmp_path, monkeypatch):
    """A sharded folder base and two kohya adapters (their names resolved against the base): one parse of each
    shard header, one read of config.json, for the whole merge."""
    import json

    from lorakit.io import write_safetensors

    shapes = examples.llama_shapes()
    tensors = examples.random_tensors(shapes)
    names = sorted(tensors)
    os.makedirs(tmp_path / "base")
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in halves.items():
        write_safetensors(tmp_path / "base" / file, {n: tensors[n] for n in part})
    weight_map = {n: f for f, part in halves.items() for n in part}
    with open(tmp_path / "base" / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(tmp_path / "base" / "config.json", "w") as f:
        json.dump(examples.llama_config(), f)
    for i in range(2):
        ad = examples.random_adapter(shapes, rank=2, seed=i)
        ad.save(tmp_path / f"a{i}.safetensors")
        lorakit.convert(tmp_path / f"a{i}.safetensors", tmp_path / f"k{i}.safetensors", to="kohya")
    importlib.import_module("lorakit.engine.merge")  # imported first, so that every reference gets wrapped

    headers = _count_calls(monkeypatch, "read_header")
    jsons = _count_calls(monkeypatch, "read_json")
    report = lorakit.merge(
        tmp_path / "base",
        [tmp_path / "k0.safetensors", tmp_path / "k1.safetensors"],
        tmp_path / "out",
        quiet=True,
    )
    assert report["merged_count"] > 0
    for file in halves:
        assert headers.count(os.path.realpath(tmp_path / "base" / file)) == 1, headers
    assert jsons.count(os.path.realpath(tmp_path / "base" / "config.json")) == 1, jsons


def test_merge_parses_a_single_file_base_once(tmp_path, monkeypatch):
    """The "is BASE an adapter?" check looks at the header the base parsed: one parse for the whole merge."""
    from lorakit.io import write_safetensors

    shapes = examples.llama_shapes()
    write_safetensors(tmp_path / "base.safetensors", examples.random_tensors(shapes))
    examples.random_adapter(shapes, rank=2).save(tmp_path / "a.safetensors")
    importlib.import_module("lorakit.engine.merge")
    headers = _count_calls(monkeypatch, "read_header")
    lorakit.merge(
        tmp_path / "base.safetensors", [tmp_path / "a.safetensors"], tmp_path / "o.safetensors", quiet=True
    )
    assert headers.count(os.path.realpath(tmp_path / "base.safetensors")) == 1, headers
