"""A new user's first hour: the usual mistakes get hints, --json speaks one vocabulary, header-only commands import no
torch, progress bars stay out of logs, the demo cleans up, and the library takes Adapters."""

import json
import os
import shlex
import subprocess
import sys

import pytest

import lorakit
from conftest import assert_one_line_error
from lorakit import examples
from lorakit.errors import LorakitError

SHAPES = examples.llama_shapes()


@pytest.fixture
def w(tmp_path, monkeypatch):
    examples.write_llama_checkpoint(str(tmp_path / "base"))
    examples.write_llama_checkpoint(str(tmp_path / "sharded"), shards=2)
    ad = examples.random_adapter(SHAPES, rank=2)
    ad.save(tmp_path / "a.safetensors")
    ad.save(tmp_path / "peft", format="peft")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["merge", "base", "a.safetensors", "0.7", "-o", "m"], ["'0.7' is not a file", "a.safetensors:0.7"]),
        (
            ["merge", "base", "a.safetensors:0,7", "-o", "m"],
            ["weight '0,7' is not a number", "a.safetensors:0.7"],
        ),
        (["merge", "a.safetensors", "base", "-o", "m"], ["did you swap BASE and ADAPTER?"]),
        (["merge", "peft", "a.safetensors", "-o", "m"], ["BASE is a peft adapter", "did you swap"]),
        (["inspect", "peft/adapter_config.json"], ["this is a JSON file", "pass the folder"]),
        (
            ["merge", "sharded/model.safetensors.index.json", "a.safetensors", "-o", "m"],
            ["this is a JSON file"],
        ),
        (
            ["merge", "sharded/model-00001-of-00002.safetensors", "a.safetensors", "-o", "m.safetensors"],
            ["one of the 2 shards", "pass its folder"],
        ),
        (
            ["merge", "meta-llama/Llama-3.2-1B", "a.safetensors", "-o", "m"],
            ["no such file or folder", "huggingface-cli download meta-llama/Llama-3.2-1B"],
        ),
        (
            ["merge", "base", "a.safetensors", "-o", "merged.safetensors"],
            ["the base is a folder", "give a folder name"],
        ),
        (
            ["merge", "base", "a.safetensors", "-o", "m", "--dtype", "bfloat17"],
            ["unknown dtype 'bfloat17'", "bf16"],
        ),
    ],
)
def test_usual_mistakes_get_a_hint(w, cli, argv, fragments):
    assert_one_line_error(*cli(*argv), *fragments)
    assert not any(os.path.exists(p) for p in ("m", "m.safetensors", "merged.safetensors"))


@pytest.mark.parametrize("alias", ["bfloat16", "float16", "float32", "BF16", "half"])
def test_dtype_aliases(w, cli, alias):
    code, out, err = cli("merge", "base", "a.safetensors", "-o", "m", "--dtype", alias, "-q")
    assert code == 0, err


def test_validate_on_a_peft_adapter_is_one_line_with_a_runnable_command(w, cli):
    code, out, err = cli("validate", "peft")
    assert code == 1
    problems = [line for line in out.splitlines() if line.startswith("  ")]
    assert len(problems) == 1 and "this is a peft adapter, not a lorakit file" in problems[0], out
    command = shlex.split(problems[0].split("spec format: ", 1)[1])
    assert command[0] == "lorakit"
    code, out, err = cli(*command[1:])
    assert code == 0, err
    code, out, err = cli("validate", command[command.index("-o") + 1])
    assert code == 0 and out.startswith("valid")


def test_library_errors_name_python_options_and_the_cli_shell_options(w, cli):
    lorakit.convert("a.safetensors", "a2.safetensors", to="lorakit")
    with pytest.raises(LorakitError, match=r"use force=True to replace it"):
        lorakit.convert("a.safetensors", "a2.safetensors", to="lorakit")
    assert_one_line_error(
        *cli("convert", "a.safetensors", "-o", "a2.safetensors", "--to", "lorakit"),
        "use --force to replace it",
    )
    with pytest.raises(LorakitError, match="rank must be >= 1"):
        lorakit.resize("a.safetensors", "r.safetensors", rank=0)


def test_library_takes_adapter_objects(w):
    ad = lorakit.load("a.safetensors")
    r = lorakit.merge("base", [ad, ("a.safetensors", 0.5)], "m", quiet=True)
    assert r["merged_count"] == 4 and r["adapters"][0]["file"] == "<Adapter 1>"
    c = lorakit.combine([ad, (ad, -1.0)], "zero.safetensors", method="linear", quiet=True)
    assert c["module_count"] == 4
    assert all(float(m.delta().abs().max()) < 1e-6 for m in lorakit.load("zero.safetensors").modules.values())
    assert lorakit.diff(ad, "a.safetensors")["summary"]["identical_deltas"]
    assert lorakit.resize(ad, "r.safetensors", rank=1)["modules"][0]["rank"] == 1
    assert {"load", "merge", "combine", "Adapter", "LorakitError"} <= set(dir(lorakit))
    assert "One function per CLI command" in lorakit.__doc__


