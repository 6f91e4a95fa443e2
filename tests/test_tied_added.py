"""Tied embeddings and added tokens against the real PEFT: a LoRA on lm_head or embed_tokens of a tied model, with
and without ensure_weight_tying, and an adapter that adds tokens (modules_to_save after resize_token_embeddings),
merged to the PEFT model's own logits, config and written tensors agreeing."""

import json
import warnings

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from conftest import assert_one_line_error

VOCAB, ADDED = 64, 70


def base(tmp_path, tied):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    return transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base")


def logits(model, vocab=VOCAB):
    ids = torch.randint(0, vocab, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids).logits.double()


def trained(pm, seed=2):
    """Every trainable tensor moved, as training would (LoRA B nonzero, modules_to_save copies changed)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return pm


def merged(tmp_path, cli, adapter="adapter"):
    code, out, err = cli("merge", tmp_path / "base", tmp_path / adapter, "-o", tmp_path / "merged")
    assert code == 0, err
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    return transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged"), config


@pytest.mark.parametrize("ensure", [False, True], ids=["plain", "ensure_weight_tying"])
@pytest.mark.parametrize("target", ["lm_head", "embed_tokens"])
def test_tied_lora_merges_as_the_peft_model(tmp_path, cli, ensure, target):
    model = base(tmp_path, tied=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=[target, "q_proj"], ensure_weight_tying=ensure
        )
        pm = trained(peft.get_peft_model(model, config).eval())
        truth = logits(pm)
        pm.save_pretrained(tmp_path / "adapter")
    out, config = merged(tmp_path, cli)
    assert (logits(out) - truth).abs().max() < 1e-5
    # ensure_weight_tying changes head and embedding alike: still one tied tensor; otherwise only one changes
    assert config["tie_word_embeddings"] is ensure
    assert ("lm_head.weight" in load_file(tmp_path / "merged" / "model.safetensors")) is not ensure


def tokenizer(folder):
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(ADDED)}
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    )
    fast.save_pretrained(folder)


def added_tokens(tmp_path, tied, to_save=("embed_tokens", "lm_head"), with_tokenizer=True):
    model = base(tmp_path, tied)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.resize_token_embeddings(ADDED, mean_resizing=False)
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=list(to_save))
        pm = trained(peft.get_peft_model(model, config).eval())
        truth = logits(pm, ADDED)
        pm.save_pretrained(tmp_path / "adapter")
    if with_tokenizer:
        tokenizer(tmp_path / "adapter")
    return truth


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_added_tokens_grow_the_base(tmp_path, cli, tied):
    truth = added_tokens(tmp_path, tied)
    out, config = merged(tmp_path, cli)
    assert config["vocab_size"] == ADDED and out.get_input_embeddings().weight.shape[0] == ADDED
    assert (logits(out, ADDED) - truth).abs().max() < 1e-5
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "merged" / name).read_bytes() == (tmp_path / "adapter" / name).read_bytes()


def test_added_tokens_without_a_tokenizer_refused(tmp_path, cli):
    added_tokens(tmp_path, tied=False, with_tokenizer=False)
    code, out, err = cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "merged")
    assert_one_line_error(code, out, err, "adds tokens", "no tokenizer files", "tokenizer.save_pretrained")
    assert not (tmp_path / "merged").exists()


def test_added_tokens_in_the_embedding_only(tmp_path, cli):
    """modules_to_save embed_tokens only: PEFT saves the resized head too (save_embedding_layers), which merges; an
    adapter without it (no file holds the grown head) is refused."""
    truth = added_tokens(tmp_path, tied=False, to_save=("embed_tokens",))
    out, config = merged(tmp_path, cli)
    assert config["vocab_size"] == ADDED and (logits(out, ADDED) - truth).abs().max() < 1e-5
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(path).items() if not k.endswith("lm_head.weight")}, path)
    code, out, err = cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "m2")
    assert_one_line_error(code, out, err, "grow some vocabulary tensors and not others", "lm_head.weight 64")
    assert not (tmp_path / "m2").exists()


def test_validate_for_vllm_warns_of_peft_s_base_copies(tmp_path, cli):
    """A LoRA on embed_tokens: PEFT saves the embedding's base weight beside it, which vLLM drops; served exactly
    (measured in vLLM 0.32: check_vllm.py) when the copy equals the base: a warning, an error where it differs."""
    model = base(tmp_path, tied=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = trained(
            peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens"]))
        )
        pm.save_pretrained(tmp_path / "adapter")
    code, out, err = cli("validate", tmp_path / "adapter", "--for", "vllm", "--json")
    problems = json.loads(out)["files"][0]["problems"]
    assert code == 0 and [p["code"] for p in problems] == ["LK303"], out
    code, out, err = cli(
        "validate", tmp_path / "adapter", "--for", "vllm", "--base", tmp_path / "base", "--json"
    )
    assert code == 0, out
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("base_layer.weight"))
    tensors[key] = tensors[key] + 1
    save_file(tensors, path)
    code, out, err = cli(
        "validate", tmp_path / "adapter", "--for", "vllm", "--base", tmp_path / "base", "--json"
    )
    assert code == 1 and "LK505" in {p["code"] for p in json.loads(out)["files"][0]["problems"]}
