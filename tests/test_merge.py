"""merge: fp64 references rounded once, byte-identical untouched tensors, layouts, unmerge, tied embeddings, errors."""

import json
import os
import re
import zlib

import pytest
import torch

import lorakit
from lorakit import examples
from lorakit.core import Adapter, Module
from lorakit.io import Checkpoint
from lorakit.errors import LorakitError
from lorakit.io import TensorFile, write_safetensors

from conftest import assert_one_line_error, listdir_all, shapes_of

g = torch.Generator().manual_seed(11)


def rnd(*s):
    return torch.randn(*s, generator=g)


def base_with_all_kinds(folder, dtype):
    """Linear (+bias), conv, embedding, GPT-2 Conv1D layout, a DoRA target and a replaced head, in `dtype`."""
    os.makedirs(folder, exist_ok=True)
    t = {
        "lin.weight": rnd(24, 16),
        "lin.bias": rnd(24),
        "conv.weight": rnd(6, 4, 3, 3),
        "emb.weight": rnd(50, 8),
        "c_attn.weight": rnd(16, 48),
        "dora.weight": rnd(12, 16),
        "score.weight": rnd(3, 16),
        "norm.weight": rnd(16),
    }
    t = {k: v.to(dtype) for k, v in t.items()}
    write_safetensors(os.path.join(folder, "model.safetensors"), t, {"format": "pt"})
    return t


def adapter_all_kinds(shapes):
    ad = Adapter()
    ad.add(Module("lin", rnd(4, 16), rnd(24, 4) * 0.1, alpha=8.0, bias=rnd(24) * 0.1))
    ad.add(Module("conv", rnd(2, 4, 3, 3), rnd(6, 2, 1, 1) * 0.1, alpha=4.0))
    ad.add(Module("emb", rnd(3, 8), rnd(50, 3) * 0.1, alpha=3.0, kind="embedding"))
    ad.add(Module("c_attn", rnd(2, 48), rnd(16, 2) * 0.1, alpha=2.0, kind="linear_t"))
    ad.add(Module("dora", rnd(2, 16), rnd(12, 2) * 0.1, alpha=2.0, magnitude=rnd(12).abs() + 1, dora_axis=0))
    ad.replacements["score.weight"] = rnd(3, 16)
    return ad


def reference(W, m, weight=1.0):
    """fp64 reference of one module applied to W."""
    W = W.double()
    d = (m.B.double().flatten(1) @ m.A.double().flatten(1)).reshape(m.shape) * (m.alpha / m.rank) * weight
    V = W + d
    if m.magnitude is not None:
        V = V / V.norm(dim=1, keepdim=True) * m.magnitude.double()[:, None]
    return V


def assert_rounded_once(got, ref64, dtype):
    """got equals the fp64 reference rounded once to dtype: bit-equal except rare ties, never more than 1 ulp."""
    want = ref64.to(dtype)
    assert got.dtype == dtype
    if dtype == torch.float32:
        assert torch.allclose(got.double(), ref64, rtol=2e-6, atol=1e-6)
        return
    same = (got.view(torch.int16) == want.view(torch.int16)).float().mean().item()
    ulp_diff = (got.view(torch.int16).int() - want.view(torch.int16).int()).abs().max().item()
    assert same > 0.99 and ulp_diff <= 1, (same, ulp_diff)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_merge_every_kind_matches_fp64(tmp_path, dtype, cli):
    base = base_with_all_kinds(tmp_path / "base", dtype)
    ad = adapter_all_kinds(shapes_of(base))
    ad.save(tmp_path / "a.safetensors")
    code, out, err = cli(
        "merge", tmp_path / "base", tmp_path / "a.safetensors", "-o", tmp_path / "out", "--json", "-q"
    )
    assert code == 0, err
    assert json.loads(out)["merged_count"] == 7
    merged = TensorFile(tmp_path / "out" / "model.safetensors")
    for name, m in ad.modules.items():
        assert_rounded_once(merged.get(f"{name}.weight"), reference(base[f"{name}.weight"], m), dtype)
    assert_rounded_once(
        merged.get("lin.bias"), base["lin.bias"].double() + ad.modules["lin"].bias.double(), dtype
    )
    assert torch.equal(merged.get("score.weight"), ad.replacements["score.weight"].to(dtype))
    src = TensorFile(tmp_path / "base" / "model.safetensors")
    assert merged.raw("norm.weight") == src.raw("norm.weight")  # untouched: byte-identical


