"""PEFT adapter types other than LoRA, built and saved by the real PEFT on a tiny Llama: lorakit's merge equals
PEFT's merge_and_unload, inspect shows the type and the true rank, and `convert --to peft` gives a LoRA that PEFT
loads with the same logits."""

import json
import os
import warnings

import peft
import pytest
import torch
import transformers

import lorakit
from lorakit.bases import open_base
from lorakit.errors import LorakitError

from conftest import TINY_LLAMA as LLAMA, assert_one_line_error

TARGETS = ["q_proj", "v_proj", "down_proj"]
TYPES = {
    # name: (config, the true rank of each module's delta as a LoRA)
    "adalora": (
        lambda: peft.AdaLoraConfig(init_r=6, target_r=4, lora_alpha=8, target_modules=TARGETS, total_step=10),
        6,
    ),
    "vera": (lambda: peft.VeraConfig(r=4, target_modules=TARGETS, save_projection=True), 4),
    "vera_regenerated": (lambda: peft.VeraConfig(r=4, target_modules=TARGETS, save_projection=False), 4),
    "loha": (lambda: peft.LoHaConfig(r=3, alpha=6, target_modules=TARGETS), 9),
    "lokr": (lambda: peft.LoKrConfig(r=2, alpha=5, target_modules=TARGETS), None),
    "lokr_both": (lambda: peft.LoKrConfig(r=2, alpha=3, target_modules=TARGETS, decompose_both=True), None),
    "fourierft": (lambda: peft.FourierFTConfig(n_frequency=5, scaling=20.0, target_modules=TARGETS), 10),
    "delora": (lambda: peft.DeloraConfig(r=3, delora_lambda=7, target_modules=TARGETS), 3),
    "miss": (lambda: peft.MissConfig(r=4, target_modules=TARGETS), 4),
    "miss_mini": (lambda: peft.MissConfig(r=4, mini_r=8, init_weights="mini", target_modules=TARGETS), 4),
}


def make_base():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()


def build(tmp_path, kind, seed=1):
    """(base folder, adapter folder, PEFT's merged state dict) for adapter type `kind` (of TYPES or MULTIPLICATIVE),
    every trainable parameter set at random around its neutral value (training leaves them there: IA3's 1, the
    others' 0)."""
    base = make_base()
    base.save_pretrained(tmp_path / "base")
    config = TYPES[kind][0]() if kind in TYPES else MULTIPLICATIVE[kind]()
    model = peft.get_peft_model(base, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if "ia3" in name else 0.0))
    model.save_pretrained(tmp_path / kind)
    merged = {k: v.clone() for k, v in model.merge_and_unload().state_dict().items()}
    return tmp_path / "base", tmp_path / kind, merged


@pytest.mark.parametrize("kind", sorted(TYPES))
def test_merge_equals_peft_merge_and_unload(tmp_path, kind):
    base, adapter, merged = build(tmp_path, kind)
    report = lorakit.merge(base, [adapter], tmp_path / "out", quiet=True)
    out = open_base(tmp_path / "out")
    changed = 0
    for name, want in merged.items():
        if name == "lm_head.weight" and name not in out:
            continue
        got = out.get(name).double()
        scale = want.double().abs().max()
        assert torch.allclose(got, want.double(), rtol=0, atol=1e-5 * scale), (name, (got - want).abs().max())
        changed += not torch.equal(got.float(), open_base(base).get(name))
    assert changed == report["merged_count"] == 3 * LLAMA["num_hidden_layers"]


@pytest.mark.parametrize("kind", sorted(TYPES))
def test_inspect_shows_type_and_true_rank(tmp_path, kind, cli):
    base, adapter, _ = build(tmp_path, kind)
    code, out, err = cli("inspect", adapter, "--base", base, "--spectrum", "--json", "-q")
    assert code == 0, err
    report = json.loads(out)
    assert report["peft_type"] == peft.PeftConfig.from_pretrained(adapter).peft_type.value
    for row in report["modules"]:
        numerical = row["numerical_rank"]
        assert numerical <= row["rank"]
        if TYPES[kind][1] is not None:
            assert row["rank"] == TYPES[kind][1]
            assert numerical == min(TYPES[kind][1], *row["shape"]) or kind == "fourierft"


