"""Where every module lands: PEFT adapters made on tiny models of the families people fine-tune (vision-language
models whose checkpoints name the language model under another prefix than the model in memory, hybrid linear
attention and Mamba layers), validated against and merged into the checkpoint transformers saves, compared with
the PEFT model's own forward; an adapter whose prefix matches nothing is refused with the nearest base name."""

import json
import warnings

import peft
import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

from conftest import assert_one_line_error

TEXT = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=128,
)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28)
QWEN_VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
LINEAR_ATTENTION = dict(
    linear_num_value_heads=4,
    linear_num_key_heads=2,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    layer_types=["linear_attention", "full_attention"],
)
PER_LAYER_INPUT = dict(vocab_size_per_layer_input=128, hidden_size_per_layer_input=16, sliding_window=16)


def gemma3():
    config = tf.Gemma3Config(
        text_config=dict(TEXT, sliding_window=16),
        vision_config=dict(VISION, patch_size=14),
        mm_tokens_per_image=4,
    )
    return tf.Gemma3ForConditionalGeneration(config)


def gemma3n():  # its vision tower needs timm: the text model, as PEFT trains it for text
    text = dict(
        TEXT,
        **PER_LAYER_INPUT,
        intermediate_size=[128, 128],
        num_kv_shared_layers=0,
        laurel_rank=8,
        layer_types=["sliding_attention", "full_attention"],
        activation_sparsity_pattern=[0.0, 0.0],
        altup_num_inputs=2,
    )
    return tf.Gemma3nForCausalLM(tf.Gemma3nTextConfig(**text))


def gemma4():
    text = dict(TEXT, **PER_LAYER_INPUT, layer_types=["sliding_attention", "full_attention"])
    return tf.Gemma4ForConditionalGeneration(tf.Gemma4Config(text_config=text))


def qwen2_5_vl():
    text = dict(TEXT, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    vision = dict(QWEN_VISION, fullatt_block_indexes=[0])
    return tf.Qwen2_5_VLForConditionalGeneration(tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision))


def qwen3_vl():
    rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True}
    vision = dict(QWEN_VISION, deepstack_visual_indexes=[0])
    config = tf.Qwen3VLConfig(text_config=dict(TEXT, rope_scaling=rope), vision_config=vision)
    return tf.Qwen3VLForConditionalGeneration(config)


def mistral3():
    text = dict(TEXT, model_type="mistral")
    vision = dict(VISION, head_dim=16, patch_size=14, model_type="pixtral")
    return tf.Mistral3ForConditionalGeneration(tf.Mistral3Config(text_config=text, vision_config=vision))


def llama4():
    text = dict(TEXT, intermediate_size_mlp=128, num_local_experts=2, interleave_moe_layer_step=1)
    vision = dict(
        VISION, patch_size=14, vision_output_dim=64, projector_input_dim=64, projector_output_dim=64
    )
    return tf.Llama4ForConditionalGeneration(tf.Llama4Config(text_config=text, vision_config=vision))


def qwen3_next():  # fused linear-attention projections: in_proj_qkvz, in_proj_ba
    moe = dict(
        num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32, shared_expert_intermediate_size=32
    )
    return tf.Qwen3NextForCausalLM(tf.Qwen3NextConfig(**TEXT, **moe, **LINEAR_ATTENTION))


def qwen3_5():  # the same layer split: in_proj_qkv, in_proj_z, in_proj_b, in_proj_a
    return tf.Qwen3_5ForCausalLM(tf.Qwen3_5TextConfig(**TEXT, **LINEAR_ATTENTION))


def nemotron_h():  # Mamba-2 (fused in_proj), attention and MLP layers
    config = tf.NemotronHConfig(
        **{**TEXT, "num_hidden_layers": 3},
        hybrid_override_pattern="M*-",
        mamba_num_heads=4,
        mamba_head_dim=16,
        ssm_state_size=16,
        n_groups=1,
        expand=1,
    )
    return tf.NemotronHForCausalLM(config)


FAMILIES = [gemma3, gemma3n, gemma4, qwen2_5_vl, qwen3_vl, mistral3, llama4, qwen3_next, qwen3_5, nemotron_h]


def ids():
    return torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(3))


