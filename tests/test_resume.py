"""Merges that survive a crash and split across machines: a merge killed (SIGKILL) at random points resumes to the
bytes of an uninterrupted one; a corrupt journal, or inputs / options changed since it was written, are refused;
--part i/N for N = 1, 2, 3 writes the same bytes; files nothing changes are copied whole by the kernel."""

import json
import multiprocessing
import os
import random
import signal

import pytest

import lorakit
from lorakit import examples
from lorakit.bases import open_base
from lorakit.errors import LorakitError
from lorakit.io import staging

from conftest import assert_one_line_error


SIZE = dict(layers=4, hidden=64, intermediate=128)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    w = tmp_path_factory.mktemp("resume")
    examples.write_llama_checkpoint(str(w / "base"), shards=4, **SIZE)
    shapes = open_base(w / "base").shapes()
    examples.random_adapter(shapes, rank=4).save(w / "all.safetensors")
    qv = examples.random_adapter(shapes, rank=4, targets=["q_proj", "v_proj"])
    qv.modules = {k: m for k, m in qv.modules.items() if ".layers.0." in k}  # in the first file only
    qv.save(w / "qv.safetensors")
    lorakit.merge(w / "base", [w / "all.safetensors"], w / "reference", quiet=True)
    return w


def contents(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


EVENTS = ("write", "copy", "done", "append", "torn")


def killed_at(k, work, out):
    """Run a merge that SIGKILLs itself at its k-th write event (a tensor written or copied, a file renamed into
    the work folder, a journal line appended, or half of one) in a child process; returns once it is dead. The child
    is forked from a fresh forkserver (torch and lorakit preloaded, no math run yet), not from this process: a child
    forked from a process whose threads ran MKL inherits MKL's allocator mid-use and can spin in it forever (seen
    twice in CI: both merge workers in mm_account_ptr_by_tid)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "lorakit"])
    child = context.Process(target=_merge_killed_at, args=(k, work, out))
    child.start()
    child.join()
    return child.exitcode == -signal.SIGKILL


def _merge_killed_at(k, work, out):
    count = [0]

    def event():
        count[0] += 1
        if count[0] >= k:
            os.kill(os.getpid(), signal.SIGKILL)

    import lorakit.io.safetensors as st

    write, copy, done, append = (
        st.ShardWriter.write,
        st.ShardWriter.copy,
        staging.Staging.done,
        staging.Staging._append,
    )
    st.ShardWriter.write = lambda self, *a: (event(), write(self, *a))[1]
    st.ShardWriter.copy = lambda self, *a: (event(), copy(self, *a))[1]
    staging.Staging.done = lambda self, name, **kw: (event(), done(self, name, **kw))[1]

    def torn(self, record):
        if count[0] + 1 >= k and k % 2:  # half a line reaches the disk, then the power goes
            self.lock.write(json.dumps(record)[:7])
            self.lock.flush()
        event()
        append(self, record)

    staging.Staging._append = torn
    try:
        lorakit.merge(work / "base", [work / "all.safetensors"], out, quiet=True)
    finally:
        os._exit(0)  # the merge finished before event k: the output is complete


def test_sigkill_at_random_points_resumes_to_the_same_bytes(work):
    reference, rng = contents(work / "reference"), random.Random(0)
    resumed_some = 0
    for trial in range(24):
        out = work / f"out{trial}"
        k = rng.randint(1, 40)
        killed = killed_at(k, work, out)
        assert killed or out.exists()
        if killed:
            assert not out.exists()  # nothing is published before every file is done
            report = lorakit.merge(work / "base", [work / "all.safetensors"], out, quiet=True, resume=True)
            resumed_some += report["files_resumed"] > 0
            assert report["published"]
        assert contents(out) == reference, (trial, k)
        assert not [n for n in os.listdir(work) if n.startswith(f".out{trial}")]
    assert resumed_some >= 5  # the trials did kill after some files were done, and kept them


def parted(work, out, n):
    """The merge written as n parts, one after another (any order works); every part's report."""
    return [
        lorakit.merge(work / "base", [work / "all.safetensors"], out, quiet=True, part=f"{i}/{n}")
        for i in range(1, n + 1)
    ]


@pytest.mark.parametrize("n", [1, 2, 3])
def test_parts_write_the_same_bytes(work, n):
    out = work / f"parts{n}"
    reports = parted(work, out, n)
    assert [r["published"] for r in reports] == [False] * (n - 1) + [True]
    assert sum(r["files_written"] for r in reports) == 4
    assert contents(out) == contents(work / "reference")


def test_a_part_with_no_files_after_publication_succeeds(work, cli, tmp_path):
    """More parts than files (4 shards, 6 parts): two parts have nothing to write. Run after the others published
    the output (a late array task), they succeed without touching it; a part with files run again after
    publication is still refused (nothing says the output is this merge's)."""
    out = tmp_path / "o"
    busy = [i for i in range(1, 7) if lorakit.merge(work / "base", [work / "all.safetensors"], tmp_path / "probe",
                                                    quiet=True, part=f"{i}/6")["files_written"]]  # fmt: skip
    assert len(busy) == 4
    reports = [
        lorakit.merge(work / "base", [work / "all.safetensors"], out, quiet=True, part=f"{i}/6") for i in busy
    ]
    assert reports[-1]["published"] and contents(out) == contents(work / "reference")
    for i in sorted(set(range(1, 7)) - set(busy)):
        code, text, err = cli("merge", work / "base", work / "all.safetensors", "-o", out, "--part", f"{i}/6")
        assert code == 0, err
        assert f"part {i}/6: none of the output's files falls to this part" in text
    assert contents(out) == contents(work / "reference")
    assert "o" in os.listdir(tmp_path) and not any(".lorakit-work" in n for n in os.listdir(tmp_path))
    code, text, err = cli(
        "merge", work / "base", work / "all.safetensors", "-o", out, "--part", f"{busy[0]}/6"
    )
    assert_one_line_error(code, text, err, "output exists")


def test_a_changed_input_or_option_or_a_corrupt_journal_is_refused(work, cli, tmp_path):
    out = tmp_path / "out"
    report = lorakit.merge(work / "base", [work / "all.safetensors"], out, quiet=True, part="1/2")
    assert not report["published"] and not out.exists()
    code, o, err = cli(
        "merge", work / "base", work / "all.safetensors", "-o", out, "--resume", "--dtype", "bf16"
    )
    assert_one_line_error(
        code, o, err, "journal of an earlier run is for other inputs or options (options changed)"
    )
    adapter = tmp_path / "a.safetensors"
    adapter.write_bytes((work / "all.safetensors").read_bytes())
    lorakit.merge(work / "base", [adapter], tmp_path / "o2", quiet=True, part="1/2")
    os.utime(adapter, ns=(0, 0))  # the adapter file is not the one the journal saw
    code, o, err = cli("merge", work / "base", adapter, "-o", tmp_path / "o2", "--resume")
    assert_one_line_error(code, o, err, "(inputs changed)", "without --resume to start again")
    journal = staging.work_folder(out) + "/journal-1-of-2.jsonl"
    lines = open(journal).read().splitlines()
    with open(journal, "w") as f:
        f.write("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    code, o, err = cli("merge", work / "base", work / "all.safetensors", "-o", out, "--resume")
    assert_one_line_error(code, o, err, "the journal of an earlier run does not parse (corrupt)")
    with open(journal, "w") as f:  # valid JSON, not a file's record
        f.write("\n".join([lines[0], '{"file": 3}', *lines[1:]]) + "\n")
    code, o, err = cli("merge", work / "base", work / "all.safetensors", "-o", out, "--resume")
    assert_one_line_error(code, o, err, "the journal of an earlier run does not parse (corrupt)")
    # without --resume: the stale work folder is swept and the merge starts again
    code, o, err = cli("merge", work / "base", work / "all.safetensors", "-o", out, "-q")
    assert code == 0, err
    assert contents(out) == contents(work / "reference")


def test_a_journal_of_another_device_kind_is_refused(work, cli, tmp_path):
    """A GPU's fp32 sums may round a last bit differently: a part or a resumed run joins only a journal written on
    the same kind of device (here one said to be written on a GPU), named in the refusal."""
    out = tmp_path / "out"
    lorakit.merge(work / "base", [work / "all.safetensors"], out, quiet=True, part="1/2")
    journal = staging.work_folder(out) + "/journal-1-of-2.jsonl"
    lines = open(journal).read().splitlines()
    first = json.loads(lines[0])
    assert first["device"] == "cpu"
    with open(journal, "w") as f:
        f.write("\n".join([json.dumps({**first, "device": "cuda"}), *lines[1:]]) + "\n")
    code, o, err = cli(
        "merge", work / "base", work / "all.safetensors", "-o", out, "--resume", "--device", "cpu"
    )
    assert_one_line_error(code, o, err, "for other inputs or options (device changed)")


def test_a_file_with_wrong_bytes_is_written_again(work, tmp_path):
    out = tmp_path / "out"
    lorakit.merge(work / "base", [work / "all.safetensors"], out, quiet=True, part="1/2")
    done = [n for n in os.listdir(staging.work_folder(out)) if n.endswith(".safetensors")]
    assert done
    path = os.path.join(staging.work_folder(out), done[0])
    data = bytearray(open(path, "rb").read())
    data[-1] ^= 1
    open(path, "wb").write(bytes(data))
    report = lorakit.merge(work / "base", [work / "all.safetensors"], out, quiet=True, resume=True)
    assert report["files_resumed"] == len(done) - 1
    assert contents(out) == contents(work / "reference")


def test_untouched_files_are_copied_whole(work, tmp_path, monkeypatch):
    """A q,v adapter on layer 0 leaves three of the four files untouched: each is copied whole."""
    import lorakit.engine.pipeline as pipeline
    from lorakit.io import Checkpoint

    copied = []
    real = pipeline.copy_file
    monkeypatch.setattr(pipeline, "copy_file", lambda src, dst: (copied.append(src), real(src, dst)))
    lorakit.merge(work / "base", [work / "qv.safetensors"], tmp_path / "out", quiet=True)
    ckpt, touched = (
        Checkpoint(work / "base"),
        {f"{m}.weight" for m in lorakit.load(work / "qv.safetensors").modules},
    )
    untouched = [f for f in ckpt.files if not touched & set(ckpt.shards[f].header.entries)]
    assert len(untouched) == 3 and sorted(copied) == sorted(untouched)
    for f in untouched:
        assert (tmp_path / "out" / os.path.basename(f)).read_bytes() == open(f, "rb").read()


def test_part_and_max_memory_refusals(work, cli, tmp_path):
    for part, why in (("3/2", "i must be between 1 and N"), ("x", "is i/N"), ("0/2", "between 1 and N")):
        code, o, err = cli(
            "merge", work / "base", work / "all.safetensors", "-o", tmp_path / "o", "--part", part
        )
        assert_one_line_error(code, o, err, why)
    code, o, err = cli(
        "merge", work / "base", work / "all.safetensors", "-o", tmp_path / "o", "--max-memory", "2MB"
    )
    assert_one_line_error(code, o, err, "--max-memory 2MB holds no worker")
    assert not os.path.exists(tmp_path / "o") and not os.path.exists(staging.work_folder(tmp_path / "o"))
    with pytest.raises(LorakitError, match="max memory"):
        lorakit.merge(work / "base", [work / "all.safetensors"], tmp_path / "o", max_memory="lots")
