"""Training: the built-in model against transformers, loss falls, the adapter in PEFT and in merge gives lorakit's
logits, 2-process gloo equals 1 process, bad input stops before the first step."""

import json
import os
import subprocess
import sys

import numpy as np
import peft
import pytest
import torch
import transformers

import lorakit
from lorakit import examples
from lorakit.training import lora
from lorakit.errors import LorakitError
from lorakit.training.model import LlamaForCausalLM

from conftest import assert_one_line_error

ALL_LINEAR = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A tiny random Llama and a learnable synthetic stream: each token is followed by a fixed permutation of it."""
    d = tmp_path_factory.mktemp("task")
    examples.write_permutation_task(str(d))
    return d


@pytest.mark.parametrize("extra", [{}, {"tie_word_embeddings": True}, {"num_key_value_heads": 4}])
def test_builtin_model_matches_transformers(tmp_path, extra):
    torch.manual_seed(0)
    kw = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=5e5,
    )
    kw.update(extra)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()
    hf.save_pretrained(tmp_path / "m")
    ours = LlamaForCausalLM.from_pretrained(str(tmp_path / "m"))
    ids = torch.randint(0, 96, (2, 19))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-5


def test_builtin_model_matches_qwen2(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(
        vocab_size=80,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    hf = transformers.Qwen2ForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "q")
    ours = LlamaForCausalLM.from_pretrained(str(tmp_path / "q"))
    ids = torch.randint(0, 80, (1, 11))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-5


def test_loss_falls_and_adapter_reproduces_in_peft_and_merge(task, tmp_path, cli):
    code, out, err = cli(
        "train",
        "--base",
        task / "base",
        "--data",
        task / "data.npy",
        "-o",
        tmp_path / "a.safetensors",
        "--rank",
        "8",
        "--alpha",
        "16",
        "--targets",
        ALL_LINEAR,
        "--steps",
        "120",
        "--lr",
        "3e-3",
        "--batch",
        "16",
        "--seq-len",
        "32",
        "--eval-every",
        "40",
        "--quiet",
        "--json",
    )
    assert code == 0, err
    r = json.loads(out)
    assert (
        r["final_loss"] < r["first_loss"] / 10 and r["eval_loss"] < r["first_loss"] / 10
    )  # the stated factor: 10x
    ad = lorakit.load(tmp_path / "a.safetensors")
    assert len(ad.modules) == 14 and ad.provenance["operation"] == "train"
    assert ad.provenance["params"]["rank"] == 8 and "eval_loss" in ad.provenance
    assert lorakit.validate([str(tmp_path / "a.safetensors")])["valid"]
    # lorakit's own logits with the adapter
    model = LlamaForCausalLM.from_pretrained(str(task / "base"))
    lora.inject(model, ALL_LINEAR, rank=8, alpha=16)
    lora.load_into(model, ad)
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(ids)
    # PEFT on transformers' LlamaForCausalLM
    lorakit.convert(tmp_path / "a.safetensors", tmp_path / "peft", to="peft")
    hf = transformers.LlamaForCausalLM.from_pretrained(task / "base").eval()
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "peft").eval()
    with torch.no_grad():
        assert (pm(ids).logits - ours).abs().max().item() <= 1e-5
    # lorakit merge: the same logits without the adapter
    lorakit.merge(task / "base", [str(tmp_path / "a.safetensors")], tmp_path / "merged", quiet=True)
    merged = LlamaForCausalLM.from_pretrained(str(tmp_path / "merged"))
    with torch.no_grad():
        assert (merged(ids) - ours).abs().max().item() <= 1e-4
    # in-place merge / unmerge of the layers
    with torch.no_grad():
        lora.merge(model)
        assert (model(ids) - ours).abs().max().item() <= 1e-4
        lora.unmerge(model)
        assert (model(ids) - ours).abs().max().item() <= 1e-5


def test_two_gloo_processes_equal_one(task, tmp_path):
    args = [
        "--base",
        str(task / "base"),
        "--data",
        str(task / "data.npy"),
        "--rank",
        "4",
        "--targets",
        "q_proj,v_proj,down_proj",
        "--steps",
        "6",
        "--batch",
        "8",
        "--seq-len",
        "16",
        "--quiet",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29541",
            "-m",
            "lorakit.cli",
            "train",
            *args,
            "-o",
            str(tmp_path / "ddp.safetensors"),
        ],
        check=True,
        env=env,
        capture_output=True,
    )
    lorakit.train(
        task / "base",
        task / "data.npy",
        tmp_path / "one.safetensors",
        rank=4,
        targets="q_proj,v_proj,down_proj",
        steps=6,
        batch=8,
        seq_len=16,
        quiet=True,
    )
    r = lorakit.diff(tmp_path / "ddp.safetensors", tmp_path / "one.safetensors", quiet=True)
    assert r["summary"]["both"] == 6 and r["summary"]["max_relative_diff"] < 1e-5
    assert lorakit.load(tmp_path / "ddp.safetensors").provenance["params"]["processes"] == 2


def test_jsonl_records_and_resume(task, tmp_path):
    with open(tmp_path / "d.jsonl", "w") as f:
        for i in range(40):
            ids = [(i + j) % 64 for j in range(20)]
            f.write(json.dumps({"input_ids": ids, "loss_mask": [0] * 5 + [1] * 15}) + "\n")
    r = lorakit.train(
        task / "base",
        tmp_path / "d.jsonl",
        tmp_path / "a.safetensors",
        rank=2,
        steps=3,
        batch=4,
        seq_len=16,
        quiet=True,
    )
    assert r["steps"] == 3
    lorakit.train(
        task / "base",
        tmp_path / "d.jsonl",
        tmp_path / "b",
        rank=2,
        steps=1,
        batch=4,
        seq_len=16,
        resume=str(tmp_path / "a.safetensors"),
        format="peft",
        quiet=True,
        lr=1e-12,
    )
    back = lorakit.load(tmp_path / "b")
    first = lorakit.load(tmp_path / "a.safetensors")
    name = "model.layers.0.self_attn.q_proj"
    assert torch.allclose(back.modules[name].delta(), first.modules[name].delta(), atol=1e-6)


def test_bad_input_stops_before_training(task, tmp_path, cli):
    np.save(tmp_path / "big.npy", np.array([1, 2, 999, 3], dtype=np.int64))
    c, out, err = cli("train", "--base", task / "base", "--data", tmp_path / "big.npy", "-o", tmp_path / "x")
    assert c == 2 and "token id 999 at position 2 is outside the vocabulary [0, 64)" in err
    (tmp_path / "noconfig").mkdir()
    c, out, err = cli(
        "train", "--base", tmp_path / "noconfig", "--data", task / "data.npy", "-o", tmp_path / "x"
    )
    assert c == 2 and "no config.json" in err
    c, out, err = cli(
        "train",
        "--base",
        task / "base",
        "--data",
        task / "data.npy",
        "-o",
        tmp_path / "x",
        "--targets",
        "nothing_here",
    )
    assert (
        c == 2
        and "--targets nothing_here: matches no Linear, Conv, Embedding or Conv1D layer of the base" in err
    )
    # one misspelt target among good ones: refused, not an adapter trained without it
    argv = ["train", "--base", task / "base", "--data", task / "data.npy", "-o", tmp_path / "x"]
    c, out, err = cli(*argv, "--targets", "q_proj,v_prj")
    assert c == 2 and "--targets v_prj: matches no Linear" in err and "(the other targets match 2)" in err
    c, out, err = cli(*argv, "--targets", ",")
    assert c == 2 and "--targets is empty" in err
    assert not os.path.exists(tmp_path / "x")
    devices = [("gpu", "--device is auto or one of cuda, mps, cpu"), ("cuda:x", "not 'cuda:x'")]
    if not torch.cuda.is_available():
        devices.append(("cuda", "sees no CUDA device here"))
    for device, words in devices:
        c, out, err = cli(
            "train",
            "--base",
            task / "base",
            "--data",
            task / "data.npy",
            "-o",
            tmp_path / "x",
            "--device",
            device,
        )
        assert c == 2 and words in err and "internal error" not in err, err
    assert not (tmp_path / "x").exists()


def test_lora_layers_for_any_model():
    conv1d = transformers.pytorch_utils.Conv1D(12, 5)  # GPT-2: weight [in=5, out=12]
    net = torch.nn.ModuleDict(
        {
            "c2": torch.nn.Conv2d(3, 4, 3, padding=1),
            "c1": torch.nn.Conv1d(3, 4, 3),
            "emb": torch.nn.Embedding(10, 6),
            "gpt": conv1d,
            "lin": torch.nn.Linear(6, 2),
        }
    )
    names = lora.inject(net, ["c2", "c1", "emb", "gpt", "lin"], rank=2, alpha=4)
    assert sorted(names) == ["c1", "c2", "emb", "gpt", "lin"]
    assert {n for n, p in net.named_parameters() if p.requires_grad} == {
        f"{n}.lora_{x}" for n in names for x in "AB"
    }
    with torch.no_grad():
        for _, layer in lora.lora_layers(net):
            layer.lora_B.normal_()
    inputs = {
        "c2": torch.randn(1, 3, 5, 5),
        "c1": torch.randn(1, 3, 7),
        "emb": torch.tensor([[1, 7]]),
        "gpt": torch.randn(2, 5),
        "lin": torch.randn(2, 6),
    }
    with torch.no_grad():
        before = {n: net[n](x) for n, x in inputs.items()}
        lora.merge(net)
        for n, x in inputs.items():
            assert torch.allclose(net[n](x), before[n], atol=1e-5), n
    ad = lora.extract(net)
    assert ad.modules["gpt"].kind == "linear_t" and ad.modules["gpt"].shape == (5, 12)
    assert ad.modules["emb"].kind == "embedding" and ad.modules["c2"].shape == (4, 3, 3, 3)
    with pytest.raises(LorakitError, match="matches no Linear"):
        lora.inject(torch.nn.Sequential(torch.nn.ReLU()), "x")


def test_summary_says_held_out_before_and_after_and_when_training_hurt(task, tmp_path, cli):
    """The held-out loss of the base itself (every B zero) is measured first; the summary gives both, and a run that
    makes it worse (a learning rate far too high) says so in words."""
    args = (
        "train",
        "--base",
        task / "base",
        "--data",
        task / "data.npy",
        "--rank",
        2,
        "--batch",
        4,
        "--seq-len",
        16,
    )
    code, out, err = cli(*args, "--steps", 30, "--lr", 3e-3, "-o", tmp_path / "good.safetensors", "--quiet")
    assert code == 0, err
    held = out.split("held-out ")[1].split(",")[0]
    before, after = (float(x) for x in held.split(" -> "))
    assert after < before and "WORSE" not in out
    code, out, err = cli(*args, "--steps", 4, "--lr", 3.0, "-o", tmp_path / "bad.safetensors", "--quiet")
    assert code == 0, err
    assert "note: training made the held-out loss WORSE" in out and "a lower --lr than 3" in out


def test_text_records_prompt_completion_and_a_byte_order_mark(tmp_path, cli):
    """JSONL text and prompt + completion records through the base's tokenizer.json: the loss on the completion only
    (TRL's SFT default) with tokenizer_config.json's EOS appended as TRL does; a byte-order mark (Windows editors) is
    no part of the first record; chat 'messages' are refused with the way to give them."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from lorakit.training.data import load_data

    examples.write_llama_checkpoint(str(tmp_path / "b"))
    words = {w: i for i, w in enumerate(["<unk>", "</s>", "what", "is", "two", "four", "a", "b"])}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(["</s>"])  # id 1 already: special, so never split
    tokenizer.save(str(tmp_path / "b" / "tokenizer.json"))
    (tmp_path / "b" / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"}}))
    lines = ['{"text": "a b a"}', '{"prompt": "what is two", "completion": " four"}'] * 8
    (tmp_path / "d.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode())
    kind, records = load_data(tmp_path / "d.jsonl", 64, str(tmp_path / "b"))
    assert kind == "records" and len(records) == 16
    (ids, labels), (pids, plabels) = records[:2]
    assert ids.tolist() == labels.tolist() == [6, 7, 6]
    assert pids.tolist() == [2, 3, 4, 5, 1] and plabels.tolist() == [-100, -100, -100, 5, 1]
    (tmp_path / "t.txt").write_bytes(b"\xef\xbb\xbfa b")
    assert load_data(tmp_path / "t.txt", 64, str(tmp_path / "b"))[1].tolist() == [6, 7]
    argv = [
        "train",
        "--base",
        tmp_path / "b",
        "-o",
        tmp_path / "o.safetensors",
        "--steps",
        "1",
        "--seq-len",
        "8",
    ]
    code, out, err = cli(*argv, "--data", tmp_path / "d.jsonl", "-q")
    assert code == 0, err
    os.remove(tmp_path / "o.safetensors")
    (tmp_path / "c.jsonl").write_text('{"messages": [{"role": "user", "content": "a"}]}\n')
    code, out, err = cli(*argv, "--data", tmp_path / "c.jsonl")
    assert_one_line_error(code, out, err, "line 1: chat 'messages' need the model's chat template")
    (tmp_path / "p.jsonl").write_text('{"prompt": [{"role": "user", "content": "a"}], "completion": "b"}\n')
    code, out, err = cli(*argv, "--data", tmp_path / "p.jsonl")
    assert_one_line_error(code, out, err, "line 1: 'prompt' must be a string")
