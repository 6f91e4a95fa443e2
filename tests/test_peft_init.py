"""PEFT initialisations that move the base (PiSSA, OLoRA, CorDA): refused against the original base without the
initial adapter; with it, merged and converted exactly as PEFT's own conversion (the real PEFT, tiny Llama)."""

import json
import warnings

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

from conftest import assert_one_line_error
from peft.tuners.lora.config import CordaConfig

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    folder = tmp_path_factory.mktemp("init") / "base"
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def ids():
    return torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        return model(ids()).logits.double()


def corda_ready(model, config):
    from peft.tuners.lora.corda import preprocess_corda

    def run_model():  # CorDA's covariance of each layer's inputs, from a few random sequences
        for s in range(8):
            model(torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(s)))

    with torch.no_grad():
        preprocess_corda(model, config, run_model=run_model)


def trained(base_dir, tmp_path, init):
    """An adapter of `init` after 'training' (factors moved), its initial adapter, PEFT's converted LoRA, and the
    trained PEFT model's logits (the truth a merge must give)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    model = transformers.LlamaForCausalLM.from_pretrained(base_dir).eval()
    extra = {"corda_config": CordaConfig(corda_method="ipm")} if init == "corda" else {}
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init, **extra)
    if init == "corda":
        corda_ready(model, config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, config).eval()
        pm.peft_config["default"].init_lora_weights = True  # PEFT's recipe for the initial adapter
        pm.save_pretrained(tmp_path / "initial")
        pm.peft_config["default"].init_lora_weights = init
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_" in name:
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
        pm.save_pretrained(tmp_path / "trained")
        pm.save_pretrained(
            tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "initial")
        )
    return logits(pm)


@pytest.mark.parametrize("init", ["pissa", "olora", "corda"])
def test_moved_base_refused_without_initial(cli, base_dir, tmp_path, init):
    trained(base_dir, tmp_path, init)
    name = {"pissa": "PiSSA", "olora": "OLoRA", "corda": "CorDA"}[init]
    code, out, err = cli("merge", base_dir, tmp_path / "trained", "-o", tmp_path / "m")
    assert_one_line_error(code, out, err, "[LK603]", name, "--initial DIR", "trained")
    code, out, err = cli("convert", tmp_path / "trained", "-o", tmp_path / "c", "--to", "peft")
    assert_one_line_error(code, out, err, "[LK603]", name, "convert it with --initial DIR")
    assert not (tmp_path / "m").exists() and not (tmp_path / "c").exists()


@pytest.mark.parametrize("init", ["pissa", "olora", "corda"])
def test_initial_merges_and_converts_as_peft(cli, base_dir, tmp_path, init):
    truth = trained(base_dir, tmp_path, init)
    whole_effect = (truth - logits(transformers.LlamaForCausalLM.from_pretrained(base_dir))).abs().max()
    assert whole_effect > 0.05  # the adapter does something: a merge that drops it fails below
    code, out, err = cli(
        "merge", base_dir, tmp_path / "trained", "--initial", tmp_path / "initial", "-o", tmp_path / "m"
    )
    assert code == 0, err
    merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "m")
    assert (logits(merged) - truth).abs().max() < 1e-5

    code, out, err = cli(
        "convert",
        tmp_path / "trained",
        "--initial",
        tmp_path / "initial",
        "-o",
        tmp_path / "c",
        "--to",
        "peft",
    )
    assert code == 0, err
    ours, peft_own = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("c", "converted"))
    assert sorted(ours) == sorted(peft_own)
    for k in ours:  # PEFT's own bytes: [A; A0] and [B, -B0]
        assert torch.equal(ours[k], peft_own[k]), k
    c_ours, c_peft = (
        json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("c", "converted")
    )
    assert (c_ours["r"], c_ours["lora_alpha"]) == (c_peft["r"], c_peft["lora_alpha"]) == (8, 16)
    assert c_ours["init_lora_weights"] is True
    on_original = peft.PeftModel.from_pretrained(
        transformers.LlamaForCausalLM.from_pretrained(base_dir), tmp_path / "c"
    )
    assert (logits(on_original) - truth).abs().max() < 1e-5


def hand_made(tmp_path, init, base_dir):
    """A PEFT folder whose config names `init` (LoftQ needs CUDA in PEFT, EVA data: the files are what matters)."""
    folder = tmp_path / init
    model = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    pm = peft.get_peft_model(
        model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    )
    pm.save_pretrained(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": init}))
    return folder


def test_loftq_refused_even_with_initial(cli, base_dir, tmp_path):
    folder = hand_made(tmp_path, "loftq", base_dir)
    for extra in ([], ["--initial", folder]):
        code, out, err = cli("merge", base_dir, folder, "-o", tmp_path / "m", *extra)
        assert_one_line_error(code, out, err, "[LK603]", "LoftQ", "quantized base")
        assert "--initial" not in err


def test_lora_ga_moves_the_base_in_peft(cli, base_dir, tmp_path):
    """PEFT's lora_ga_init subtracts scale * B0 A0 from W, as PiSSA does: refused without the initial adapter."""
    folder = hand_made(tmp_path, "lora_ga", base_dir)
    code, out, err = cli("merge", base_dir, folder, "-o", tmp_path / "m")
    assert_one_line_error(code, out, err, "[LK603]", "LoRA-GA", "--initial DIR")


