"""combine / resize / diff / extract against fp64 references and closed forms."""

import json
import os

import pytest
import torch

import lorakit
from lorakit.core import Adapter, Module
from lorakit.methods.sparse import _sign_consensus, _sparsify_magnitude
from lorakit.errors import LorakitError
from lorakit.io import write_safetensors
from lorakit.core.linalg import factor_svd, truncated_svd

from conftest import assert_one_line_error, listdir_all

g = torch.Generator().manual_seed(7)


def rnd(*s):
    return torch.randn(*s, generator=g)


def dense(m):
    return (m.B.double().flatten(1) @ m.A.double().flatten(1)).reshape(m.shape) * (float(m.alpha) / m.rank)


def make(path, modules, **kw):
    ad = Adapter(**kw)
    for m in modules:
        ad.add(m)
    ad.save(path)
    return ad


@pytest.fixture
def two_adapters(tmp_path):
    """Different ranks, alphas, targets and a conv module; 'only_a' is missing from the second adapter."""
    a = make(
        tmp_path / "a.safetensors",
        [
            Module("l.q", rnd(4, 24), rnd(16, 4), alpha=8.0),
            Module("l.conv", rnd(3, 5, 3, 3), rnd(6, 3, 1, 1), alpha=3.0),
            Module("only_a", rnd(2, 10), rnd(10, 2), alpha=1.0),
        ],
    )
    b = make(
        tmp_path / "b.safetensors",
        [
            Module("l.q", rnd(6, 24), rnd(16, 6), alpha=2.5),
            Module("l.conv", rnd(2, 5, 3, 3), rnd(6, 2, 1, 1), alpha=7.0),
        ],
    )
    return tmp_path, a, b


def test_svd_of_factors_is_exact():
    B, A = rnd(300, 12).double(), rnd(12, 200).double()
    svd = factor_svd(B, A)
    U, S, Vh = torch.linalg.svd(B @ A, full_matrices=False)
    assert torch.allclose(svd.S, S[:12], rtol=1e-12)
    assert torch.allclose(svd.U @ torch.diag(svd.S) @ svd.Vh, B @ A, atol=1e-10)


@pytest.mark.parametrize("method", ["cat", "linear"])
def test_linear_is_exact_weighted_sum_with_negative_weights(two_adapters, cli, method):
    d, a, b = two_adapters
    code, out, err = cli(
        "combine",
        d / "a.safetensors:0.7",
        d / "b.safetensors:-1.3",
        "-o",
        d / "c.safetensors",
        "--method",
        method,
        "--json",
        "-q",
    )
    assert code == 0, err
    report = json.loads(out)
    c = lorakit.load(d / "c.safetensors")
    for name in ("l.q", "l.conv"):
        ref = 0.7 * dense(a.modules[name]) - 1.3 * dense(b.modules[name])
        got = c.modules[name].delta().double()
        assert (got - ref).norm() / ref.norm() < 1e-6
        assert c.modules[name].rank == a.modules[name].rank + b.modules[name].rank
    # a module missing from one input counts as zero
    assert torch.allclose(
        c.modules["only_a"].delta().double(), 0.7 * dense(a.modules["only_a"]), rtol=1e-5, atol=1e-6
    )
    assert report["rank"] == 4 + 6 + 3 + 2 + 2
    assert c.provenance["operation"] == "combine"
    assert [p["weight"] for p in c.provenance["parents"]] == [0.7, -1.3]