def test_weights_and_several_adapters_in_one_pass(tiny_base, tmp_path):
    folder, tensors = tiny_base
    a = examples.random_adapter(
        shapes_of(tensors), targets=("q_proj", "v_proj"), rank=4, seed=1, magnitude=0.1
    )
    b = examples.random_adapter(
        shapes_of(tensors), targets=("q_proj", "up_proj"), rank=2, alpha=5.0, seed=2, magnitude=0.1
    )
    a.save(tmp_path / "a.safetensors")
    b.save(tmp_path / "b.safetensors")
    lorakit.merge(
        folder,
        [f"{tmp_path / 'a.safetensors'}:0.5", f"{tmp_path / 'b.safetensors'}:-2"],
        tmp_path / "out",
        quiet=True,
    )
    out = Checkpoint(tmp_path / "out")
    for name, W in tensors.items():
        ref = W.double()
        mod = name[: -len(".weight")]
        if mod in a.modules:
            ref = ref + 0.5 * a.modules[mod].delta(torch.float64)
        if mod in b.modules:
            ref = ref - 2 * b.modules[mod].delta(torch.float64)
        assert torch.allclose(out.get(name).double(), ref, rtol=1e-6, atol=1e-6), name


def test_sharded_base_reshard_and_files_copied(tmp_path):
    folder = tmp_path / "base"
    tensors = examples.write_llama_checkpoint(str(folder), shards=3)
    (folder / "tokenizer.json").write_text('{"t": 1}')
    ad = examples.random_adapter(shapes_of(tensors), rank=2)
    ad.save(tmp_path / "a.safetensors")
    lorakit.merge(folder, [str(tmp_path / "a.safetensors")], tmp_path / "out", quiet=True)
    assert listdir_all(tmp_path / "out") == listdir_all(folder)
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"t": 1}'
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert (
        index["weight_map"] == json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    )
    base, out = Checkpoint(folder), Checkpoint(tmp_path / "out")
    for name in tensors:
        if name[:-7] not in ad.modules:
            assert out.shards[out.where[name]].raw(name) == base.shards[base.where[name]].raw(name)
    lorakit.merge(folder, [str(tmp_path / "a.safetensors")], tmp_path / "re", shard_size="150KB", quiet=True)
    files = [f for f in listdir_all(tmp_path / "re") if f.endswith(".safetensors")]
    sizes = [sum(e.nbytes for e in TensorFile(tmp_path / "re" / f).header.entries.values()) for f in files]
    total = sum(t.numel() * 4 for t in tensors.values())
    assert len(files) >= -(-total // 150_000) and max(sizes) <= 150_000 and sum(sizes) == total
    re = Checkpoint(tmp_path / "re")
    assert set(re.where) == set(tensors)
    for name in tensors:
        assert torch.equal(re.get(name), out.get(name))
    # single file in, single file out
    lorakit.merge(folder, [str(tmp_path / "a.safetensors")], tmp_path / "m2", quiet=True)
    examples.write_sharded(str(tmp_path), tensors)
    lorakit.merge(
        tmp_path / "model.safetensors",
        [str(tmp_path / "a.safetensors")],
        tmp_path / "one.safetensors",
        quiet=True,
        dtype="bf16",
    )
    one = TensorFile(tmp_path / "one.safetensors")
    assert one.get("model.norm.weight").dtype == torch.bfloat16
    name = "model.layers.0.self_attn.q_proj"
    ref = tensors[name + ".weight"].double() + ad.modules[name].delta(torch.float64)
    assert_rounded_once(one.get(name + ".weight"), ref, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unmerge_inverts_merge(tmp_path, dtype):
    folder = tmp_path / "base"
    tensors = examples.write_llama_checkpoint(str(folder), dtype=dtype)
    ad = examples.random_adapter(shapes_of(tensors), rank=4, magnitude=0.05)
    ad.save(tmp_path / "a.safetensors")
    lorakit.merge(folder, [str(tmp_path / "a.safetensors")], tmp_path / "m", quiet=True)
    code = lorakit.merge(
        tmp_path / "m", [str(tmp_path / "a.safetensors")], tmp_path / "u", unmerge=True, quiet=True
    )
    assert code["unmerge"]
    u = Checkpoint(tmp_path / "u")
    for name, W in tensors.items():
        if dtype == torch.float32:
            assert torch.allclose(u.get(name), W, atol=1e-6)
        else:  # two roundings to bf16: half an ulp of W + dW, then half an ulp of the result
            mod = name[: -len(".weight")]
            merged = W.double() + (ad.modules[mod].delta(torch.float64) if mod in ad.modules else 0)
            bound = 2.0**-8 * (merged.abs() + W.double().abs()) + 1e-30
            assert ((u.get(name).double() - W.double()).abs() <= bound).all(), name


def test_tied_embeddings_are_untied(tmp_path):
    folder = tmp_path / "base"
    tensors = examples.write_llama_checkpoint(str(folder), tie=True)
    assert "lm_head.weight" not in tensors
    ad = Adapter()
    ad.add(Module("model.embed_tokens", rnd(2, 64), rnd(256, 2) * 0.1, alpha=2.0, kind="embedding"))
    ad.save(tmp_path / "a.safetensors")
    r = lorakit.merge(folder, [str(tmp_path / "a.safetensors")], tmp_path / "out", quiet=True)
    assert "tie_word_embeddings set to false" in r["notes"][0]
    out = Checkpoint(tmp_path / "out")
    W = tensors["model.embed_tokens.weight"]
    assert torch.equal(
        out.get("lm_head.weight"), W
    )  # the head keeps the base weight: PEFT's unmerged forward
    assert torch.allclose(
        out.get("model.embed_tokens.weight").double(),
        W.double() + ad.modules["model.embed_tokens"].delta(torch.float64),
        atol=1e-6,
    )
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    # an adapter on the (absent) tied lm_head resolves to the embedding and is written as lm_head.weight
    ad2 = Adapter()
    ad2.add(Module("lm_head", rnd(2, 64), rnd(256, 2) * 0.1, alpha=2.0))
    ad2.save(tmp_path / "h.safetensors")
    lorakit.merge(folder, [str(tmp_path / "h.safetensors")], tmp_path / "out2", quiet=True)
    out2 = Checkpoint(tmp_path / "out2")
    assert torch.equal(out2.get("model.embed_tokens.weight"), W)
    assert torch.allclose(
        out2.get("lm_head.weight").double(),
        W.double() + ad2.modules["lm_head"].delta(torch.float64),
        atol=1e-6,
    )


def test_bad_input_leaves_no_output(tiny_base, tmp_path, cli, monkeypatch):
    folder, tensors = tiny_base
    wrong = Adapter()
    wrong.add(Module("model.layers.0.self_attn.q_proj", rnd(2, 32), rnd(64, 2), alpha=1.0))
    wrong.add(Module("model.layers.9.mlp.up_proj", rnd(2, 64), rnd(128, 2), alpha=1.0))
    wrong.save(tmp_path / "wrong.safetensors")
    c, out, err = cli("merge", folder, tmp_path / "wrong.safetensors", "-o", tmp_path / "out")
    assert_one_line_error(
        c,
        out,
        err,
        "the adapter does not fit the base (2 problems)",
        "q_proj.weight: base [64, 64], adapter [64, 32]",
        "[LK601] 1 of 2 modules",
        "match nothing in the base: model.layers.9.mlp.up_proj (nearest: model.layers.1.mlp.up_proj)",
    )
    other = examples.random_adapter({"x.q_proj.weight": (64, 64)})
    other.modules = {"model.layers.0.self_attn.q_proj": other.modules["x.q_proj"]}
    other.modules["model.layers.0.self_attn.q_proj"].name = "model.layers.0.self_attn.q_proj"
    other.save(tmp_path / "other.safetensors")
    c, out, err = cli("merge", folder, tmp_path / "other.safetensors", "-o", tmp_path / "out")
    assert_one_line_error(c, out, err, "made for another base", "--ignore-fingerprint")
    assert (
        cli(
            "merge",
            folder,
            tmp_path / "other.safetensors",
            "-o",
            tmp_path / "out",
            "--ignore-fingerprint",
            "-q",
        )[0]
        == 0
    )
    good = examples.random_adapter(shapes_of(tensors))
    good.save(tmp_path / "good.safetensors")
    c, out, err = cli("merge", folder, tmp_path / "good.safetensors", "-o", tmp_path / "out")
    assert_one_line_error(c, out, err, "output exists")
    # corrupt shard
    bad = tmp_path / "badbase"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:-100])
    c, out, err = cli("merge", bad, tmp_path / "good.safetensors", "-o", tmp_path / "o2")
    assert_one_line_error(c, out, err, "model.safetensors", "LK102")
    # disk full in the middle of writing
    import lorakit.io.safetensors as lio

    real = lio.ShardWriter.write

    def full(self, name, tensor):
        if self.next > 3:
            raise OSError(28, "No space left on device")
        return real(self, name, tensor)

    monkeypatch.setattr(lio.ShardWriter, "write", full)
    c, out, err = cli("merge", folder, tmp_path / "good.safetensors", "-o", tmp_path / "o3", "-q")
    assert_one_line_error(c, out, err, "o3", "No space left on device")
    assert not any(x.startswith((".o3", "o3", ".o2", "o2")) for x in os.listdir(tmp_path))
    assert (folder / "model.safetensors").read_bytes()[:8]  # base untouched
    assert Checkpoint(folder).get("model.norm.weight").equal(tensors["model.norm.weight"])