def test_eva_merges_as_it_is_and_says_so(cli, base_dir, tmp_path):
    folder = hand_made(tmp_path, "eva", base_dir)
    code, out, err = cli("convert", folder, "-o", tmp_path / "c.safetensors", "--to", "lorakit", "-v")
    assert code == 0, err
    assert "init_lora_weights 'eva' only chose the starting factors: the base is unchanged" in out
    code, out, err = cli("merge", base_dir, folder, "-o", tmp_path / "m")
    assert code == 0, err


def test_initial_of_another_run_refused(cli, base_dir, tmp_path):
    trained(base_dir, tmp_path, "pissa")
    pm = peft.get_peft_model(  # another module set
        transformers.LlamaForCausalLM.from_pretrained(base_dir),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]),
    )
    pm.save_pretrained(tmp_path / "q_only")
    code, out, err = cli(
        "merge", base_dir, tmp_path / "trained", "--initial", tmp_path / "q_only", "-o", tmp_path / "m"
    )
    assert_one_line_error(code, out, err, "differ in", "not the same run's initial factors")


def test_initial_that_is_the_adapter_itself_refused(cli, base_dir, tmp_path):
    trained(base_dir, tmp_path, "pissa")
    code, out, err = cli(
        "merge", base_dir, tmp_path / "trained", "--initial", tmp_path / "trained", "-o", tmp_path / "m"
    )
    assert_one_line_error(code, out, err, "the initial adapter is the adapter itself", "dW would be 0")


def test_initial_reports_how_far_training_moved_the_factors(cli, base_dir, tmp_path):
    trained(base_dir, tmp_path / "a", "pissa")
    trained(base_dir, tmp_path / "b", "olora")  # another run's initial factors: far from these
    code, out, err = cli(
        "merge",
        base_dir,
        tmp_path / "a" / "trained",
        "--initial",
        tmp_path / "b" / "initial",
        "-o",
        tmp_path / "m",
    )
    assert code == 0 and "suggests the initial adapter of another run: check --initial" in out
    code, out, err = cli(
        "merge",
        base_dir,
        tmp_path / "a" / "trained",
        "--initial",
        tmp_path / "a" / "initial",
        "-o",
        tmp_path / "m2",
    )
    assert code == 0 and "training moved the factors by" in out and "another run" not in out


@pytest.mark.parametrize(
    "options, fragment",
    [
        (
            {"alora_invocation_tokens": [5, 6]},
            "an Activated LoRA (alora_invocation_tokens) applies only from",
        ),
        (
            {"layer_replication": [[0, 2], [1, 2]]},
            "PEFT's layer_replication [[0, 2], [1, 2]] stacks the base's",
        ),
    ],
)
def test_adapters_no_weight_change_equals_are_refused(cli, base_dir, tmp_path, options, fragment):
    """An Activated LoRA acts from its invocation tokens on, and layer_replication's adapter names the layers of a
    stacked model (here 3 layers of a 2-layer base): both made by the real PEFT, which cannot merge the first
    either; merge and convert refuse them (LK603, no --initial offered), validate --base says so."""
    model = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    pm = peft.get_peft_model(
        model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, **options)
    )
    pm.save_pretrained(tmp_path / "a")
    if "alora_invocation_tokens" in options:
        with pytest.raises(NotImplementedError):
            pm.merge_and_unload()
    else:
        assert len(pm.base_model.model.model.layers) == 3
    for argv in (
        ["merge", base_dir, tmp_path / "a", "-o", tmp_path / "m"],
        ["convert", tmp_path / "a", "-o", tmp_path / "c", "--for", "vllm"],
    ):
        code, out, err = cli(*argv)
        assert_one_line_error(code, out, err, "[LK603]", fragment)
        assert "--initial" not in err and "does not hold" not in err
    code, out, err = cli("validate", tmp_path / "a", "--base", base_dir)
    assert code == 1 and "LK603" in out and fragment in out and "--initial" not in out