@pytest.mark.parametrize("kind", sorted(TYPES))
def test_convert_to_peft_lora_gives_the_same_logits(tmp_path, kind):
    base, adapter, _ = build(tmp_path, kind)
    lorakit.convert(adapter, tmp_path / "lora", to="peft", base=str(base))
    ids = torch.randint(0, LLAMA["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = peft.PeftModel.from_pretrained(make_base(), adapter).eval()(ids).logits
        got_model = peft.PeftModel.from_pretrained(make_base(), tmp_path / "lora").eval()
    assert got_model.peft_config["default"].peft_type.value == "LORA"
    got = got_model(ids).logits
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * want.abs().max()), (got - want).abs().max()


def test_adalora_pruned_ranks_are_dropped_exactly(tmp_path):
    base, adapter, merged = build(tmp_path, "adalora")
    from safetensors.torch import load_file, save_file

    weights = os.path.join(adapter, "adapter_model.safetensors")
    sd = load_file(weights)
    for key in [k for k in sd if k.endswith("lora_E")]:
        sd[key][1::2] = 0  # ranks pruned by AdaLoRA's allocator
    save_file(sd, weights)
    ad = lorakit.load(adapter)
    assert {m.rank for m in ad.modules.values()} == {3}
    model = peft.PeftModel.from_pretrained(make_base(), adapter).merge_and_unload()
    lorakit.merge(base, [adapter], tmp_path / "out", quiet=True)
    for name, want in model.state_dict().items():
        if name in open_base(tmp_path / "out"):
            got = open_base(tmp_path / "out").get(name)
            assert torch.allclose(got, want, atol=1e-5 * want.abs().max()), name


def test_types_needing_the_base_say_so(tmp_path, cli):
    _, adapter, _ = build(tmp_path, "fourierft")
    code, out, err = cli("convert", adapter, "-o", tmp_path / "x.safetensors", "--to", "lorakit")
    assert_one_line_error(
        code, out, err, "FourierFT does not store the layer's shape: pass --base", "fourierft"
    )
    assert not os.path.exists(tmp_path / "x.safetensors")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"peft_type": "POLY"}, "peft_type POLY is not supported"),
        ({"init_r": 0}, "'init_r' must be a positive integer, got 0"),
    ],
)
def test_unsupported_or_broken_types_are_one_line_errors(tmp_path, cli, change, message):
    _, adapter, _ = build(tmp_path, "adalora")
    config_path = os.path.join(adapter, "adapter_config.json")
    config = json.load(open(config_path))
    config.update(change)
    json.dump(config, open(config_path, "w"))
    code, out, err = cli("convert", adapter, "-o", tmp_path / "x.safetensors", "--to", "lorakit")
    assert_one_line_error(code, out, err, message)
    with pytest.raises(LorakitError, match=message.replace("(", r"\(").replace(")", r"\)")):
        lorakit.load(adapter)


MULTIPLICATIVE = {
    "ia3": lambda: peft.IA3Config(target_modules=TARGETS, feedforward_modules=["down_proj"]),
    "hra": lambda: peft.HRAConfig(r=3, target_modules=TARGETS),
    "hra_gs": lambda: peft.HRAConfig(r=3, target_modules=TARGETS, apply_GS=True),
    "oft": lambda: peft.OFTConfig(r=0, oft_block_size=8, target_modules=TARGETS),
    "oft_cayley": lambda: peft.OFTConfig(
        r=0, oft_block_size=4, target_modules=TARGETS, use_cayley_neumann=False
    ),
    "oft_shared": lambda: peft.OFTConfig(r=0, oft_block_size=8, target_modules=TARGETS, block_share=True),
    "boft": lambda: peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=1, target_modules=TARGETS),
    "boft_2": lambda: peft.BOFTConfig(
        boft_block_size=0, boft_block_num=4, boft_n_butterfly_factor=2, target_modules=TARGETS
    ),
}