def test_dora_refusals(tiny_base, tmp_path):
    folder, tensors = tiny_base
    ad = Adapter()
    ad.add(
        Module(
            "model.layers.0.self_attn.q_proj",
            rnd(2, 64),
            rnd(64, 2),
            alpha=1.0,
            magnitude=torch.ones(64),
            dora_axis=0,
        )
    )
    ad.save(tmp_path / "d.safetensors")
    with pytest.raises(LorakitError, match="DoRA cannot be unmerged"):
        lorakit.merge(folder, [str(tmp_path / "d.safetensors")], tmp_path / "o", unmerge=True)
    with pytest.raises(LorakitError, match="DoRA shares its tensor"):
        lorakit.merge(folder, [str(tmp_path / "d.safetensors")] * 2, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_replacement_with_a_delta_on_top(tiny_base, tmp_path):
    """The spec: a module's weight replacement comes first, its delta applies on top (W' = R + dW)."""
    folder, tensors = tiny_base
    name = "model.layers.0.self_attn.q_proj"
    ad = Adapter()
    ad.add(Module(name, rnd(2, 64), rnd(64, 2), alpha=2.0))
    R = rnd(64, 64)
    ad.replacements[name + ".weight"] = R
    ad.save(tmp_path / "a.safetensors")
    lorakit.merge(folder, [str(tmp_path / "a.safetensors")], tmp_path / "out", quiet=True)
    got = Checkpoint(tmp_path / "out").get(name + ".weight").double()
    assert torch.allclose(got, R.double() + ad.modules[name].delta(torch.float64), atol=1e-6)


@pytest.mark.parametrize("fail_direct_write", [False, True])
def test_direct_file_writes_exact_bytes(tmp_path, monkeypatch, fail_direct_write):
    """O_DIRECT staging: odd sizes across chunk boundaries, a padded tail cut back, and the fallback to plain writes
    where a filesystem accepts O_DIRECT at open but refuses it at write."""
    import errno

    import lorakit.io.safetensors as lio

    monkeypatch.setattr(lio.DirectFile, "CHUNK", 3 * 4096)
    if fail_direct_write:
        real_write = os.pwrite

        def picky(fd, data, offset):
            if f.direct:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_write(fd, data, offset)

        monkeypatch.setattr(lio.os, "pwrite", picky)
    g = torch.Generator().manual_seed(0)
    pieces = [
        torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8).numpy().tobytes()
        for n in (5, 4096, 13000, 1, 30000, 77)
    ]
    f = lio.DirectFile(str(tmp_path / "x.bin"))
    for p in pieces:
        f.write(p)
    src = tmp_path / "src.bin"
    src.write_bytes(b"abc" * 5000)
    with open(src, "rb") as s:
        s.seek(7)
        f.readinto_from(s, 9000)
    f.close()
    assert (tmp_path / "x.bin").read_bytes() == b"".join(pieces) + (b"abc" * 5000)[7:9007]
    # every byte counted once, in file order, although two chunks are written at a time
    assert f.crc32 == zlib.crc32((tmp_path / "x.bin").read_bytes())