def test_peft_3004_cross_terms_and_negative_weights(tmp_path):
    """Summing A's and B's separately gives (wB1+wB2)(A1+A2) != w dW1 + w dW2; lorakit's linear is the exact sum."""
    A1, B1, A2, B2 = rnd(4, 16), rnd(16, 4), rnd(4, 16), rnd(16, 4)
    make(tmp_path / "1.safetensors", [Module("m", A1, B1, alpha=4.0)])
    make(tmp_path / "2.safetensors", [Module("m", A2, B2, alpha=4.0)])
    lorakit.combine(
        [str(tmp_path / "1.safetensors:1"), str(tmp_path / "2.safetensors:-1")],
        tmp_path / "c.safetensors",
        method="linear",
        quiet=True,
    )
    got = lorakit.load(tmp_path / "c.safetensors").modules["m"].delta().double()
    exact = B1.double() @ A1.double() - B2.double() @ A2.double()
    naive = (B1.double() - B2.double()) @ (A1.double() + A2.double())  # the cross-term construction
    assert (got - exact).norm() / exact.norm() < 1e-6
    assert (naive - exact).norm() / exact.norm() > 0.5
    # w and -w of the same adapter cancel exactly
    lorakit.combine(
        [str(tmp_path / "1.safetensors:2"), str(tmp_path / "1.safetensors:-2")],
        tmp_path / "z.safetensors",
        quiet=True,
    )
    assert lorakit.load(tmp_path / "z.safetensors").modules["m"].delta().abs().max() < 1e-5


def test_peft_3111_scaling_applied_once(tmp_path):
    """svd combination must apply each adapter's alpha/r exactly once."""
    A, B = rnd(2, 12), rnd(12, 2)
    make(tmp_path / "a.safetensors", [Module("m", A, B, alpha=16.0)])  # scale 8
    lorakit.combine([str(tmp_path / "a.safetensors")], tmp_path / "s.safetensors", method="svd", quiet=True)
    got = lorakit.load(tmp_path / "s.safetensors").modules["m"].delta().double()
    ref = 8.0 * (B.double() @ A.double())
    assert (got - ref).norm() / ref.norm() < 1e-6


@pytest.mark.parametrize("rank", [1, 3, 5])
def test_svd_combine_is_optimal_truncation(two_adapters, rank):
    d, a, b = two_adapters
    lorakit.combine(
        [str(d / "a.safetensors:1.5"), str(d / "b.safetensors:0.25")],
        d / f"s{rank}.safetensors",
        method="svd",
        rank=rank,
        quiet=True,
    )
    c = lorakit.load(d / f"s{rank}.safetensors")
    for name in ("l.q", "l.conv"):
        ref = 1.5 * dense(a.modules[name]) + 0.25 * dense(b.modules[name])
        S = torch.linalg.svdvals(ref.flatten(1))
        optimum = S[rank:].square().sum().sqrt()
        err = (c.modules[name].delta().double() - ref).norm()
        assert abs(err - optimum) / ref.norm() < 1e-6
        assert c.modules[name].rank == rank


def test_svd_default_rank_and_energy(two_adapters):
    d, a, b = two_adapters
    r = lorakit.combine(
        [str(d / "a.safetensors"), str(d / "b.safetensors")], d / "s.safetensors", method="svd", quiet=True
    )
    ranks = {m["module"]: m["rank"] for m in r["modules"]}
    assert ranks["l.q"] == 6  # the largest input rank
    r = lorakit.combine(
        [str(d / "a.safetensors"), str(d / "b.safetensors")],
        d / "e.safetensors",
        method="linear",
        energy=0.9,
        quiet=True,
    )
    c = lorakit.load(d / "e.safetensors")
    ref = dense(a.modules["l.q"]) + dense(b.modules["l.q"])
    S2 = torch.linalg.svdvals(ref).square()
    k = c.modules["l.q"].rank
    assert S2[:k].sum() / S2.sum() >= 0.9 > S2[: k - 1].sum() / S2.sum()


