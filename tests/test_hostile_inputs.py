"""Hostile and malformed inputs through the CLI, one class per block: data loss, silent wrong output, crashes and
resource abuse. Each case must end in one clean line naming the file (exit 2; validate: 1 for an invalid file) or in
a correct result, leave the inputs as they were and leave no output or temporary behind."""

import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time

import pytest
import torch

import lorakit
from conftest import assert_one_line_error
from lorakit import examples
from lorakit.core import Adapter, Module
from lorakit.errors import LorakitError
from lorakit.io import write_safetensors

SHAPES = examples.llama_shapes()


def snapshot(folder):
    """Every file under folder with its bytes: to prove inputs untouched."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, folder)] = open(p, "rb").read()
    return out


@pytest.fixture
def w(tmp_path):
    """A workspace: a tiny base folder, a single-file base, a lorakit adapter and a PEFT folder for that base."""
    examples.write_llama_checkpoint(str(tmp_path / "base"))
    examples.write_llama_checkpoint(str(tmp_path / "single"))
    ad = examples.random_adapter(SHAPES, rank=2)
    ad.save(tmp_path / "a.safetensors")
    ad.save(tmp_path / "peft", format="peft")
    return tmp_path


def raw_safetensors(path, header_text, data=b""):
    text = header_text.encode() if isinstance(header_text, str) else header_text
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data)


def peft_folder(path, tensors, config):
    os.makedirs(path, exist_ok=True)
    write_safetensors(os.path.join(path, "adapter_model.safetensors"), tensors)
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        f.write(config if isinstance(config, str) else json.dumps(config))


def peft_tensors(rank=2):
    g = torch.Generator().manual_seed(0)
    p = "base_model.model.model.layers.0.self_attn.q_proj"
    return {
        f"{p}.lora_A.weight": torch.randn(rank, 64, generator=g),
        f"{p}.lora_B.weight": torch.randn(64, rank, generator=g),
    }


def kohya_file(path, parts):
    write_safetensors(path, {f"lora_unet_model_layers_0_self_attn_q_proj.{k}": v for k, v in parts.items()})


# ---------------------------------------------------------------------------------------------------- data loss
@pytest.mark.parametrize(
    "argv, fragment",
    [
        (
            ["convert", "a.safetensors", "--base", "base", "-o", "base", "--to", "lorakit", "--force"],
            "also an input",
        ),
        (["merge", "base", "a.safetensors", "-o", "base", "--force"], "also an input"),
        (
            [
                "merge",
                "single/model.safetensors",
                "a.safetensors",
                "-o",
                "single/model.safetensors",
                "--force",
            ],
            "also an input",
        ),
        (["convert", "a.safetensors", "-o", "a.safetensors", "--to", "lorakit", "--force"], "also an input"),
        (["convert", "peft", "-o", "peft/copy.safetensors", "--to", "lorakit"], "inside the input"),
        (["convert", "a.safetensors", "-o", ".", "--to", "lorakit", "--force"], "would contain the input"),
        (["convert", "a.safetensors", "-o", "base", "--to", "lorakit", "--force"], "exists as a folder"),
        (
            ["convert", "a.safetensors", "-o", "single/config.json", "--to", "peft", "--force"],
            "exists as a file",
        ),
        # named for a file, a folder format refused by the name first
        (
            ["convert", "a.safetensors", "-o", "single/model.safetensors", "--to", "peft", "--force"],
            "the name says one file, but a peft adapter is a folder",
        ),
        (["merge", "base", "a.safetensors", "-o", "a.safetensors", "--force"], "also an input"),
        (
            ["combine", "a.safetensors", "a.safetensors:0.5", "-o", "a.safetensors", "--force"],
            "also an input",
        ),
        (["resize", "a.safetensors", "-o", "a.safetensors", "--rank", "1", "--force"], "also an input"),
        (["extract", "base", "single", "-o", "single", "--rank", "1", "--force"], "also an input"),
    ],
)
def test_output_never_destroys_an_input(w, cli, monkeypatch, argv, fragment):
    monkeypatch.chdir(w)
    before = snapshot(w)
    assert_one_line_error(*cli(*argv), fragment)
    assert snapshot(w) == before


def test_force_replaces_only_the_same_kind_and_atomically(w, cli, monkeypatch):
    monkeypatch.chdir(w)
    os.makedirs("notes")
    open("notes/todo.txt", "w").write("mine")
    assert_one_line_error(*cli("merge", "base", "a.safetensors", "-o", "notes", "--force"), "holds no model")
    assert open("notes/todo.txt").read() == "mine"
    code, out, err = cli("merge", "base", "a.safetensors", "-o", "merged", "-q")
    assert code == 0, err
    code, out, err = cli("merge", "base", "a.safetensors:0.5", "-o", "merged", "-q", "--force")
    assert code == 0, err
    assert sorted(f for f in os.listdir(".") if f.startswith(".")) == []  # no temporaries, no old copy left


def test_an_empty_folder_made_beforehand_takes_a_folder_output(w, cli, monkeypatch):
    """`mkdir out` before a command that writes a folder: the empty folder is no output to protect (merge, convert
    --to peft, train --format peft write into it); one holding anything, or a file output, is refused as before; a
    file written into it while the command runs is left alone and the result discarded."""
    import numpy as np

    from lorakit.io import atomic_output

    monkeypatch.chdir(w)
    np.save("tokens.npy", np.arange(2000) % 200)
    for argv in (
        ["merge", "base", "a.safetensors", "-o", "m"],
        ["convert", "a.safetensors", "-o", "m", "--to", "peft"],
        ["train", "--base", "base", "--data", "tokens.npy", "-o", "m", "--format", "peft", "--steps", "1"],
    ):
        shutil.rmtree("m", ignore_errors=True)
        os.makedirs("m")
        code, out, err = cli(*argv, "-q")
        assert code == 0 and os.path.isfile(
            "m/config.json" if argv[0] == "merge" else "m/adapter_config.json"
        ), err
    os.makedirs("full")
    open("full/x", "w").write("x")
    assert_one_line_error(*cli("merge", "base", "a.safetensors", "-o", "full"), "output exists (use --force")
    os.makedirs("empty")
    assert_one_line_error(*cli("resize", "a.safetensors", "-o", "empty", "--rank", "1"), "output exists")
    with pytest.raises(LorakitError, match="output appeared"):
        with atomic_output(w / "empty", directory=True) as tmp:
            open(os.path.join(tmp, "mine"), "w").write("mine")
            open(w / "empty" / "theirs", "w").write("theirs")
    assert os.listdir("empty") == ["theirs"]


def test_two_writers_of_one_output_never_silently_replace(tmp_path):
    from lorakit.io import atomic_output

    out = tmp_path / "out.safetensors"
    with pytest.raises(LorakitError, match="output appeared while this command ran"):
        with atomic_output(out) as tmp:
            open(tmp, "wb").write(b"mine")
            open(out, "wb").write(b"theirs")  # another process finished first
    assert out.read_bytes() == b"theirs" and os.listdir(tmp_path) == ["out.safetensors"]
    with pytest.raises(LorakitError, match="output appeared"):
        with atomic_output(tmp_path / "dir", directory=True) as tmp:
            os.makedirs(tmp_path / "dir" / "x")
    assert sorted(os.listdir(tmp_path)) == ["dir", "out.safetensors"]


def test_stale_temporaries_of_dead_runs_are_removed(tmp_path):
    ad = examples.random_adapter(SHAPES, rank=2)
    dead = tmp_path / ".a.safetensors.lorakit-999999999.dead.tmp"
    alive = tmp_path / f".a.safetensors.lorakit-{os.getppid()}.live.tmp"
    other = tmp_path / ".b.safetensors.lorakit-999999999.x.tmp"  # another OUT's, its run dead too
    mine = tmp_path / ".b.safetensors.lorakit-999999999.x.tmp.keep"  # not lorakit's pattern: never touched
    for p in (dead, alive, other, mine):
        p.write_bytes(b"x" * 100)
    ad.save(tmp_path / "a.safetensors")
    assert not dead.exists() and alive.exists() and not other.exists() and mine.exists()


def test_sigterm_leaves_no_output_and_no_temporary(w):
    data = w / "tokens.npy"
    import numpy as np

    np.save(data, np.arange(20000) % 200)
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lorakit.cli",
            "train",
            "--base",
            str(w / "base"),
            "--data",
            str(data),
            "-o",
            str(w / "t.safetensors"),
            "--steps",
            "100000",
            "--seq-len",
            "16",
            "--batch",
            "2",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 60
    while time.time() < deadline and p.poll() is None:  # wait until it trains (its progress bar is up)
        time.sleep(0.5)
        if any(f.startswith(".t.safetensors") for f in os.listdir(w)) or time.time() > deadline - 50:
            break
    time.sleep(1.0)
    p.send_signal(signal.SIGTERM)
    err = p.communicate(timeout=60)[1]
    assert p.returncode == 143, err
    assert "terminated (SIGTERM)" in err and "Traceback" not in err
    assert not any(f.startswith(("t.safetensors", ".t.safetensors")) for f in os.listdir(w))


def test_a_file_that_shrinks_while_read_is_a_clean_error(tmp_path):
    from lorakit.io import TensorFile

    write_safetensors(tmp_path / "x.safetensors", {"t": torch.ones(1000)})
    tf = TensorFile(tmp_path / "x.safetensors")
    os.truncate(tmp_path / "x.safetensors", 200)
    with pytest.raises(LorakitError, match="file ended inside the tensor data"):
        tf.get("t")


def test_outputs_follow_the_umask(w):
    old = os.umask(0o022)
    try:
        ad = lorakit.load(w / "a.safetensors")
        ad.save(w / "u.safetensors")
        ad.save(w / "u_peft", format="peft")
        lorakit.merge(w / "base", [w / "a.safetensors"], w / "m", quiet=True)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(w / "u.safetensors").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(w / "u_peft").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(w / "m").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(w / "m" / "model.safetensors").st_mode) == 0o644


# ---------------------------------------------------------------------------------------------------- wrong output
@pytest.mark.parametrize("weight", ["nan", "inf", "-inf", "1e39"])
def test_weights_must_be_finite(w, cli, monkeypatch, weight):
    monkeypatch.chdir(w)
    assert_one_line_error(
        *cli("merge", "base", f"a.safetensors:{weight}", "-o", "m"),
        "a.safetensors",
        "not a finite fp32 number",
    )
    assert_one_line_error(
        *cli("combine", f"a.safetensors:{weight}", "a.safetensors", "-o", "c.safetensors"),
        "not a finite fp32 number",
    )
    assert not os.path.exists("m") and not os.path.exists("c.safetensors")


@pytest.mark.parametrize(
    "alpha, fragment",
    [
        ("NaN", "alpha is nan"),
        (0, "alpha is 0.0"),
        (-8, "alpha is -8.0"),
        ('"8"', "'lora_alpha' must be a number"),
        ("[8]", "'lora_alpha' must be a number"),
    ],
)
def test_peft_alpha_out_of_spec_is_refused(tmp_path, cli, alpha, fragment):
    peft_folder(tmp_path / "p", peft_tensors(), f'{{"r": 2, "lora_alpha": {alpha}, "peft_type": "LORA"}}')
    assert_one_line_error(
        *cli("convert", tmp_path / "p", "-o", tmp_path / "o.safetensors", "--to", "lorakit"),
        str(tmp_path / "p"),
        fragment,
    )
    assert not os.path.exists(tmp_path / "o.safetensors")


@pytest.mark.parametrize(
    "parts, fragment",
    [
        (
            {
                "lora_down.weight": torch.ones(2, 64),
                "lora_up.weight": torch.ones(64, 2),
                "alpha": torch.tensor(float("nan")),
            },
            "alpha is nan",
        ),
        (
            {
                "lora_down.weight": torch.ones(2, 64),
                "lora_up.weight": torch.ones(64, 2),
                "alpha": torch.tensor(-4.0),
            },
            "alpha is -4.0",
        ),
        (
            {
                "lora_down.weight": torch.ones(2, 64),
                "lora_up.weight": torch.ones(64, 2),
                "alpha": torch.ones(3),
            },
            "alpha has shape [3]",
        ),
        (
            {
                "lora_down.weight": torch.ones(2, 64),
                "lora_up.weight": torch.ones(64, 2),
                "dora_scale": torch.ones(1, 7),
            },
            "[LK211]",
        ),
        (
            {"lora_down.weight": torch.ones(64), "lora_up.weight": torch.ones(64, 1)},
            "[LK203] lora_down has shape [64]",
        ),
        (
            {"lora_down.weight": torch.ones(2, 64), "lora_up.weight": torch.full((64, 2), float("nan"))},
            "[LK208]",
        ),
        (
            {"hada_w1_a": torch.ones(8, 2), "hada_w1_b": torch.ones(2, 8), "hada_w2_a": torch.ones(8, 2)},
            "LoHa without hada_w2_b",
        ),
        ({"lokr_w1": torch.ones(8, 8)}, "LoKr (no lokr_w2) without lokr_w2_a, lokr_w2_b"),
        ({"alpha": torch.tensor(4.0)}, "no factors"),
        ({"lora_down.weight": torch.ones(0, 10**9), "lora_up.weight": torch.ones(64, 0)}, "[LK205]"),
        (
            {"lora_down.weight": torch.ones(2, 64, dtype=torch.int32), "lora_up.weight": torch.ones(64, 2)},
            "[LK103] lora_down.weight is int32",
        ),
        (
            {"lora_down.weight": torch.ones(2, 64), "lora_up.weight": torch.ones(0, 2)},
            "[LK203] lora_A [2, 64] / lora_B [0, 2]: the weight they change would be empty",
        ),
    ],
)
def test_kohya_modules_out_of_spec_are_refused(tmp_path, cli, parts, fragment):
    kohya_file(tmp_path / "k.safetensors", parts)
    assert_one_line_error(
        *cli("convert", tmp_path / "k.safetensors", "-o", tmp_path / "o.safetensors", "--to", "lorakit"),
        "k.safetensors",
        "lora_unet_model_layers_0_self_attn_q_proj",
        fragment,
    )
    assert not os.path.exists(tmp_path / "o.safetensors")


def test_loralib_alpha_must_be_finite(tmp_path, cli):
    torch.save({"l.lora_A": torch.ones(2, 4), "l.lora_B": torch.ones(3, 2)}, tmp_path / "l.pt")
    for alpha in ("inf", "nan", "0", "-1"):
        assert_one_line_error(
            *cli(
                "convert",
                tmp_path / "l.pt",
                "-o",
                tmp_path / "o.safetensors",
                "--to",
                "lorakit",
                "--alpha",
                alpha,
            ),
            "l.pt",
            "alpha is",
        )


def test_nan_scale_in_an_int8_base_never_reaches_the_output(tmp_path, cli):
    stored = {}
    for name, t in examples.random_tensors(SHAPES).items():
        if name.endswith("proj.weight"):
            stored.update({f"{name[:-7]}.{k}": v for k, v in examples.quantize(t, "int8").items()})
        else:
            stored[name] = t
    stored["model.layers.0.self_attn.q_proj.weight_scale"][3] = float("nan")
    os.makedirs(tmp_path / "q")
    write_safetensors(tmp_path / "q" / "model.safetensors", stored)
    json.dump(
        {**examples.llama_config(), "quantization_config": examples.quantization_config("int8")},
        open(tmp_path / "q" / "config.json", "w"),
    )
    examples.random_adapter(SHAPES, rank=2).save(tmp_path / "a.safetensors")
    for extra in ([], ["--dtype", "bf16"]):
        assert_one_line_error(
            *cli("merge", tmp_path / "q", tmp_path / "a.safetensors", "-o", tmp_path / "o", *extra),
            "model.layers.0.self_attn.q_proj",
            "NaN/Inf",
        )
        assert not os.path.exists(tmp_path / "o")


def test_merged_values_out_of_the_dtype_range_are_refused(w, cli):
    base = w / "h"
    examples.write_llama_checkpoint(str(base), dtype=torch.float16)
    assert_one_line_error(*cli("merge", base, f"{w / 'a.safetensors'}:3e38", "-o", w / "o"), "NaN/Inf")


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["resize", "a.safetensors", "-o", "o.safetensors", "--rank", "0"], "--rank must be >= 1, got 0"),
        (["resize", "a.safetensors", "-o", "o.safetensors", "--rank", "-3"], "--rank must be >= 1, got -3"),
        (["resize", "a.safetensors", "-o", "o.safetensors", "--energy", "0"], "--energy must be in (0, 1]"),
        (
            ["resize", "a.safetensors", "-o", "o.safetensors", "--energy", "-0.5"],
            "--energy must be in (0, 1]",
        ),
        (["resize", "a.safetensors", "-o", "o.safetensors", "--energy", "1.5"], "--energy must be in (0, 1]"),
        (["resize", "a.safetensors", "-o", "o.safetensors", "--energy", "nan"], "--energy must be in (0, 1]"),
        (["resize", "a.safetensors", "-o", "o.safetensors", "--sv-fro", "2"], "--sv-fro must be in (0, 1]"),
        (["resize", "a.safetensors", "-o", "o.safetensors", "--sv-ratio", "0.5"], "--sv-ratio must be >= 1"),
        # convert's --rank / --energy were ignored (out of range too) where nothing is written as a low-rank delta
        (
            ["convert", "a.safetensors", "-o", "o.safetensors", "--to", "kohya", "--energy", "2"],
            "--energy must be in",
        ),
        (
            ["convert", "a.safetensors", "-o", "o.safetensors", "--to", "kohya", "--rank", "2"],
            "--rank sets the rank of what convert writes as a low-rank delta",
        ),
        (
            ["extract", "base", "single", "-o", "o.safetensors", "--rank", "2", "--energy", "0.5"],
            "give --rank or --energy, not both",
        ),
        # infinity is above every lower bound: the message says why it is refused all the same
        (
            ["resize", "a.safetensors", "-o", "o.safetensors", "--sv-ratio", "inf"],
            "--sv-ratio must be >= 1, got inf (not a finite number)",
        ),
        (
            ["extract", "base", "single", "-o", "o.safetensors", "--energy", "95"],
            "--energy must be in (0, 1]",
        ),
        (["extract", "base", "single", "-o", "o.safetensors", "--rank", "0"], "--rank must be >= 1"),
        # a misspelt target among good ones: refused, not an adapter extracted without it
        (
            ["extract", "base", "single", "-o", "o.safetensors", "--rank", "2", "--targets", "q_proj,q_prj"],
            "--targets q_prj: matches no tensor of the checkpoints (the other targets match",
        ),
        (
            ["combine", "a.safetensors", "a.safetensors", "-o", "o.safetensors", "--rank", "0"],
            "--rank must be >= 1",
        ),
        (["combine", "a.safetensors", "a.safetensors", "-o", "o.safetensors", "--density", "0"], "--density"),
        (["merge", "base", "a.safetensors", "-o", "o", "--shard-size", "10"], "give a unit"),
        (["merge", "base", "a.safetensors", "-o", "o", "--threads", "-3"], "--threads must be >= 1"),
        (["merge", "base", "a.safetensors", "-o", "o", "--threads", "0"], "--threads must be >= 1"),
        # more workers than all the machine's memory holds (each holds the largest tensor it merges, twice)
        (
            ["merge", "base", "a.safetensors", "-o", "o", "--threads", str(10**9)],
            "--threads 1000000000: all the memory this machine has holds",
        ),
        (
            ["convert", "a.safetensors", "-o", "", "--to", "kohya"],
            "the output path is empty: give one (-o OUT)",
        ),
        (
            ["convert", "a.safetensors", "-o", "o.gguf", "--to", "kohya"],
            "the name says GGUF, but the kohya format is safetensors",
        ),
        (
            ["combine", "a.safetensors", "a.safetensors", "-o", "o.gguf"],
            "the name says GGUF, but the lorakit format",
        ),
        (
            ["convert", "a.safetensors", "-o", "o.safetensors", "--to", "gguf", "--base", "base"],
            "o.safetensors: the name says safetensors, but a llama.cpp adapter is a GGUF file: name it .gguf",
        ),
        (
            ["convert", "a.safetensors", "-o", "o.safetensors", "--to", "peft"],
            "o.safetensors: the name says one file, but a peft adapter is a folder (its config beside its weights)",
        ),
        (
            ["convert", "a.safetensors", "-o", "o.safetensors", "--to", "mlx"],
            "the name says one file, but an mlx adapter is a folder",
        ),
        (
            ["extract", "base", "single", "-o", "o.gguf", "--rank", "2"],
            "the name says GGUF, but the lorakit format",
        ),
        (
            ["merge", "base", "a.safetensors", "-o", "o.gguf"],
            "the base is safetensors, so the output is safetensors",
        ),
        # an option that another option's absence (or presence) would leave unread
        (
            ["validate", "a.safetensors", "--engine-version", "0.32"],
            "--engine-version goes with --for ENGINE",
        ),
        (
            ["validate", "a.safetensors", "--quick", "--fail-fast"],
            "--fail-fast stops the value scan, which --quick",
        ),
        (
            ["merge", "base", "a.safetensors", "-o", "o", "--initial", "a.safetensors"],
            "--initial undoes the initialisation of one adapter that changed its base (PiSSA, OLoRA, CorDA, "
            "LoRA-GA); none given here did (nothing to undo)",
        ),
        (
            ["convert", "a.safetensors", "-o", "o.gguf", "--to", "gguf", "--base", "/nonexistent"],
            "--base: no such",
        ),
        (["inspect", "a.safetensors", "--base", "/nonexistent"], "no such"),
        # torch's generators take 64 bits: a larger seed was an internal error
        (["merge", "base", "a.safetensors", "-o", "o", "--seed", str(2**64)], "--seed must be in [0, "),
        (["merge", "base", "a.safetensors", "-o", "o", "--seed", "-1"], "--seed must be in [0, "),
        (
            ["combine", "a.safetensors", "a.safetensors", "-o", "o.safetensors", "--seed", str(2**70)],
            "--seed must be in [0, ",
        ),
        (
            ["extract", "base", "single", "-o", "o.safetensors", "--rank", "2", "--seed", "-2"],
            "--seed must be",
        ),
    ],
)
def test_options_out_of_range_are_refused_not_clamped(w, cli, monkeypatch, argv, fragment):
    monkeypatch.chdir(w)
    assert_one_line_error(*cli(*argv), fragment)
    assert not any(os.path.exists(o) for o in ("o.safetensors", "o", "o.gguf"))


def test_duplicate_header_keys_are_invalid(tmp_path, cli):
    raw_safetensors(
        tmp_path / "d.safetensors",
        '{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
        '"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
        b"\0" * 4,
    )
    code, out, err = cli("validate", tmp_path / "d.safetensors")
    assert code == 1 and "LK107 duplicate-key x: duplicate key in the header" in out


def test_merge_into_a_fine_tune_of_the_base_warns(w):
    tuned = w / "tuned"
    examples.write_llama_checkpoint(str(tuned), seed=0)
    t = examples.random_tensors(SHAPES, seed=0)
    t["model.layers.0.self_attn.q_proj.weight"] += 0.1
    write_safetensors(tuned / "model.safetensors", t)
    lorakit.extract(w / "base", tuned, w / "x.safetensors", rank=2, quiet=True)
    assert lorakit.load(w / "x.safetensors").base_identity.startswith("sha256:")
    same = lorakit.merge(w / "base", [w / "x.safetensors"], w / "m1", quiet=True)
    assert not any("identity" in n for n in same["notes"])
    other = lorakit.merge(tuned, [w / "x.safetensors"], w / "m2", quiet=True)
    assert any("base identity differs" in n for n in other["notes"])


def test_combining_adapters_of_different_bases_is_refused(tmp_path, cli):
    a = examples.random_adapter(SHAPES, rank=2)
    a.base_fingerprint = None
    a.save(tmp_path / "llama.safetensors")
    g = Adapter()
    g.add(Module("transformer.h.0.attn.c_attn", torch.ones(2, 64), torch.ones(192, 2), alpha=2.0))
    g.save(tmp_path / "gpt2.safetensors")
    assert_one_line_error(
        *cli(
            "combine",
            tmp_path / "llama.safetensors",
            tmp_path / "gpt2.safetensors",
            "-o",
            tmp_path / "c.safetensors",
        ),
        "llama.safetensors",
        "gpt2.safetensors",
        "different base models",
    )


def test_embedding_merge_into_a_lone_file_says_it_cannot_check_tying(tmp_path):
    t = examples.random_tensors(examples.llama_shapes(tie=True))
    write_safetensors(tmp_path / "model.safetensors", t)
    ad = Adapter()
    ad.add(Module("model.embed_tokens", torch.ones(2, 64), torch.ones(256, 2), alpha=2.0, kind="embedding"))
    ad.save(tmp_path / "e.safetensors")
    r = lorakit.merge(
        tmp_path / "model.safetensors", [tmp_path / "e.safetensors"], tmp_path / "o.safetensors", quiet=True
    )
    assert any("no config.json and no lm_head.weight" in n for n in r["notes"])
    json.dump(examples.llama_config(tie=True), open(tmp_path / "config.json", "w"))
    r = lorakit.merge(
        tmp_path / "model.safetensors", [tmp_path / "e.safetensors"], tmp_path / "o2.safetensors", quiet=True
    )
    assert any("tie_word_embeddings" in n for n in r["notes"])


@pytest.mark.parametrize(
    "edit, data, argv, fragment",
    [
        (lambda c: c.update(model_type="granite"), None, [], "model_type 'granite'"),
        (lambda c: c.pop("hidden_size"), None, [], "'hidden_size' must be a positive integer"),
        (lambda c: c.update(num_key_value_heads=3), None, [], "head counts do not divide"),
        (None, ("jsonl", '{"input_ids": [1.5, 2, 3]}\n' * 50), [], "must be a list of integers"),
        (None, ("bin", b"\1\0\2"), [], "not a whole number"),
        (None, None, ["--seq-len", "0"], "--seq-len must be >= 1"),
        (None, None, ["--steps", "0"], "--steps must be >= 1"),
        (None, None, ["--steps", "5", "--warmup", "6"], "--warmup must be <= --steps (5), got 6"),
        (None, None, ["--rank", "0"], "--rank must be >= 1"),
        (None, None, ["--batch", "0"], "--batch must be >= 1"),
        (None, None, ["--lr", "nan"], "--lr must be > 0"),
        (None, None, ["--alpha", "nan"], "--alpha must be > 0"),
    ],
)
def test_train_refuses_bad_configs_data_and_options(tmp_path, cli, edit, data, argv, fragment):
    examples.write_llama_checkpoint(str(tmp_path / "b"))
    if edit:
        config = json.load(open(tmp_path / "b" / "config.json"))
        edit(config)
        json.dump(config, open(tmp_path / "b" / "config.json", "w"))
    path = tmp_path / "tokens.npy"
    import numpy as np

    np.save(path, np.arange(4000) % 200)
    if data:
        path = tmp_path / f"d.{data[0]}"
        path.write_bytes(data[1] if isinstance(data[1], bytes) else data[1].encode())
    assert_one_line_error(
        *cli(
            "train",
            "--base",
            tmp_path / "b",
            "--data",
            path,
            "-o",
            tmp_path / "o.safetensors",
            "--steps",
            "2",
            "--seq-len",
            "8",
            *argv,
        ),
        fragment,
    )
    assert not os.path.exists(tmp_path / "o.safetensors")


def test_bases_without_their_safetensors_say_what_they_hold(tmp_path, cli):
    """A model saved as PyTorch pickles, and an index naming a shard the folder lacks (an interrupted download)."""
    examples.write_llama_checkpoint(str(tmp_path / "b"), shards=2)
    Adapter().save(tmp_path / "a.safetensors")
    os.remove(tmp_path / "b" / "model-00002-of-00002.safetensors")
    argv = ["merge", tmp_path / "b", tmp_path / "a.safetensors", "-o", tmp_path / "o"]
    assert_one_line_error(
        *cli(*argv), "shard 'model-00002-of-00002.safetensors' named by the index is missing from the folder"
    )
    os.makedirs(tmp_path / "p")
    torch.save({"x": torch.ones(1)}, tmp_path / "p" / "pytorch_model.bin")
    argv[1] = tmp_path / "p"
    assert_one_line_error(
        *cli(*argv), "folder holds PyTorch pickles (pytorch_model.bin), no .safetensors files: lorakit reads"
    )


def test_train_refuses_a_folder_as_data(tmp_path, cli):
    examples.write_llama_checkpoint(str(tmp_path / "b"))
    argv = [
        "--base",
        tmp_path / "b",
        "--data",
        tmp_path / "b",
        "-o",
        tmp_path / "o.safetensors",
        "--steps",
        "1",
    ]
    assert_one_line_error(
        *cli("train", *argv), "is a folder: --data takes one file (.npy, .bin, .jsonl or .txt)"
    )


# ---------------------------------------------------------------------------------------------------- crashes
@pytest.mark.parametrize(
    "header, fragment",
    [
        ("[" * 100000 + "]" * 100000, "nested too deeply"),
        ('{"x": {"dtype": "F32", "shape": [' + "9" * 5000 + '], "data_offsets": [0, 4]}}', "not usable JSON"),
        ('{"x": [1, 2, 3]}', "malformed header entry"),
        ('{"x": {"dtype": "F32", "shape": "1", "data_offsets": [0, 4]}}', "malformed header entry"),
        ('{"__metadata__": {"a": 1}}', "__metadata__ must map strings to strings"),
        ("[1, 2]", "header must be a JSON object"),
    ],
)
def test_malformed_headers_are_one_line_errors(tmp_path, cli, header, fragment):
    raw_safetensors(tmp_path / "h.safetensors", header, b"\0" * 4)
    assert_one_line_error(*cli("inspect", tmp_path / "h.safetensors"), "h.safetensors", fragment)
    code, out, err = cli("validate", tmp_path / "h.safetensors")
    assert code == 1 and "LK101" in out


@pytest.mark.parametrize(
    "config, fragment",
    [
        ("[1, 2]", "must be a JSON object"),
        ('{"r": 0, "lora_alpha": 8}', "'r' must be a positive integer"),
        ('{"r": 2, "lora_alpha": 8, "alpha_pattern": {"q_proj[": 4}}', "is not a regular expression"),
        ('{"r": 2, "lora_alpha": 8, "alpha_pattern": {"(a+)+b": 4}}', "nested quantifier"),
        ('{"r": 2, "lora_alpha": 8, "rank_pattern": [1]}', "'rank_pattern' must be an object"),
        ('{"r": 2, "lora_alpha": 8, "modules_to_save": "lm_head"}', "'modules_to_save' must be a list"),
        ('{"r": 2, "lora_alpha": ' + "9" * 5000 + "}", "not usable JSON"),
        ('{"r": 4, "lora_alpha": 8}', "lora_A has rank 2 but adapter_config.json gives this module r = 4"),
        ('{"r": 2, "lora_alpha": 8, "rank_pattern": {"q_proj": 8}}', "gives this module r = 8"),
        ('{"r": 2, "lora_alpha": 8, "use_dora": true}', "use_dora but the file has no lora_magnitude_vector"),
        (
            '{"r": 2, "lora_alpha": 8, "target_modules": 5}',
            "'target_modules' must be a string or a list of strings",
        ),
        ('{"r": 2, "lora_alpha": 8, "target_modules": "(a+)+b"}', "'target_modules' '(a+)+b' has a nested"),
        (
            '{"r": 2, "lora_alpha": 8, "exclude_modules": "q_proj["}',
            "'exclude_modules' 'q_proj[' is not a regular",
        ),
        (
            '{"r": 2, "lora_alpha": 8, "layers_to_transform": ["1"]}',
            "'layers_to_transform' must be a layer index",
        ),
        ('{"r": 2, "lora_alpha": 8, "layers_pattern": ["(x+)+y"]}', "'layers_pattern' '(x+)+y' has a nested"),
    ],
)
def test_malformed_peft_configs_are_one_line_errors(tmp_path, cli, config, fragment):
    peft_folder(tmp_path / "p", peft_tensors(), config)
    start = time.time()
    assert_one_line_error(*cli("inspect", tmp_path / "p"), "p", fragment)
    assert time.time() - start < 10  # no catastrophic regex


def test_a_rank_pattern_that_states_the_factors_rank_reads(tmp_path, cli):
    """The check above reads r through rank_pattern as PEFT does: a pattern giving the module its rank is fine."""
    peft_folder(tmp_path / "p", peft_tensors(), {"r": 8, "lora_alpha": 8, "rank_pattern": {"q_proj": 2}})
    module = lorakit.load(tmp_path / "p").modules["model.layers.0.self_attn.q_proj"]
    assert module.rank == 2 and module.scale == 4.0


@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.bool, torch.uint8])
@pytest.mark.parametrize("part", ["lora_A", "lora_B"])
def test_integer_factors_are_refused_not_cast(tmp_path, cli, dtype, part):
    """An int8 lora_A of values under 1 would be cast to zeros: refused in every command, naming the module."""
    tensors = peft_tensors()
    key = next(k for k in tensors if f".{part}." in k)
    tensors[key] = (tensors[key] * 3).to(dtype)
    peft_folder(tmp_path / "p", tensors, {"r": 2, "lora_alpha": 8})
    name = str(dtype).removeprefix("torch.")
    for argv in (
        ("inspect", tmp_path / "p"),
        ("convert", tmp_path / "p", "--to", "lorakit", "-o", tmp_path / "o.safetensors"),
    ):
        assert_one_line_error(*cli(*argv), "p", "q_proj", f"{part} is {name}", "LK103")
    assert not os.path.exists(tmp_path / "o.safetensors")


def test_float64_and_fp8_factors_are_written_as_f32_and_said(tmp_path, cli):
    """The spec's dtypes are F32 / F16 / BF16: an F64 adapter converts (and resizes) to F32, rounded once, and
    F8 factors exactly; the note says which; nothing else in the file changes."""
    from safetensors.torch import load_file

    tensors = {k: v.double() for k, v in peft_tensors().items()}
    a_key = next(k for k in tensors if ".lora_A." in k)
    tensors[a_key] = tensors[a_key].to(torch.float8_e4m3fn)
    peft_folder(tmp_path / "p", tensors, {"r": 2, "lora_alpha": 8})
    code, out, err = cli("convert", tmp_path / "p", "--to", "lorakit", "-o", tmp_path / "o.safetensors")
    assert code == 0, err
    assert "1 F64 tensor(s) written as F32" in out and "rounded once" in out
    assert "1 F8_E4M3 tensor(s) written as F32" in out and "exact" in out
    written = load_file(tmp_path / "o.safetensors")
    name = "model.layers.0.self_attn.q_proj"
    b_key = a_key.replace("lora_A", "lora_B")
    assert written[f"{name}.lora_A"].dtype == torch.float32
    assert torch.equal(written[f"{name}.lora_A"], tensors[a_key].float())
    assert torch.equal(written[f"{name}.lora_B"], tensors[b_key].float())
    code, out, err = cli("resize", tmp_path / "p", "--rank", "1", "-o", tmp_path / "r.safetensors", "--json")
    assert code == 0, err
    assert any("written as F32" in n for n in json.loads(out)["notes"])


def test_sharded_index_paths_stay_inside_the_folder(w, cli):
    folder = w / "sharded"
    examples.write_llama_checkpoint(str(folder), shards=2)
    index = json.load(open(folder / "model.safetensors.index.json"))
    name = next(iter(index["weight_map"]))
    for bad, fragment in (
        ("../../../../etc/passwd", "not a file of the model folder"),
        ("/etc/passwd", "not a file of the model folder"),
        (7, "must map tensor names"),
    ):
        index["weight_map"][name] = bad
        json.dump(index, open(folder / "model.safetensors.index.json", "w"))
        assert_one_line_error(
            *cli("merge", folder, w / "a.safetensors", "-o", w / "o"), "index.json", fragment
        )


def test_quantized_layouts_that_do_not_fit_are_one_line_errors(tmp_path, cli):
    t = {"l.weight": torch.ones(8, 16).to(torch.int8), "l.weight_scale": torch.ones(5, dtype=torch.bfloat16)}
    os.makedirs(tmp_path / "q")
    write_safetensors(tmp_path / "q" / "model.safetensors", t)
    json.dump(
        {"quantization_config": {"quant_method": "compressed-tensors"}},
        open(tmp_path / "q" / "config.json", "w"),
    )
    assert_one_line_error(*cli("inspect", tmp_path / "q" / "x", "--base", tmp_path / "q"), "no such")
    ad = Adapter()
    ad.add(Module("l", torch.ones(1, 16), torch.ones(8, 1), alpha=1.0))
    ad.save(tmp_path / "a.safetensors")
    assert_one_line_error(
        *cli("merge", tmp_path / "q", tmp_path / "a.safetensors", "-o", tmp_path / "o"),
        "l.weight_scale",
        "expected one value or 8",
    )


@pytest.mark.parametrize(
    "state, fragment",
    [
        (b"not json", "not valid JSON"),
        (
            json.dumps({"blocksize": 1 << 24, "shape": [8, 16], "dtype": "float32"}).encode(),
            "blocksize 16777216",
        ),
        (
            json.dumps({"blocksize": 64, "shape": [4096, 4096], "dtype": "float32"}).encode(),
            "needs 16777216 codes",
        ),
    ],
)
def test_nf4_states_are_checked_against_the_stored_sizes(tmp_path, cli, state, fragment):
    t = {
        "l.weight": torch.zeros(64, 1, dtype=torch.uint8),
        "l.weight.absmax": torch.ones(2),
        "l.weight.quant_map": torch.linspace(-1, 1, 16),
        "l.weight.quant_state.bitsandbytes__nf4": torch.frombuffer(bytearray(state), dtype=torch.uint8),
    }
    os.makedirs(tmp_path / "q")
    write_safetensors(tmp_path / "q" / "model.safetensors", t)
    json.dump(
        {"quantization_config": {"quant_method": "bitsandbytes"}}, open(tmp_path / "q" / "config.json", "w")
    )
    ad = Adapter()
    ad.add(Module("l", torch.ones(1, 16), torch.ones(8, 1), alpha=1.0))
    ad.save(tmp_path / "a.safetensors")
    assert_one_line_error(
        *cli("merge", tmp_path / "q", tmp_path / "a.safetensors", "-o", tmp_path / "o", "--dtype", "bf16"),
        "quant_state",
        fragment,
    )


def test_read_only_output_folder_is_a_clean_error(w, cli):
    if (
        os.geteuid() == 0
    ):  # root writes anywhere: a full disk is simulated in test_roundtrip_and_errors instead
        ro = "/proc/lorakit-test"
        assert_one_line_error(
            *cli("convert", w / "a.safetensors", "-o", f"{ro}/x.safetensors", "--to", "kohya"),
            "cannot create the output folder",
        )
        return
    os.makedirs(w / "ro")
    os.chmod(w / "ro", 0o555)
    assert_one_line_error(
        *cli("convert", w / "a.safetensors", "-o", w / "ro" / "x.safetensors", "--to", "kohya"),
        "cannot write",
    )


# ---------------------------------------------------------------------------------------------------- resources
def test_a_fifo_is_refused_without_blocking(tmp_path, cli):
    os.mkfifo(tmp_path / "f.safetensors")
    code, out, err = cli("validate", tmp_path / "f.safetensors")
    assert code == 2 and "not a regular file" in out + err
    assert_one_line_error(*cli("inspect", tmp_path / "f.safetensors"), "not")


def test_header_only_inspect_of_a_huge_file_maps_and_reads_no_data(tmp_path):
    """A 16 GiB adapter (sparse: nothing on disk) inspected with little memory: no mapping, no reads of the data."""
    path = tmp_path / "huge.safetensors"
    n = 1 << 30  # 1 Gi fp32 = 4 GiB per factor
    meta = {"lorakit.spec_version": "1.1"}
    header = {"__metadata__": meta}
    pos = 0
    for i in range(2):
        for part, shape in (("lora_A", [1024, n // 1024]), ("lora_B", [n // 1024, 1024])):
            header[f"m{i}.{part}"] = {"dtype": "F32", "shape": shape, "data_offsets": [pos, pos + 4 * n]}
            pos += 4 * n
        header[f"m{i}.alpha"] = {"dtype": "F32", "shape": [], "data_offsets": [pos, pos + 4]}
        pos += 4
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.truncate(8 + len(text) + pos)
        for i in range(2):  # the alphas: 8.0, at their offsets
            f.seek(8 + len(text) + header[f"m{i}.alpha"]["data_offsets"][0])
            f.write(struct.pack("<f", 8.0))
    code = (
        "import sys, lorakit\n"
        f"r = lorakit.inspect({str(path)!r})\n"
        "assert r['module_count'] == 2 and r['params'] == 2 * 2 ** 31, r\n"
        # VmHWM is this process's own peak (ru_maxrss keeps the parent's across fork + exec)
        "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.split()[-1]) < 1024 * 1024  # KiB: under 1 GiB for a 16 GiB file


# ---------------------------------------------------------------- this wave's readers and validate's bounds
def _gguf(path, kvs=(), infos=(), data=b"", counts=None, version=3):
    """A GGUF file from raw parts: kvs [(key, type id, payload bytes)], infos [(name, ne, type id, offset)]."""
    s = lambda text: struct.pack("<Q", len(text)) + text.encode()  # noqa: E731
    n_tensors, n_kv = counts or (len(infos), len(kvs))
    out = b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)
    out += b"".join(s(k) + struct.pack("<I", t) + payload for k, t, payload in kvs)
    for name, ne, type_id, offset in infos:
        out += s(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d) for d in ne)
        out += struct.pack("<IQ", type_id, offset)
    out += b"\0" * (-len(out) % 32)
    path.write_bytes(out + data)
    return path


ARCH = ("general.architecture", 8, struct.pack("<Q", 5) + b"llama")
LORA = (
    "general.type",
    8,
    struct.pack("<Q", 7) + b"adapter",
)  # read as an adapter and as a base: both refuse it


@pytest.mark.parametrize(
    "parts, fragment",
    [
        (
            dict(kvs=[ARCH], infos=[("blk.0.attn_q.weight", [4, 4, 1, 1, 1], 0, 0)], data=b"\0" * 64),
            "5 dimensions",
        ),
        (
            dict(kvs=[ARCH], infos=[("blk.0.attn_q.weight", [4, 4], 99, 0)], data=b"\0" * 64),
            "unknown GGML type 99",
        ),
        (
            dict(kvs=[ARCH], infos=[("blk.0.attn_q.weight", [4, 4], 0, 4096)], data=b"\0" * 64),
            "runs past the end",
        ),
        (dict(kvs=[ARCH], infos=[("blk.0.attn_q.weight", [2**40, 2**40], 0, 0)]), "runs past the end"),
        (dict(kvs=[ARCH], counts=(0, 3_000_000_000)), "GGUF KV"),
        (dict(kvs=[("k", 8, struct.pack("<Q", 10**12) + b"x")]), "runs past the end of the file"),
        (dict(kvs=[ARCH, ARCH]), "'general.architecture' appears twice"),
    ],
    ids=["ndims", "type", "offset", "size-overflow", "kv-count", "long-string", "kv-twice"],
)
def test_hostile_gguf_files_are_one_line_errors(tmp_path, cli, parts, fragment):
    path = _gguf(tmp_path / "x.gguf", **parts)
    before = path.read_bytes()
    for argv in (
        ["merge", path, tmp_path / "a.safetensors", "-o", tmp_path / "out.gguf"],
        ["inspect", path],
        ["validate", path],
    ):
        examples.random_adapter(SHAPES, rank=2).save(tmp_path / "a.safetensors", force=True)
        start = time.perf_counter()
        code, out, err = cli(*argv)
        if argv[0] == "validate":  # a broken GGUF: validate says what it is not, in one coded line
            assert code in (1, 2) and "internal error" not in out + err and "LK" in out, (out, err)
        else:
            assert_one_line_error(code, out, err, fragment, "x.gguf")
        assert time.perf_counter() - start < 2
    assert path.read_bytes() == before and not os.path.exists(tmp_path / "out.gguf")
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors", "x.gguf"]


def test_validate_metadata_nested_or_malformed_is_coded(tmp_path, cli):
    entries = {
        "m.lora_A": {"dtype": "F32", "shape": [1, 2], "data_offsets": [0, 8]},
        "m.lora_B": {"dtype": "F32", "shape": [2, 1], "data_offsets": [8, 16]},
        "m.alpha": {"dtype": "F32", "shape": [], "data_offsets": [16, 20]},
    }
    cases = {
        "deep": {"lorakit.modules": "[" * 100_000 + "]" * 100_000},
        "prov": {"lorakit.provenance": '{"a":' * 50_000 + "1" + "}" * 50_000},
        "entry": {"lorakit.modules": json.dumps({"m": 5})},
    }
    for name, meta in cases.items():
        header = {"__metadata__": {"lorakit.spec_version": "1.0", **meta}, **entries}
        raw_safetensors(
            tmp_path / f"{name}.safetensors", json.dumps(header), b"\0" * 16 + struct.pack("<f", 1.0)
        )
        code, out, err = cli("validate", tmp_path / f"{name}.safetensors", "--json")
        assert code == 1, (name, out, err)
        problems = json.loads(out)["files"][0]["problems"]
        assert [p["code"] for p in problems] == ["LK104"], (name, problems)


def test_validate_reports_every_problem_each_with_its_code(tmp_path, cli):
    raw_safetensors(
        tmp_path / "d.safetensors",
        '{"__metadata__":{"lorakit.spec_version":"1.0"},'
        '"m.lora_A":{"dtype":"F32","shape":[1,2],"data_offsets":[0,8]},'
        '"m.lora_A":{"dtype":"F32","shape":[1,2],"data_offsets":[0,8]},'
        '"m.lora_B":{"dtype":"F32","shape":[2,1],"data_offsets":[8,4000]},'
        '"m.alpha":{"dtype":"F32","shape":[],"data_offsets":[8,12]}}',
        b"\0" * 12,
    )
    code, out, err = cli("validate", tmp_path / "d.safetensors", "--json")
    found = [(p["code"], p["tensor"]) for p in json.loads(out)["files"][0]["problems"]]
    assert code == 1 and ("LK107", "m.lora_A") in found and ("LK102", "m.lora_B") in found, found


def test_validate_of_a_huge_sparse_file_reads_no_data_when_quick(tmp_path, cli):
    n = 2**31  # 8 GiB of F32 per factor, all holes
    header = {
        "__metadata__": {"lorakit.spec_version": "1.0"},
        "m.alpha": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]},
        "m.lora_A": {"dtype": "F32", "shape": [1, n], "data_offsets": [4, 4 + 4 * n]},
        "m.lora_B": {"dtype": "F32", "shape": [n, 1], "data_offsets": [4 + 4 * n, 4 + 8 * n]},
    }
    text = json.dumps(header).encode()
    with open(tmp_path / "big.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.truncate(8 + len(text) + 4 + 8 * n)
    start = time.perf_counter()
    code, out, err = cli("validate", tmp_path / "big.safetensors", "--quick")
    assert code == 0 and "header only" in out and time.perf_counter() - start < 2
    start = time.perf_counter()  # the alpha (0, a hole) is read first: --fail-fast stops there
    code, out, err = cli("validate", tmp_path / "big.safetensors", "--fail-fast")
    assert code == 1 and "LK206" in out and time.perf_counter() - start < 2


def test_convert_of_an_odd_module_name_names_the_file(tmp_path, cli):
    ad = Adapter()
    ad.add(Module("model.layers.0/../q_proj", torch.ones(1, 4), torch.ones(4, 1), alpha=1.0))
    ad.save(tmp_path / "odd.safetensors")
    code, out, err = cli("convert", tmp_path / "odd.safetensors", "-o", tmp_path / "o.gguf", "--to", "gguf")
    assert_one_line_error(code, out, err, "odd.safetensors", "model.layers.0/../q_proj", "o.gguf")
    assert sorted(os.listdir(tmp_path)) == ["odd.safetensors"]


def test_sigkill_leaves_nothing_that_outlives_the_next_run(w):
    """A merge killed mid-write leaves its work folder (for --resume); another OUT written in that folder leaves it
    alone, the next plain run of the same OUT sweeps it and starts again."""
    big = w / "bigbase"
    examples.write_llama_checkpoint(str(big), layers=6, hidden=256, intermediate=512)
    from lorakit.bases import open_base

    ad = examples.random_adapter(open_base(big).shapes(), rank=4)
    ad.save(w / "big.safetensors")
    code = "import lorakit, os, signal\n"
    code += "import lorakit.engine.pipeline as p\nrun = p.run\n"
    code += "def killed(job, writer, tmp, threads, bar):\n    os.kill(os.getpid(), signal.SIGKILL)\n"
    code += (
        f"p.run = killed\nlorakit.merge({str(big)!r}, [{str(w / 'big.safetensors')!r}], {str(w / 'out')!r})\n"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == -signal.SIGKILL
    left = [n for n in os.listdir(w) if ".lorakit-" in n]
    assert left and not os.path.exists(w / "out")  # the killed run's temporary is there
    lorakit.merge(w / "base", [w / "a.safetensors"], w / "other", quiet=True)  # another OUT, same folder
    assert [n for n in os.listdir(w) if ".lorakit-" in n] == [".out.lorakit-work"]
    lorakit.merge(big, [w / "big.safetensors"], w / "out", quiet=True)
    assert not [n for n in os.listdir(w) if ".lorakit-" in n], os.listdir(w)


def test_pipeline_links_out_of_the_folder_are_refused(tmp_path, cli):
    pipe = tmp_path / "pipe"
    os.makedirs(pipe / "text_encoder")
    write_safetensors(pipe / "text_encoder" / "model.safetensors", {"a.weight": torch.ones(2, 2)})
    (pipe / "model_index.json").write_text('{"unet": ["diffusers", "../../elsewhere"]}')
    outside = tmp_path / "elsewhere"
    os.makedirs(outside)
    write_safetensors(outside / "model.safetensors", {"b.weight": torch.ones(2, 2)})
    os.symlink(outside, pipe / "unet")
    ad = Adapter()
    ad.add(Module("text_encoder.a", torch.ones(1, 2), torch.ones(2, 1), alpha=1.0))
    ad.save(tmp_path / "a.safetensors")
    before = snapshot(tmp_path)
    code, out, err = cli("merge", pipe, tmp_path / "a.safetensors", "-o", tmp_path / "out")
    assert_one_line_error(code, out, err, "'unet' is a link out of the pipeline folder")
    assert snapshot(tmp_path) == before


def test_nf4_absmax_nan_never_reaches_the_output(tmp_path, cli):
    from lorakit.examples import quantize

    W = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    stored = {f"l.q.{k}": v for k, v in quantize(W, "nf4", group_size=64).items()}
    absmax = next(k for k in stored if k.endswith("absmax"))
    stored[absmax] = stored[absmax].clone()
    stored[absmax].view(-1)[0] = float("nan")
    os.makedirs(tmp_path / "q")
    write_safetensors(tmp_path / "q" / "model.safetensors", stored)
    with open(tmp_path / "q" / "config.json", "w") as f:
        json.dump({"quantization_config": examples.quantization_config("nf4")}, f)
    ad = Adapter()
    ad.add(Module("l.q", torch.ones(1, 64) * 0.01, torch.ones(8, 1), alpha=1.0))
    ad.save(tmp_path / "a.safetensors")
    for extra in ([], ["--dtype", "bf16"]):
        code, out, err = cli(
            "merge", tmp_path / "q", tmp_path / "a.safetensors", "-o", tmp_path / "out", *extra
        )
        assert_one_line_error(code, out, err, "NaN")
        assert not os.path.exists(tmp_path / "out")


def test_options_a_full_precision_base_does_not_read_are_said(w, cli):
    """--strategy, --onto and --full-precision-base are read by quantized modules only: given for a full-precision
    base the merge is the same, and the report says each was not used (a script may pass them to every base)."""
    plain = lorakit.merge(w / "base", [w / "a.safetensors"], w / "m1", quiet=True)
    code, out, err = cli(
        "merge",
        w / "base",
        w / "a.safetensors",
        "-o",
        w / "m2",
        "--strategy",
        "rescale",
        "--onto",
        "original",
        "--full-precision-base",
        w / "single",
        "--json",
        "-q",
    )
    notes = json.loads(out)["notes"]
    assert code == 0 and not any("was not used" in n for n in plain["notes"]), err
    for name in ("--strategy rescale", "--onto original", "--full-precision-base"):
        assert f"{name} was not used: the base has no quantized module" in notes
    assert (w / "m1" / "model.safetensors").read_bytes() == (w / "m2" / "model.safetensors").read_bytes()


def test_broken_gguf_files_say_what_is_wrong_with_them(w, cli):
    """A file named .gguf that is empty or has another magic is 'not a GGUF file', not a safetensors defect; a
    truncated GGUF adapter names the tensor that runs past the end, not 'a GGUF model'."""
    lorakit.convert(w / "a.safetensors", w / "g.gguf", for_engine="llama.cpp", base=w / "base")
    raw = (w / "g.gguf").read_bytes()
    cases = {
        "empty.gguf": (b"", "not a GGUF file: it starts with b'', not b'GGUF'"),
        "magic.gguf": (b"GGUX" + raw[4:], "not a GGUF file: it starts with b'GGUX', not b'GGUF'"),
        "cut.gguf": (raw[: len(raw) // 2], "is misaligned or runs past the end of the file"),
    }
    for name, (data, message) in cases.items():
        (w / name).write_bytes(data)
        assert_one_line_error(*cli("inspect", w / name), name, message)
        code, out, err = cli("validate", w / name)
        assert code == 1 and message in out and "safetensors" not in out and "GGUF model" not in out, out
    assert "tensor 'blk." in cli("validate", w / "cut.gguf")[1]


def test_extract_refuses_an_adapter_for_either_checkpoint(w, cli):
    """extract compares two model checkpoints: an adapter in either place is said in one line (it read as 'nothing
    to extract', every tensor 'only in the tuned checkpoint')."""
    for argv, role in [(["base", "a.safetensors"], "TUNED"), (["a.safetensors", "base"], "BASE")]:
        code, out, err = cli("extract", *(w / a for a in argv), "-o", w / "x.safetensors", "--rank", "2")
        assert_one_line_error(
            code,
            out,
            err,
            f"{role} is a lorakit adapter, not a model: extract compares two model checkpoints",
        )
        assert not (w / "x.safetensors").exists()


def test_merge_says_a_weight_of_zero_and_an_adapter_given_twice(w):
    """Both are legal (the merge is what was asked) and often a slip: the report says so."""
    zero = lorakit.merge(w / "base", [f"{w / 'a.safetensors'}:0"], w / "m0", quiet=True)
    assert f"{w / 'a.safetensors'} has weight 0: it changes nothing" in zero["notes"]
    assert (w / "m0" / "model.safetensors").read_bytes() == (w / "base" / "model.safetensors").read_bytes()
    twice = lorakit.merge(
        w / "base", [w / "a.safetensors", f"{w / 'a.safetensors'}:0.5"], w / "m2", quiet=True
    )
    assert (
        f"{w / 'a.safetensors'} is given 2 times: its delta is added once for each, with its weight"
        in twice["notes"]
    )
    once = lorakit.merge(w / "base", [w / "a.safetensors"], w / "m1", quiet=True)
    assert not any("weight 0" in n or "times" in n for n in once["notes"])


def test_an_empty_folder_and_a_peft_folder_without_weights_say_so(w, cli):
    (w / "empty").mkdir()
    (w / "cfg").mkdir()
    (w / "cfg" / "adapter_config.json").write_text((w / "peft" / "adapter_config.json").read_text())
    shutil.copytree(w / "peft", w / "run" / "checkpoint-500")  # a Trainer's output_dir
    shutil.copytree(w / "peft", w / "run" / "checkpoint-1000")
    for name, message in [
        ("empty", "is an empty folder: no adapter in it"),
        (
            "run",
            f"holds no adapter itself, but its sub-folder(s) checkpoint-500/, checkpoint-1000/ hold PEFT adapters: pass one, e.g. the last, {w / 'run' / 'checkpoint-1000'}",
        ),
        (
            "cfg",
            "holds adapter_config.json but no adapter_model.safetensors (or .bin): the PEFT adapter's weights",
        ),
    ]:
        assert_one_line_error(*cli("inspect", w / name), name, message)
        code, out, err = cli("validate", w / name)
        assert (
            code == 2 and f"{w / name}: is a directory, expected a .safetensors file; it {message}" in out
        ), out