def adapted(make, tmp_path):
    """The family's tiny base saved by transformers, a PEFT LoRA on every linear layer (B nonzero, as after
    training) saved by PEFT, and the PEFT model's logits."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = make().eval()
        model.save_pretrained(tmp_path / "base")
        # Llama 4's router is a Linear returning a tuple, and PEFT refuses Mamba's out_proj and conv1d
        exclude = ["router", *(["out_proj", "conv1d"] if make is nemotron_h else [])]
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", exclude_modules=exclude)
        pm = peft.get_peft_model(model, config)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            truth = pm(input_ids=ids()).logits.double()
        pm.save_pretrained(tmp_path / "adapter")
        with torch.no_grad():
            peft_merged = pm.merge_and_unload()(input_ids=ids()).logits.double()
    assert (peft_merged - truth).abs().max() < 1e-5  # here PEFT's own merge is right: the reference agrees
    return type(model), truth


@pytest.mark.parametrize("make", FAMILIES, ids=lambda f: f.__name__)
def test_peft_adapter_lands_and_merges_as_peft(make, tmp_path, cli):
    cls, truth = adapted(make, tmp_path)
    code, out, err = cli("validate", tmp_path / "adapter", "--base", tmp_path / "base", "--json")
    report = json.loads(out)["files"][0]
    assert code == 0 and report["valid"], out
    assert (
        report["landing"]["nowhere"] == 0 and report["landing"]["lands"] == report["landing"]["modules"] > 0
    )
    code, out, err = cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "merged")
    assert code == 0, err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = cls.from_pretrained(tmp_path / "merged").eval()
        base = cls.from_pretrained(tmp_path / "base").eval()
        with torch.no_grad():
            ours = merged(input_ids=ids()).logits.double()
            before = base(input_ids=ids()).logits.double()
    assert (truth - before).abs().max() > 1e-2  # the adapter changes the output: a merge that drops it fails
    assert (ours - truth).abs().max() < 1e-5


def wrong_prefix(folder):
    """The PEFT adapter with its module names under a prefix no checkpoint uses (a copy-paste error)."""
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    save_file(
        {k.replace("base_model.model.", "base_model.model.trunk.", 1): v for k, v in tensors.items()}, path
    )


@pytest.mark.parametrize("make", [qwen2_5_vl, nemotron_h], ids=lambda f: f.__name__)
def test_wrong_prefix_lands_nowhere_with_the_nearest_name(make, tmp_path, cli):
    adapted(make, tmp_path)
    wrong_prefix(tmp_path / "adapter")
    code, out, err = cli("validate", tmp_path / "adapter", "--base", tmp_path / "base", "--json")
    report = json.loads(out)["files"][0]
    assert code == 1 and not report["valid"]
    nowhere = [p for p in report["problems"] if p["code"] == "LK601"]
    assert len(nowhere) == report["landing"]["modules"] == report["landing"]["nowhere"] > 0
    assert report["landing"]["nowhere_share"] == 1.0
    first = nowhere[0]
    assert first["tensor"].startswith("trunk.")
    nearest = first["message"].split("nearest: ")[1].rstrip(")")
    layer = "layers." + first["tensor"].split(".layers.", 1)[1]
    assert nearest.endswith(layer) and not nearest.startswith(
        "trunk."
    )  # same layer, projection: the base's prefix
    code, out, err = cli("validate", tmp_path / "adapter", "--base", tmp_path / "base")
    assert "land nowhere" in out and "(100.00% of ||dW||)" in out
    for args in (
        ("merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "m"),
        (
            "convert",
            tmp_path / "adapter",
            "--base",
            tmp_path / "base",
            "--to",
            "lorakit",
            "-o",
            tmp_path / "c",
        ),
    ):
        code, out, err = cli(*args)
        assert_one_line_error(
            code, out, err, "[LK601]", "(100% of ||dW||) match nothing in the base", "(nearest: "
        )
        assert not (tmp_path / args[-1]).exists()


def test_validate_for_engine_flags_names_it_would_not_match(tmp_path, cli):
    """The language model under model.language_model. in the adapter, under model. in the Qwen2.5-VL checkpoint (the
    vision tower: model.visual. and visual.): lorakit merges it renamed and says so; an engine matching names as
    stored would load it and change nothing."""
    adapted(qwen2_5_vl, tmp_path)
    code, out, err = cli(
        "validate", tmp_path / "adapter", "--base", tmp_path / "base", "--for", "vllm", "--json"
    )
    report = json.loads(out)["files"][0]
    renamed = report["landing"]["renamed"]
    if not renamed:
        pytest.fail("PEFT now saves the checkpoint's names: this test's premise is gone, rewrite it")
    assert any(
        k.startswith("model.language_model.") and v.startswith("model.layers.") for k, v in renamed.items()
    )
    assert code == 1 and any(
        p["code"] == "LK601" and "change nothing" in p["message"] for p in report["problems"]
    )
    code, out, err = cli(
        "convert",
        tmp_path / "adapter",
        "--base",
        tmp_path / "base",
        "--for",
        "vllm",
        "-o",
        tmp_path / "served",
    )
    assert code == 0, err
    served = load_file(tmp_path / "served" / "adapter_model.safetensors")
    assert not any(".language_model." in k for k in served) and any(".model.layers." in k for k in served)
    code, out, err = cli(
        "validate", tmp_path / "served", "--base", tmp_path / "base", "--for", "vllm", "--json"
    )
    assert json.loads(out)["files"][0]["landing"]["renamed"] == {}


def test_a_module_of_another_shape_is_coded(tmp_path, cli):
    """A lorakit adapter whose q_proj is 8 columns too wide for the base: LK602 with both shapes."""
    from lorakit import examples
    from lorakit.core import Adapter, Module

    examples.write_llama_checkpoint(str(tmp_path / "base"), layers=1, hidden=32, intermediate=64)
    ad = Adapter()
    ad.add(Module("model.layers.0.self_attn.q_proj", torch.ones(2, 40), torch.ones(32, 2), alpha=2.0))
    ad.save(tmp_path / "a.safetensors")
    code, out, err = cli("validate", tmp_path / "a.safetensors", "--base", tmp_path / "base")
    assert (
        code == 1
        and "LK602 base-shape-mismatch model.layers.0.self_attn.q_proj: base [32, 32], adapter [32, 40]"
        in out
    )
    # convert --base refuses it as merge does, in one line naming the module and both shapes
    output = tmp_path / "served"
    code, out, err = cli(
        "convert", tmp_path / "a.safetensors", "--base", tmp_path / "base", "--for", "vllm", "-o", output
    )
    assert_one_line_error(
        code,
        out,
        err,
        "[LK602] does not fit the base's weight: base [32, 32], adapter [32, 40]",
        "model.layers.0.self_attn.q_proj",
    )
    assert not output.exists()


def test_validate_base_that_is_an_adapter_is_refused(tmp_path, cli):
    adapted(nemotron_h, tmp_path)
    code, out, err = cli("validate", tmp_path / "adapter", "--base", tmp_path / "adapter")
    assert_one_line_error(
        code, out, err, "BASE is a peft adapter, not a model", "lorakit validate ADAPTER --base BASE"
    )