def test_ties_follows_the_paper_on_dense_deltas(tmp_path):
    A1, B1, A2, B2 = rnd(3, 8), rnd(6, 3), rnd(3, 8), rnd(6, 3)
    make(tmp_path / "1.safetensors", [Module("m", A1, B1, alpha=3.0)])
    make(tmp_path / "2.safetensors", [Module("m", A2, B2, alpha=3.0)])
    lorakit.combine(
        [str(tmp_path / "1.safetensors"), str(tmp_path / "2.safetensors:0.5")],
        tmp_path / "t.safetensors",
        method="ties",
        density=0.3,
        rank=6,
        quiet=True,
    )
    got = lorakit.load(tmp_path / "t.safetensors").modules["m"].delta().double()
    # independent reference: trim to top-30% magnitude, elect sign of the weighted sum, disjoint weighted mean
    d = [(B1 @ A1).double(), (B2 @ A2).double()]
    w = [1.0, 0.5]
    trimmed = []
    for x in d:
        k = round(0.3 * x.numel())
        thr = x.abs().flatten().sort(descending=True).values[k - 1]
        trimmed.append(torch.where(x.abs() >= thr, x, torch.zeros_like(x)))
    weighted = [wi * t for wi, t in zip(w, trimmed)]
    sign = torch.sign(weighted[0] + weighted[1])
    num = sum(torch.where(torch.sign(t) == sign, t, torch.zeros_like(t)) for t in weighted)
    den = sum(
        torch.where(torch.sign(t) == sign, torch.full_like(t, wi), torch.zeros_like(t))
        for wi, t in zip(w, weighted)
    )
    ref = num / torch.where(den == 0, torch.ones_like(den), den)
    assert torch.allclose(got, ref, atol=1e-5)  # rank 6 = full rank of a 6 x 8 matrix: exact


def test_dare_is_seeded_and_unbiased(tmp_path):
    make(tmp_path / "1.safetensors", [Module("m", rnd(4, 64), rnd(64, 4), alpha=4.0)])
    src = [str(tmp_path / "1.safetensors")]
    lorakit.combine(
        src, tmp_path / "d1.safetensors", method="dare_linear", density=0.5, seed=3, rank=64, quiet=True
    )
    lorakit.combine(
        src, tmp_path / "d2.safetensors", method="dare_linear", density=0.5, seed=3, rank=64, quiet=True
    )
    lorakit.combine(
        src, tmp_path / "d3.safetensors", method="dare_linear", density=0.5, seed=4, rank=64, quiet=True
    )
    d1, d2, d3 = (lorakit.load(tmp_path / f"d{i}.safetensors").modules["m"].delta() for i in (1, 2, 3))
    assert torch.equal(d1, d2) and not torch.allclose(d1, d3)
    ref = lorakit.load(src[0]).modules["m"].delta()
    kept = d1.abs() > 1e-4 * d1.abs().max()
    assert abs(kept.float().mean().item() - 0.5) < 0.05
    assert torch.allclose(d1[kept], 2 * ref[kept], rtol=1e-3, atol=1e-4)


def test_sparsify_and_consensus_units():
    x = torch.tensor([[1.0, -5.0, 3.0, 0.5]])
    assert torch.equal(_sparsify_magnitude(x, 0.5), torch.tensor([[0.0, -5.0, 3.0, 0.0]]))
    merged = _sign_consensus([torch.tensor([2.0, -1.0]), torch.tensor([-1.0, -3.0])], [1.0, 1.0])
    assert torch.equal(merged, torch.tensor([2.0, -2.0]))


def test_combine_refuses_dora_and_bad_options(tmp_path, cli):
    make(
        tmp_path / "d.safetensors",
        [Module("m", rnd(2, 4), rnd(4, 2), alpha=2.0, magnitude=torch.ones(4), dora_axis=0)],
    )
    c, out, err = cli(
        "combine", tmp_path / "d.safetensors", tmp_path / "d.safetensors", "-o", tmp_path / "o.st"
    )
    assert_one_line_error(c, out, err, "DoRA", "'m'")
    c, out, err = cli(
        "combine", tmp_path / "d.safetensors", "-o", tmp_path / "o.st", "--method", "cat", "--rank", "2"
    )
    assert_one_line_error(c, out, err, "cat is exact")
    assert "o.st" not in listdir_all(tmp_path)
    # an option the method does not read is said (its default could not be told from a value the user gave)
    d = tmp_path / "p.safetensors"
    make(d, [Module("m", rnd(2, 4), rnd(4, 2), alpha=2.0)])
    plain = lorakit.combine([str(d), str(d)], tmp_path / "plain.st", method="linear", quiet=True)
    for method, option, value, readers in [
        ("linear", "--density", "0.3", "ties, dare_linear, dare_ties, magnitude_prune"),
        ("svd", "--density", "1", "ties, dare_linear, dare_ties, magnitude_prune"),
        ("ties", "--seed", "3", "dare_linear, dare_ties"),
        ("cat", "--seed", "0", "dare_linear, dare_ties"),
    ]:
        out = tmp_path / f"{method}.st"
        c, text, err = cli("combine", d, d, "-o", out, "--method", method, option, value, "--json", "-q")
        note = f"{option} was not used: {method} does not read it ({readers} do)"
        assert c == 0 and note in json.loads(text)["notes"], err
        assert not any("was not used" in n for n in plain["notes"])
    assert (tmp_path / "linear.st").read_bytes() != b"" and torch.equal(
        lorakit.load(tmp_path / "linear.st").modules["m"].delta(),
        lorakit.load(tmp_path / "plain.st").modules["m"].delta(),
    )
    c, out, err = cli(
        "combine", d, d, "-o", tmp_path / "o.st", "--method", "dare_ties", "--seed", "3", "--json"
    )
    params = lorakit.load(tmp_path / "o.st").provenance["params"]
    assert c == 0 and params["seed"] == 3 and params["density"] == 0.5, err
    assert (
        lorakit.load(tmp_path / "linear.st").provenance["params"]["density"] is None
    )  # linear reads neither