def build_multiplicative(tmp_path, kind, seed=2):
    return build(tmp_path, kind, seed)


@pytest.mark.parametrize("kind", sorted(MULTIPLICATIVE))
def test_multiplicative_merge_equals_peft(tmp_path, kind):
    base, adapter, merged = build_multiplicative(tmp_path, kind)
    report = lorakit.merge(base, [adapter], tmp_path / "out", quiet=True)
    out, before = open_base(tmp_path / "out"), open_base(base)
    assert report["merged_count"] == 3 * LLAMA["num_hidden_layers"]
    for name, want in merged.items():
        if name in out:
            got = out.get(name).double()
            assert torch.allclose(got, want.double(), atol=1e-5 * want.abs().max()), (
                name,
                (got - want).abs().max(),
            )
    assert not torch.equal(
        out.get("model.layers.0.mlp.down_proj.weight"), before.get("model.layers.0.mlp.down_proj.weight")
    )


@pytest.mark.parametrize(
    "kind, rank", [("hra", None), ("hra_gs", None), ("ia3", 32), ("oft", 32), ("boft", 32)]
)
def test_multiplicative_convert_with_base(tmp_path, kind, rank, cli):
    """HRA's change is exactly rank r; IA3's and OFT's are not low-rank: at full rank the LoRA is exact too, and the
    report says how much energy each module kept."""
    base, adapter, merged = build_multiplicative(tmp_path, kind)
    args = ["convert", adapter, "-o", tmp_path / "lora", "--to", "peft", "--base", base, "--json", "-q"]
    code, out, err = cli(*args, *(["--rank", rank] if rank else []))
    assert code == 0, err
    rows = json.loads(out)["modules"]
    assert len(rows) == 3 * LLAMA["num_hidden_layers"]
    assert all(r["energy_kept"] > 1 - 1e-9 for r in rows)
    if rank is None:
        assert {r["rank"] for r in rows} == {3}
    ids = torch.randint(0, LLAMA["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = peft.PeftModel.from_pretrained(make_base(), adapter).eval()(ids).logits
        got = peft.PeftModel.from_pretrained(make_base(), tmp_path / "lora").eval()(ids).logits
    assert torch.allclose(got, want, atol=1e-4 * want.abs().max()), (got - want).abs().max()


def test_multiplicative_truncation_reports_what_it_kept(tmp_path):
    base, adapter, _ = build_multiplicative(tmp_path, "ia3")
    report = lorakit.convert(adapter, tmp_path / "l.safetensors", to="lorakit", base=str(base), rank=2)
    ad, W = lorakit.load(tmp_path / "l.safetensors"), open_base(base)
    from lorakit.core.multiplicative import Transform

    for row in report["modules"]:
        name = row["module"]
        t = Transform(name, "ia3", {"ia3_l": peft_tensor(adapter, f"{name}.ia3_l")})
        D = (t.apply(W.get(f"{name}.weight")) - W.get(f"{name}.weight")).double()
        err = (ad.modules[name].delta().double() - D).norm() / D.norm()
        assert row["rank"] == 2 and abs(err - row["relative_error"]) < 1e-5, (err, row)
        assert abs(row["energy_kept"] - (1 - err**2)) < 1e-5


def peft_tensor(folder, key):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "adapter_model.safetensors"))[f"base_model.model.{key}"]