def _json(cli, *argv):
    code, out, err = cli(*argv, "--json")
    assert code == 0, err
    return json.loads(out)


def test_one_json_vocabulary_for_every_command(w, cli):
    examples.write_llama_checkpoint("tuned", seed=1)
    reports = {
        "inspect": _json(cli, "inspect", "a.safetensors", "-v"),
        "convert": _json(cli, "convert", "a.safetensors", "-o", "k.safetensors", "--to", "kohya"),
        "combine": _json(cli, "combine", "a.safetensors", "a.safetensors:0.5", "-o", "c.safetensors"),
        "resize": _json(cli, "resize", "a.safetensors", "-o", "r.safetensors", "--rank", "1"),
        "diff": _json(cli, "diff", "a.safetensors", "r.safetensors"),
        "extract": _json(cli, "extract", "base", "tuned", "-o", "x.safetensors", "--rank", "2"),
        "merge": _json(cli, "merge", "base", "a.safetensors", "-o", "m"),
    }
    for name, r in reports.items():
        assert isinstance(r.get("modules", []), list), name
        for row in r.get("modules", []):
            assert "module" in row and "name" not in row, (name, row)
        for key, value in r.items():
            if key.endswith("_count"):
                assert isinstance(value, int), (name, key)
        assert "notes" not in r or isinstance(r["notes"], list)
    assert reports["combine"]["modules"][0].keys() >= {"rank", "rank_in"}
    assert reports["resize"]["modules"][0].keys() >= {"rank", "rank_in"} and "params_in" in reports["resize"]
    assert reports["convert"]["module_count"] == 4 and "modules" not in reports["convert"]
    assert reports["merge"]["merged_count"] == 4 and reports["merge"]["tensor_count"] == len(SHAPES)
    code, out, err = cli("merge", "base", "missing.safetensors", "-o", "m2", "--json")
    assert code == 2 and json.loads(out)["error"].startswith("missing.safetensors: no such file")
    assert json.loads(out)["exit_code"] == 2 and err.startswith("lorakit: error: missing.safetensors")


def test_readme_documents_the_json_vocabulary():
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    section = readme.split("### JSON output", 1)[1].split("###", 1)[0]
    for key in ("output", "module", "modules", "module_count", "rank_in", "params_in", "notes", "error"):
        assert f"`{key}`" in section


def test_human_output_reads_well(w, cli):
    code, out, _ = cli("inspect", "peft")
    assert code == 0 and "provenance  \n" not in out + "\n" and "{'" not in out
    assert "provenance  source_format peft" in out
    lorakit.combine(["a.safetensors", "a.safetensors"], "c.safetensors", quiet=True)
    code, out, _ = cli("inspect", "c.safetensors")
    assert "  from      a.safetensors (format lorakit, weight 1.0)" in out and "{'" not in out
    other = lorakit.Adapter()
    other.add(
        lorakit.Module(
            "model.layers.0.mlp.up_proj", examples.torch.ones(1, 64), examples.torch.ones(128, 1), alpha=1.0
        )
    )
    other.save("o.safetensors")
    code, out, _ = cli("diff", "a.safetensors", "o.safetensors")
    assert code == 0 and out.startswith("no module in common: 4 only in A") and "cosine" not in out
    lorakit.merge("base", ["a.safetensors"], "m", quiet=True)
    code, out, _ = cli("merge", "m", "a.safetensors", "-o", "u", "--unmerge", "-q")
    assert code == 0 and out.startswith("subtracted a.safetensors from m:")


@pytest.mark.parametrize("argv", [["inspect", "{a}"], ["inspect", "{a}", "--json"], ["validate", "{a}"]])
def test_header_only_commands_import_no_torch(w, argv):
    code = (
        "import sys\nfrom lorakit.cli import main\n"
        f"try:\n    main({[x.format(a=str(w / 'a.safetensors')) for x in argv]!r})\nexcept SystemExit as e:\n"
        "    assert e.code in (0, None), e.code\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_progress_bars_stay_out_of_logs(w, cli):
    code, out, err = cli("merge", "base", "a.safetensors", "-o", "m")  # stderr is not a terminal here
    assert code == 0 and "\r" not in err and "merge:" not in err


def test_demo_is_clean(tmp_path, cli, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    code, out, err = cli("demo", "--quiet")
    assert code == 0, err
    assert "max |logits difference|" in out
    assert not [f for f in os.listdir(tmp_path) if "lorakit" in f]