def test_direct_file_without_pwrite(tmp_path, monkeypatch):
    """Where os.pwrite does not exist (Windows), a seek and a write under a lock: the same bytes and checksum."""
    import lorakit.io.safetensors as lio

    monkeypatch.setattr(lio.DirectFile, "CHUNK", 3 * 4096)
    monkeypatch.delattr(lio.os, "pwrite")
    data = torch.randint(0, 256, (100_003,), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    f = lio.DirectFile(str(tmp_path / "x.bin"))
    f.write(data.numpy().tobytes())
    f.close()
    assert (tmp_path / "x.bin").read_bytes() == data.numpy().tobytes()
    assert f.crc32 == zlib.crc32(data.numpy().tobytes())


def test_direct_file_write_errors_surface(tmp_path, monkeypatch):
    """A write that fails on an I/O thread (a full disk) is raised to the writer, not lost with the thread."""
    import lorakit.io.safetensors as lio

    monkeypatch.setattr(lio.DirectFile, "CHUNK", 4096)
    calls = []

    def full(fd, data, offset):
        calls.append(offset)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lio.os, "pwrite", full)
    f = lio.DirectFile(str(tmp_path / "x.bin"))
    with pytest.raises(OSError, match="No space left"):
        for _ in range(8):
            f.write(bytes(4096))
        f.close()
    assert calls