@pytest.mark.parametrize("dtype", [torch.float32])
def test_resize_error_is_eckart_young_optimum(two_adapters, dtype, cli):
    d, a, _ = two_adapters
    code, out, err = cli(
        "resize", d / "a.safetensors", "-o", d / "r.safetensors", "--rank", "2", "--json", "-q"
    )
    assert code == 0, err
    report = json.loads(out)
    r = lorakit.load(d / "r.safetensors")
    for row in report["modules"]:
        m, n = a.modules[row["module"]], r.modules[row["module"]]
        ref = dense(m).flatten(1)
        S = torch.linalg.svdvals(ref)
        k = min(2, m.rank)
        optimum = S[k:].square().sum().sqrt() / ref.norm()
        err_ = (n.delta().double().flatten(1) - ref).norm() / ref.norm()
        assert abs(err_ - optimum) < 1e-6 and abs(row["relative_error"] - optimum) < 1e-6
        assert abs(row["energy_kept"] - (S[:k].square().sum() / S.square().sum())) < 1e-9
        assert n.rank == k and row["rank_in"] == m.rank and row["rank"] == k
        assert abs(n.scale - m.scale) <= 1e-6 * m.scale  # alpha rescaled: the scale is kept
        assert n.shape == m.shape and n.kind == m.kind


def test_resize_dynamic_rules_match_sd_scripts(tmp_path):
    S = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5])
    U = torch.linalg.qr(rnd(20, 5)).Q
    V = torch.linalg.qr(rnd(30, 5)).Q
    make(tmp_path / "a.safetensors", [Module("m", V.T.contiguous(), U * S, alpha=5.0)])  # scale 1
    minimal = {"sv_ratio": (3.0, 2), "sv_cumulative": (0.9, 3), "sv_fro": (0.99, 3), "energy": (0.99, 4)}
    # sv_ratio 3: S > 8/3 -> {8, 4}; cumulative: cumsum/sum = .52,.77,.90 -> 3; fro: sqrt(cum S^2 / sum)
    # = .87,.97,.992 -> 3; energy: cum S^2 / sum = .751,.938,.985,.997 -> 4. sd-scripts' resize_lora keeps one more
    # for the sv_* rules (rank_resize: index + 1); --minimal keeps the smallest rank meeting the rule.
    for opt, (x, k) in minimal.items():
        r = lorakit.resize(
            tmp_path / "a.safetensors", tmp_path / f"{opt}.safetensors", **{opt: x}, quiet=True
        )
        assert r["modules"][0]["rank"] == (k if opt == "energy" else k + 1), opt
        if opt != "energy":
            r = lorakit.resize(
                tmp_path / "a.safetensors",
                tmp_path / f"{opt}m.safetensors",
                **{opt: x},
                quiet=True,
                minimal=True,
            )
            assert r["modules"][0]["rank"] == k, opt
    r = lorakit.resize(tmp_path / "a.safetensors", tmp_path / "all.safetensors", sv_ratio=100.0, quiet=True)
    assert r["modules"][0]["rank"] == 5  # all five kept: the +1 adds no zero direction
    with pytest.raises(LorakitError, match="--minimal applies to"):
        lorakit.resize(tmp_path / "a.safetensors", tmp_path / "x.safetensors", rank=2, minimal=True)
    r = lorakit.resize(tmp_path / "a.safetensors", tmp_path / "big.safetensors", rank=50, quiet=True)
    assert r["modules"][0]["rank"] == 5  # never above the module's rank (sd-scripts #325)
    r = lorakit.resize(
        tmp_path / "a.safetensors", tmp_path / "mx.safetensors", energy=0.999, max_rank=2, quiet=True
    )
    assert r["modules"][0]["rank"] == 2
    with pytest.raises(LorakitError, match="give one of"):
        lorakit.resize(tmp_path / "a.safetensors", tmp_path / "x.safetensors", rank=2, energy=0.5)