def test_multiplicative_without_base_is_refused(tmp_path, cli):
    _, adapter, _ = build_multiplicative(tmp_path, "oft")
    code, out, err = cli("convert", adapter, "-o", tmp_path / "x.safetensors", "--to", "lorakit")
    assert_one_line_error(code, out, err, "change W multiplicatively", "--base")
    code, out, err = cli(
        "convert", adapter, "-o", tmp_path / "x.safetensors", "--to", "lorakit", "--base", tmp_path / "base"
    )
    assert_one_line_error(code, out, err, "oft is not low-rank: give --rank or --energy")
    assert not os.path.exists(tmp_path / "x.safetensors")


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 8, 3)
        self.head = torch.nn.Linear(8, 6)

    def forward(self, x):
        return self.head(self.conv(x).mean((2, 3)))


@pytest.mark.parametrize(
    "kind, change, code",
    [
        ("adalora", {"init_r": 0}, "LK401"),
        ("fourierft", {}, "LK402"),
        ("vera_regenerated", {}, "LK402"),
        ("adalora", {"peft_type": "POLY"}, "LK403"),
    ],
)
def test_validate_reports_the_types_rules_by_code(tmp_path, cli, kind, change, code):
    _, adapter, _ = build(tmp_path, kind)
    path = os.path.join(adapter, "adapter_config.json")
    json.dump({**json.load(open(path)), **change}, open(path, "w"))
    rc, out, err = cli("validate", adapter, "--json")
    assert rc == 1, err
    problems = json.loads(out)["files"][0]["problems"]
    assert [p["code"] for p in problems] == ["LK105", code], problems


def test_validate_of_a_good_type_says_valid_and_convert(tmp_path, cli):
    """A valid adapter of another format is valid in that format (exit 0), with the way to the spec format."""
    _, adapter, _ = build(tmp_path, "loha")
    rc, out, err = cli("validate", adapter, "--json")
    result = json.loads(out)["files"][0]
    assert rc == 0 and result["valid"] and result["problems"] == [] and result["format"] == "peft"
    assert "lorakit convert" in result["note"]
    rc, out, err = cli("validate", adapter)
    assert rc == 0 and out.startswith("valid") and "a peft adapter, not a lorakit file" in out


def _edit_weights(adapter, edit):
    from safetensors.torch import load_file, save_file

    weights = os.path.join(adapter, "adapter_model.safetensors")
    sd = load_file(weights)
    edit(sd)
    save_file(sd, weights)


@pytest.mark.parametrize(
    "kind, edit, config, fragment",
    [
        ("vera_regenerated", None, {"projection_prng_key": None}, "LK401"),
        ("vera", lambda sd: sd.pop("base_model.vera_A"), {"projection_prng_key": None}, "LK401"),
        (
            "oft",
            lambda sd: [sd.update({k: v[:, :-1].contiguous()}) for k, v in list(sd.items())],
            {},
            "LK203",
        ),
        ("hra", lambda sd: [sd.update({k: v * 0}) for k, v in list(sd.items())], {}, "zero column"),
        (
            "adalora",
            lambda sd: [sd.update({k: v[:-1]}) for k, v in list(sd.items()) if "lora_E" in k],
            {},
            "LK203",
        ),
    ],
    ids=["vera-no-key", "vera-no-projection", "oft-not-skew-entries", "hra-zero", "adalora-shapes"],
)
def test_hostile_peft_types_are_one_line_errors(tmp_path, cli, kind, edit, config, fragment):
    base, adapter, _ = build(tmp_path, kind)
    if edit is not None:
        _edit_weights(adapter, edit)
    path = os.path.join(adapter, "adapter_config.json")
    conf = {**json.load(open(path)), **config}
    json.dump({k: v for k, v in conf.items() if v is not None}, open(path, "w"))
    for argv in (["merge", base, adapter, "-o", tmp_path / "out"], ["inspect", adapter, "--base", base]):
        code, out, err = cli(*argv)
        assert_one_line_error(code, out, err, fragment, kind)
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize(
    "argv",
    [
        ["resize", "{a}", "-o", "{o}", "--rank", "2"],
        ["combine", "{a}", "{a}", "-o", "{o}"],
        ["diff", "{a}", "{a}"],
    ],
)
def test_factor_commands_refuse_multiplicative_adapters(tmp_path, cli, argv):
    """Never an output without the modules: combine / resize / diff work on factors, and say how to get them."""
    _, adapter, _ = build(tmp_path, "ia3")
    out = tmp_path / "o.safetensors"
    code, stdout, err = cli(*[a.format(a=adapter, o=out) for a in argv])
    assert_one_line_error(
        code, stdout, err, "LK508", "change W multiplicatively (ia3)", "--base BASE --rank R"
    )
    assert not out.exists()