def test_report_gives_time_cpu_and_workers_side_by_side(tiny_base, tmp_path, cli):
    """Whether a merge waits on the CPU or the disk: wall and CPU seconds of the writing, and the workers, in the
    report and in its text."""
    folder, tensors = tiny_base
    examples.random_adapter(shapes_of(tensors)).save(tmp_path / "a.safetensors")
    for threads in (1, 2):
        r = lorakit.merge(
            folder, [tmp_path / "a.safetensors"], tmp_path / f"o{threads}", quiet=True, threads=threads
        )
        assert r["workers"] == threads and r["seconds"] > 0 and r["cpu_seconds"] >= 0
    c, out, err = cli(
        "merge", folder, tmp_path / "a.safetensors", "-o", tmp_path / "o3", "-q", "--threads", "2"
    )
    assert c == 0 and re.search(r"written in \d+\.\d\d s, \d+\.\d\d CPU s, 2 worker\(s\)", out), out


def test_device_option(tiny_base, tmp_path, cli):
    """--device cpu is the default's result byte for byte on a machine without a GPU, the report says where the sums
    ran; a device that is malformed or not here is refused in one line, nothing written."""
    import torch

    folder, tensors = tiny_base
    ad = examples.random_adapter(shapes_of(tensors))
    ad.save(tmp_path / "a.safetensors")
    report = lorakit.merge(folder, [tmp_path / "a.safetensors"], tmp_path / "auto", quiet=True)
    assert report["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")
    c, out, err = cli(
        "merge", folder, tmp_path / "a.safetensors", "-o", tmp_path / "cpu", "--device", "cpu", "-q"
    )
    assert c == 0, err
    if not torch.cuda.is_available():
        names = listdir_all(tmp_path / "auto")
        assert names == listdir_all(tmp_path / "cpu")
        assert all((tmp_path / "auto" / n).read_bytes() == (tmp_path / "cpu" / n).read_bytes() for n in names)
        c, out, err = cli(
            "merge", folder, tmp_path / "a.safetensors", "-o", tmp_path / "x", "--device", "cuda"
        )
        assert_one_line_error(c, out, err, "--device cuda", "sees no CUDA device here")
    for wrong in ("gpu", "mps", "cuda:x", ""):
        c, out, err = cli(
            "merge", folder, tmp_path / "a.safetensors", "-o", tmp_path / "x", "--device", wrong
        )
        assert_one_line_error(c, out, err, "--device is auto or one of cuda, cpu", f"not '{wrong}'")
    assert not (tmp_path / "x").exists()