def test_diff_identical_and_reparametrized_is_zero(tmp_path, cli):
    A, B = rnd(4, 20), rnd(12, 4)
    make(
        tmp_path / "a.safetensors",
        [Module("m", A, B, alpha=8.0), Module("c", rnd(2, 3, 3, 3), rnd(5, 2, 1, 1), 2.0)],
    )
    a = lorakit.load(tmp_path / "a.safetensors")
    # the same deltas: B scaled by 4 with alpha / 4; rank padded with zero components and permuted
    perm = torch.tensor([2, 0, 3, 1])
    A6 = torch.cat([A[perm], torch.zeros(2, 20)])
    B6 = torch.cat([B[:, perm] * 4, rnd(12, 2)], 1)
    make(tmp_path / "b.safetensors", [Module("m", A6, B6, alpha=3.0), a.modules["c"]])  # 3/6 = (8/4)/4
    for other in ("a", "b"):
        code, out, _ = cli(
            "diff", tmp_path / "a.safetensors", tmp_path / f"{other}.safetensors", "--json", "-q"
        )
        r = json.loads(out)
        assert code == 0 and r["summary"]["identical_deltas"]
        for row in r["modules"]:
            assert row["relative_diff"] < 1e-12 and abs(row["cosine"] - 1) < 1e-12
            assert abs(row["column_overlap"] - 1) < 1e-9 and abs(row["row_overlap"] - 1) < 1e-9
    code, out, _ = cli("diff", tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert out.splitlines()[0].startswith("2 modules in both, 0 only in A, 0 only in B")


def test_diff_measures_against_fp64(tmp_path):
    a = make(
        tmp_path / "a.safetensors",
        [Module("m", rnd(3, 10), rnd(8, 3), 3.0), Module("x", rnd(1, 4), rnd(4, 1), 1)],
    )
    b = make(tmp_path / "b.safetensors", [Module("m", rnd(2, 10), rnd(8, 2), 5.0)])
    r = lorakit.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors", quiet=True)
    row = next(x for x in r["modules"] if x["module"] == "m")
    da, db = dense(a.modules["m"]), dense(b.modules["m"])
    assert abs(row["relative_diff"] - ((da - db).norm() / da.norm()).item()) < 1e-10
    assert abs(row["cosine"] - ((da * db).sum() / da.norm() / db.norm()).item()) < 1e-10
    Ua = torch.linalg.svd(da)[0][:, :3]
    Ub = torch.linalg.svd(db)[0][:, :2]
    cos = torch.linalg.svdvals(Ua.T @ Ub)
    assert abs(row["column_overlap"] - (cos.square().sum() / 2).item()) < 1e-9
    assert r["summary"]["only_a"] == 1 and {x["module"]: x["present"] for x in r["modules"]}["x"] == "a"


def test_extract_recovers_planted_low_rank_difference(tiny_base, tmp_path, cli):
    folder, tensors = tiny_base
    tuned = {k: v.clone() for k, v in tensors.items()}
    planted = {}
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        W = tuned[name].double()
        D = rnd(W.shape[0], 3).double() @ rnd(3, W.shape[1]).double() * 0.01
        tuned[name] = (W + D).float()
        planted[name] = tuned[name].double() - tensors[name].double()  # the difference as stored
    tuned["model.norm.weight"] = tuned["model.norm.weight"] + 0.5
    write_safetensors(tmp_path / "tuned.safetensors", tuned)
    code, out, err = cli(
        "extract",
        folder,
        tmp_path / "tuned.safetensors",
        "-o",
        tmp_path / "e.safetensors",
        "--rank",
        "3",
        "--json",
        "-q",
    )
    assert code == 0, err
    report = json.loads(out)
    e = lorakit.load(tmp_path / "e.safetensors")
    assert set(e.modules) == {n[:-7] for n in planted}
    for name, D in planted.items():
        got = e.modules[name[:-7]].delta().double()
        assert (got - D).norm() / D.norm() < 1e-5
    assert torch.equal(e.replacements["model.norm.weight"], tuned["model.norm.weight"])
    assert report["replaced"] == ["model.norm.weight"] and report["unchanged"] == len(tensors) - 3
    assert all(m["energy_kept"] > 1 - 1e-9 for m in report["modules"])
    from lorakit.spec import fingerprint

    assert e.base_fingerprint == fingerprint({k: tuple(v.shape) for k, v in tensors.items()})
    # targets: only q_proj
    r = lorakit.extract(
        folder,
        tmp_path / "tuned.safetensors",
        tmp_path / "q.safetensors",
        rank=3,
        targets="q_proj",
        quiet=True,
    )
    assert [m["module"] for m in r["modules"]] == ["model.layers.0.self_attn.q_proj"]
    assert "model.layers.1.mlp.down_proj.weight" in r["not_targeted"]


def test_randomized_svd_matches_exact_optimum():
    M = rnd(600, 20) @ rnd(20, 500) + 0.01 * rnd(600, 500)
    S = torch.linalg.svdvals(M.double())
    k = 10
    svd = truncated_svd(M, k, generator=torch.Generator().manual_seed(0))
    B, A = svd.factors()
    err = (M.double() - (B @ A).double()).norm()
    optimum = S[k:].square().sum().sqrt()
    assert err / optimum < 1 + 1e-4


def test_extract_errors(tiny_base, tmp_path, cli):
    folder, _ = tiny_base
    c, out, err = cli("extract", folder, folder, "-o", tmp_path / "x.safetensors", "--rank", "2")
    assert_one_line_error(c, out, err, "nothing to extract")
    c, out, err = cli(
        "extract", folder, tmp_path / "missing", "-o", tmp_path / "x.safetensors", "--rank", "2"
    )
    assert_one_line_error(c, out, err, "missing", "no such file")
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (
            lambda t, k: t.update({k: t[k] * float("nan")}),
            "'{k}': NaN or Inf values: tuned - base is not finite",
        ),
        (
            lambda t, k: t.update({k: t[k][:8].contiguous()}),
            "nothing to extract: no targeted tensor differs between the checkpoints (shape changed: {k})",
        ),
        (lambda t, k: t.update({k: t[k].to(torch.int32)}), "(not floating-point: {k})"),
        (lambda t, k: t.pop(k), "(only in the base: {k})"),
    ],
    ids=["nan", "shape", "int", "missing"],
)
def test_extract_says_what_became_of_the_tensors_that_differ(tiny_base, tmp_path, cli, edit, fragment):
    """A tuned checkpoint whose one changed tensor cannot give a module: the error says which and why (it said
    only 'nothing differs'); NaN in a tensor is named instead of failing in the SVD."""
    from safetensors.torch import load_file, save_file

    folder, _ = tiny_base
    tuned = tmp_path / "tuned"
    tuned.mkdir()
    name = next(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    tensors = load_file(folder / name)
    for f in os.listdir(folder):
        if not f.endswith(".safetensors"):
            (tuned / f).write_bytes((folder / f).read_bytes())
    key = "model.layers.0.self_attn.q_proj.weight"
    edit(tensors, key)
    save_file(tensors, tuned / name)
    c, out, err = cli("extract", folder, tuned, "-o", tmp_path / "x.safetensors", "--rank", "2")
    assert_one_line_error(c, out, err, "tuned", fragment.format(k=key))
    assert not (tmp_path / "x.safetensors").exists()


def test_combine_says_a_weight_of_zero_and_an_adapter_given_twice(tmp_path):
    make(tmp_path / "a.safetensors", [Module("m", rnd(2, 4), rnd(4, 2), alpha=2.0)])
    a = str(tmp_path / "a.safetensors")
    r = lorakit.combine([a, f"{a}:0"], tmp_path / "c.safetensors", quiet=True)
    assert f"{a} has weight 0: it changes nothing" in r["notes"]
    assert f"{a} is given 2 times: its delta is added once for each, with its weight" in r["notes"]
    alone = lorakit.combine([a], tmp_path / "d.safetensors", quiet=True)
    assert not any("weight 0" in n or "times" in n for n in alone["notes"])


def test_reports_are_short_by_default_and_whole_with_verbose(tmp_path, cli):
    """12 modules: resize / combine / diff list the 8 worst (largest loss first) under a line saying so; -v lists
    every one in natural order (layers.2 before layers.10); a resize that changes no rank says so."""
    torch.manual_seed(0)
    names = [f"model.layers.{i}.mlp.up_proj" for i in range(12)]
    # module i: singular values 1 and (i + 1) / 12, so truncating to rank 1 keeps less energy the larger i is
    modules = []
    for i, name in enumerate(names):
        U, _ = torch.linalg.qr(torch.randn(16, 2, dtype=torch.float64))
        V, _ = torch.linalg.qr(torch.randn(10, 2, dtype=torch.float64))
        B = (U * torch.tensor([1.0, (i + 1) / 12], dtype=torch.float64)).float()
        modules.append(Module(name, V.T.float().contiguous(), B.contiguous(), alpha=2.0))
    make(tmp_path / "a.safetensors", modules)
    code, out, _ = cli(
        "resize", tmp_path / "a.safetensors", "-o", tmp_path / "r.safetensors", "--rank", "1", "-q"
    )
    lines = out.splitlines()
    assert code == 0 and "12 modules, rank 2 -> 1" in lines[0]
    assert lines[1] == "  the 8 that keep the least energy of 12 modules (-v: every one):"
    listed = [line.split()[0] for line in lines[3:]]
    assert listed == [f"model.layers.{i}.mlp.up_proj" for i in range(11, 3, -1)]
    code, out, _ = cli(
        "resize", tmp_path / "a.safetensors", "-o", tmp_path / "v.safetensors", "--rank", "1", "-q", "-v"
    )
    assert [line.split()[0] for line in out.splitlines()[2:]] == names
    code, out, _ = cli("resize", tmp_path / "a.safetensors", "-o", tmp_path / "s.safetensors", "--rank", "5")
    assert out.splitlines()[-1].startswith("note: no module's rank changed")
    code, out, _ = cli(
        "combine",
        tmp_path / "a.safetensors",
        tmp_path / "v.safetensors",
        "-o",
        tmp_path / "c.safetensors",
        "--rank",
        "1",
        "-q",
    )
    assert code == 0 and out.splitlines()[1].startswith("  the 8 that keep the least energy of 12 modules")
    assert len(out.splitlines()) == 2 + 8
    code, out, _ = cli("diff", tmp_path / "a.safetensors", tmp_path / "v.safetensors", "-q")
    lines = out.splitlines()
    assert lines[1] == "  the 8 that differ most of 12 modules (-v: every one):"
    assert [line.split()[0] for line in lines[3:]] == [
        f"model.layers.{i}.mlp.up_proj" for i in range(11, 3, -1)
    ]
    code, out, _ = cli("diff", tmp_path / "a.safetensors", tmp_path / "v.safetensors", "-q", "-v")
    assert [line.split()[0] for line in out.splitlines()[2:]] == names
    # --json: every row, in natural order
    for argv in (
        ["resize", tmp_path / "a.safetensors", "-o", tmp_path / "j.safetensors", "--rank", "1"],
        ["diff", tmp_path / "a.safetensors", tmp_path / "v.safetensors"],
        [
            "combine",
            tmp_path / "a.safetensors",
            tmp_path / "v.safetensors",
            "-o",
            tmp_path / "j2.safetensors",
        ],
    ):
        rows = json.loads(cli(*argv, "-q", "--json")[1])["modules"]
        assert [m["module"] for m in rows] == names
    # inspect --spectrum: the 8 largest ||dW|| (module i's grows with i), -v every one in natural order
    code, out, _ = cli("inspect", tmp_path / "a.safetensors", "--spectrum", "-q")
    lines = out.splitlines()
    start = lines.index("  the 8 largest of 12 modules (-v: every one):")
    assert [line.split()[0] for line in lines[start + 2 :]] == [
        f"model.layers.{i}.mlp.up_proj" for i in range(11, 3, -1)
    ]
    code, out, _ = cli("inspect", tmp_path / "a.safetensors", "--spectrum", "-q", "-v")
    assert [line.split()[0] for line in out.splitlines() if line.startswith("model.layers")] == names


def test_diff_matches_names_spelled_otherwise(tmp_path, cli):
    """A kohya file read without --base keeps sd-scripts' mangled names, and a VLM's adapter may say
    model.language_model. where another says model.: diff compares them under one name, exactly, and says so."""
    A, B = rnd(4, 20), rnd(12, 4)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    make(tmp_path / "a.safetensors", [Module(n, A, B, alpha=8.0) for n in names])
    code, _, _ = cli(
        "convert", tmp_path / "a.safetensors", "-o", tmp_path / "k.safetensors", "--to", "kohya", "-q"
    )
    vlm = [n.replace("model.", "model.language_model.", 1) for n in names]
    make(tmp_path / "v.safetensors", [Module(n, A, B, alpha=8.0) for n in vlm])
    for other, example in (
        ("k", "lora_unet_model_layers_0_self_attn_q_proj as model.layers.0.self_attn.q_proj"),
        ("v", "model.language_model.layers.0.self_attn.q_proj as model.layers.0.self_attn.q_proj"),
    ):
        code, out, _ = cli(
            "diff", tmp_path / "a.safetensors", tmp_path / f"{other}.safetensors", "--json", "-q"
        )
        r = json.loads(out)
        assert code == 0 and r["summary"]["both"] == 2 and r["summary"]["identical_deltas"]
        assert r["notes"] == [
            f"2 of {other}.safetensors's modules compared under the first input's names, spelled otherwise there "
            f"(kohya's mangled names, another prefix): e.g. {example}"
        ]
    # both spellings at once in B: its own name is compared, the other is only in B
    make(tmp_path / "w.safetensors", [Module(n, A, B, alpha=8.0) for n in names + vlm[:1]])
    r = json.loads(cli("diff", tmp_path / "a.safetensors", tmp_path / "w.safetensors", "--json", "-q")[1])
    assert (r["summary"]["both"], r["summary"]["only_b"], r["notes"]) == (2, 1, [])


def test_combine_joins_names_spelled_otherwise(tmp_path, cli):
    """lorakit + the same adapter as kohya (read without --base): one module per target, delta 2 dW exactly, and a
    note; refused before as 'made for different base models'."""
    A, B = rnd(4, 20), rnd(12, 4)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    make(tmp_path / "a.safetensors", [Module(n, A, B, alpha=8.0) for n in names])
    cli("convert", tmp_path / "a.safetensors", "-o", tmp_path / "k.safetensors", "--to", "kohya", "-q")
    for first, second in (("a", "k"), ("k", "a")):
        out = tmp_path / f"{first}{second}.safetensors"
        code, text, err = cli(
            "combine", tmp_path / f"{first}.safetensors", tmp_path / f"{second}.safetensors", "-o", out, "-q"
        )
        assert code == 0, err
        assert "2 of " in text and "spelled otherwise there" in text
        combined = lorakit.load(out)
        assert sorted(combined.modules) == names
        for n in names:
            delta = combined.modules[n].delta(torch.float64)
            assert torch.allclose(delta, 2 * 2.0 * B.double() @ A.double(), rtol=0, atol=1e-12)