CONV = {
    "loha": lambda: peft.LoHaConfig(r=2, alpha=3, target_modules=["conv", "head"]),
    "loha-effective": lambda: peft.LoHaConfig(
        r=2, alpha=3, target_modules=["conv", "head"], use_effective_conv2d=True
    ),
    "lokr": lambda: peft.LoKrConfig(r=2, alpha=3, target_modules=["conv", "head"]),
    "lokr-effective": lambda: peft.LoKrConfig(
        r=2, alpha=3, target_modules=["conv", "head"], use_effective_conv2d=True
    ),
    "ia3": lambda: peft.IA3Config(target_modules=["conv", "head"], feedforward_modules=["head"]),
    "ia3-feedforward-conv": lambda: peft.IA3Config(
        target_modules=["conv", "head"], feedforward_modules=["conv"]
    ),
    "hra": lambda: peft.HRAConfig(r=3, target_modules=["conv", "head"]),
    "oft": lambda: peft.OFTConfig(r=0, oft_block_size=4, target_modules=["conv", "head"]),
    "boft": lambda: peft.BOFTConfig(
        boft_block_size=4, boft_n_butterfly_factor=1, target_modules=["conv", "head"]
    ),
}


@pytest.mark.parametrize("kind", sorted(CONV))
def test_conv_types_merge_equals_peft(tmp_path, kind):
    """A Conv2d net: the additive types (LoHa, LoKr, plain and effective) and the multiplicative ones (IA3, HRA,
    OFT, BOFT over in x kernel) merge as PEFT's merge_and_unload does."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = ConvNet()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / "base.safetensors")
    model = peft.get_peft_model(net, CONV[kind]())
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in ((n, p) for n, p in model.named_parameters() if p.requires_grad):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if "ia3" in name else 0.0))
    model.save_pretrained(tmp_path / "adapter")
    merged = model.merge_and_unload().state_dict()
    lorakit.merge(
        tmp_path / "base.safetensors", [tmp_path / "adapter"], tmp_path / "out.safetensors", quiet=True
    )
    out = open_base(tmp_path / "out.safetensors")
    for name in ("conv.weight", "head.weight"):
        want = merged[name].double()
        assert torch.allclose(out.get(name).double(), want, atol=1e-5 * want.abs().max()), name


def test_conv_multiplicative_converts_against_the_base(tmp_path):
    """HRA on a Conv2d: its change W' - W, over in x kernel, is an exact conv LoRA of rank r."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = ConvNet()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / "base.safetensors")
    model = peft.get_peft_model(net, CONV["hra"]())
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model.save_pretrained(tmp_path / "adapter")
    merged = model.merge_and_unload().state_dict()
    report = lorakit.convert(
        tmp_path / "adapter",
        tmp_path / "l.safetensors",
        to="lorakit",
        base=str(tmp_path / "base.safetensors"),
    )
    ad, base = lorakit.load(tmp_path / "l.safetensors"), open_base(tmp_path / "base.safetensors")
    assert ad.modules["conv"].kind == "conv" and {r["rank"] for r in report["modules"]} == {3}
    for name in ("conv", "head"):
        want = merged[f"{name}.weight"].double() - base.get(f"{name}.weight").double()
        assert torch.allclose(ad.modules[name].delta().double(), want, atol=1e-5 * want.abs().max()), name