def test_any_dtype_the_adapter_does_not_touch_is_copied_byte_for_byte(tmp_path):
    """F8_E5M2, F8_E8M0, packed F4 / F6 and dtype names lorakit has never heard of: an untouched tensor of any of them
    opens and is copied as bytes (FP4 microscaling checkpoints carry F8_E8M0 scales beside U8 codes)."""
    tensors = {"model.layers.0.self_attn.q_proj.weight": torch.randn(8, 16)}
    extra = {
        "x.f8e5m2": ("F8_E5M2", [4, 4], 16),
        "x.f8e8m0": ("F8_E8M0", [8], 8),
        "x.f4": ("F4", [4, 8], 16),
        "x.f6": ("F6_E2M3", [8], 6),
        "x.future": ("F3_E1M1", [5], 7),
    }
    from lorakit.io import build_header, tensor_bytes

    specs = [(n, "F32", tuple(t.shape)) for n, t in tensors.items()] + [
        (n, d, tuple(s), b) for n, (d, s, b) in extra.items()
    ]
    payload = {n: bytes(range(b)) for n, (_, _, b) in extra.items()}
    header = build_header(specs, {"format": "pt"})
    with open(tmp_path / "model.safetensors", "wb") as f:
        f.write(header)
        for n, t in tensors.items():
            f.write(tensor_bytes(t))
        for n in extra:
            f.write(payload[n])
    ad = lorakit.Adapter()
    ad.add(
        lorakit.Module("model.layers.0.self_attn.q_proj", torch.randn(2, 16), torch.randn(8, 2), alpha=2.0)
    )
    ad.save(tmp_path / "a.safetensors")
    lorakit.merge(
        tmp_path / "model.safetensors",
        [tmp_path / "a.safetensors"],
        tmp_path / "o.safetensors",
        quiet=True,
        dtype="bf16",
    )
    from lorakit.io import Checkpoint

    out = Checkpoint(tmp_path / "o.safetensors")
    for n, (d, s, b) in extra.items():
        assert (out.entry(n).dtype, list(out.entry(n).shape)) == (d, s)
        assert out.shards[out.where[n]].raw(n) == payload[n]
    assert out.entry("model.layers.0.self_attn.q_proj.weight").dtype == "BF16"


def test_retained_heap_sets_and_restores_glibc_and_only_when_asked(monkeypatch):
    """The heap settings of a requantizing merge: set on entry, glibc's defaults back and the heap trimmed on exit,
    even when the merge fails; nothing touched when disabled or without glibc."""
    from lorakit.io import heap

    real = heap.glibc()
    if real is not None:  # the real glibc accepts every value (mallopt returns 0 for one out of its range)
        assert [
            real.mallopt(p, v) for p, v in list(heap.RETAINING.items()) + list(heap.DEFAULTS.items())
        ] == [1] * 6

    class Libc:
        def __init__(self):
            self.calls = []

        def mallopt(self, param, value):
            self.calls.append((param, value))
            return 1

        def malloc_trim(self, pad):
            self.calls.append(("trim", pad))
            return 1

    libc = Libc()
    monkeypatch.setattr(heap, "glibc", lambda: libc)
    with pytest.raises(RuntimeError, match="boom"):
        with heap.retained_heap():
            assert libc.calls == list(heap.RETAINING.items())
            raise RuntimeError("boom")
    assert libc.calls == list(heap.RETAINING.items()) + list(heap.DEFAULTS.items()) + [("trim", 0)]
    libc.calls.clear()
    with heap.retained_heap(False):
        pass
    assert libc.calls == []
    monkeypatch.setattr(heap, "glibc", lambda: None)
    with heap.retained_heap():
        pass
