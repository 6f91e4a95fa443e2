"""MLX LM adapters against the real mlx-lm (its CPU build, a test extra): an adapter mlx-lm made is read, converted
to PEFT and merged to the logits mlx-lm computes with it; one lorakit writes is loaded by mlx-lm's load_adapters to
the logits of the PEFT adapter it came from. MLX runs in a child process (its own framework beside torch)."""

import json
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import peft
import pytest
import torch
import transformers

import lorakit
from lorakit import examples

from conftest import assert_one_line_error

IDS = [[1, 50, 20, 42, 7, 90, 33, 12]]

# mlx-lm: the tiny Llama (Hugging Face folder), optionally an adapter made here (rank 4, scale 3, on the last two
# layers' q / v / down, lora_b drawn) or loaded from a folder; saves the logits
MLX_RUN = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    import numpy as np
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.utils import load_model
    from mlx_lm.tuner.utils import linear_to_lora_layers, load_adapters
    base, mode, adapter, out = sys.argv[1:5]
    model, _ = load_model(Path(base))
    if mode in ("lora", "dora", "embed"):
        model.freeze()
        keys = ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"] if mode != "embed" else ["model.embed_tokens", "self_attn.q_proj"]
        params = {"rank": 4, "scale": 3.0, "dropout": 0.0, "keys": keys}
        linear_to_lora_layers(model, 2, params, use_dora=mode == "dora")
        mx.random.seed(0)
        drawn = [(n, mx.random.normal(p.shape) * 0.05) for n, p in tree_flatten(model.trainable_parameters())
                 if n.endswith("lora_b")]
        drawn += [(n, p * (1 + 0.1 * mx.random.normal(p.shape))) for n, p in tree_flatten(model.trainable_parameters())
                  if n.endswith(".m")]
        model.update(tree_unflatten(drawn))
        os.makedirs(adapter)
        mx.save_safetensors(os.path.join(adapter, "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
        config = {"fine_tune_type": "dora" if mode == "dora" else "lora", "num_layers": 2, "lora_parameters": params}
        json.dump(config, open(os.path.join(adapter, "adapter_config.json"), "w"))
    elif mode == "load":
        load_adapters(model, adapter)
    np.save(out, np.array(model(mx.array(%s)).astype(mx.float32)))
    """
    % IDS
)


def mlx_logits(base, mode, adapter, out):
    code = subprocess.run(
        [sys.executable, "-c", MLX_RUN, str(base), mode, str(adapter), str(out)],
        capture_output=True,
        text=True,
    )
    assert code.returncode == 0, code.stderr[-2000:]
    return torch.from_numpy(np.load(out)).double()


def torch_logits(base, adapter=None):
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        model = transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
        if adapter is not None:
            model = peft.PeftModel.from_pretrained(model, adapter)
        return model(torch.tensor(IDS)).logits.double()


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_an_adapter_mlx_lm_made_reads_converts_and_merges_exactly(tmp_path, cli, kind):
    """mlx-lm's LoRA and DoRA (its magnitudes m drawn too) on the last two layers: PEFT with the converted folder
    and the merged checkpoint give mlx-lm's logits."""
    base = tmp_path / "base"
    examples.write_llama_checkpoint(str(base))
    floor = (mlx_logits(base, "base", "-", tmp_path / "b.npy") - torch_logits(base)).abs().max()
    want = mlx_logits(base, kind, tmp_path / "mlx", tmp_path / "a.npy")
    ad = lorakit.load(tmp_path / "mlx")
    assert (
        ad.source_format == "mlx" and len(ad.modules) == 6 and {m.scale for m in ad.modules.values()} == {3.0}
    )
    assert all((m.magnitude is not None) == (kind == "dora") for m in ad.modules.values())
    assert cli("convert", tmp_path / "mlx", "-o", tmp_path / "peft", "--to", "peft", "-q")[0] == 0
    assert cli("merge", base, tmp_path / "mlx", "-o", tmp_path / "merged", "-q")[0] == 0
    effect = (want - torch_logits(base)).abs().max()
    for got in (torch_logits(base, tmp_path / "peft"), torch_logits(tmp_path / "merged")):
        assert (got - want).abs().max() < 2 * floor + 1e-5 and effect > 100 * floor


def test_an_adapter_lorakit_writes_loads_in_mlx_lm(tmp_path, cli):
    """A PEFT adapter with two ranks and two scales (rank_pattern / alpha_pattern): mlx-lm takes one rank and one
    scale, so the writer pads ranks with zeros and folds scales into lora_b; mlx-lm's logits equal PEFT's."""
    base = tmp_path / "base"
    examples.write_llama_checkpoint(str(base))
    model = transformers.LlamaForCausalLM.from_pretrained(base)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "down_proj"],
        rank_pattern={"down_proj": 2},
        alpha_pattern={"down_proj": 3},
        init_lora_weights=False,
    )
    peft.get_peft_model(model, config).save_pretrained(tmp_path / "peft")
    code, out, err = cli("convert", tmp_path / "peft", "-o", tmp_path / "mlx", "--to", "mlx")
    assert code == 0 and "folded into B" in out, err
    written = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    assert written["num_layers"] == -1 and written["lora_parameters"]["rank"] == 4
    want = torch_logits(base, tmp_path / "peft")
    floor = (mlx_logits(base, "base", "-", tmp_path / "b.npy") - torch_logits(base)).abs().max()
    got = mlx_logits(base, "load", tmp_path / "mlx", tmp_path / "a.npy")
    assert (got - want).abs().max() < 2 * floor + 1e-5 and (
        want - torch_logits(base)
    ).abs().max() > 100 * floor
    # what mlx-lm's LoRA layers cannot hold is refused by name, never dropped
    ad = lorakit.load(tmp_path / "peft")
    ad.replacements["lm_head.weight"] = torch.zeros(2, 2)
    ad.save(tmp_path / "full.safetensors")
    code, out, err = cli("convert", tmp_path / "full.safetensors", "-o", tmp_path / "x", "--to", "mlx")
    assert_one_line_error(code, out, err, "MLX adapters hold no full tensors (lm_head.weight)")
    assert not os.path.exists(tmp_path / "x")


@pytest.mark.parametrize(
    "corrupt, fragment",
    [
        (lambda c, t: c["lora_parameters"].pop("scale"), "lora_parameters has no 'scale'"),
        (
            lambda c, t: c["lora_parameters"].update(scale="20"),
            "lora_parameters 'scale' must be a number, got '20'",
        ),
        (
            lambda c, t: c["lora_parameters"].update(rank=5),
            "rank 4 but adapter_config.json's lora_parameters gives rank 5",
        ),
        (lambda c, t: t.pop(next(k for k in sorted(t) if k.endswith("lora_b"))), "has lora_a but no lora_b"),
        (lambda c, t: t.update(x=torch.ones(2)), "1 unknown keys: x"),
        (lambda c, t: c.update(fine_tune_type="full"), "fine_tune_type 'full' holds no adapter"),
    ],
)
def test_broken_mlx_folders_are_one_line_errors(tmp_path, cli, corrupt, fragment):
    from safetensors.torch import load_file, save_file

    ad = lorakit.core.Adapter()
    ad.add(
        lorakit.core.Module(
            "model.layers.0.self_attn.q_proj", torch.randn(4, 8), torch.randn(8, 4), alpha=8.0
        )
    )
    ad.save(tmp_path / "a.safetensors")
    assert cli("convert", tmp_path / "a.safetensors", "-o", tmp_path / "m", "--to", "mlx")[0] == 0
    config = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    tensors = load_file(tmp_path / "m" / "adapters.safetensors")
    corrupt(config, tensors)
    (tmp_path / "m" / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, tmp_path / "m" / "adapters.safetensors")
    assert_one_line_error(*cli("inspect", tmp_path / "m"), fragment)
    assert cli("validate", tmp_path / "m")[0] == 1


def test_an_mlx_folder_round_trips_to_the_same_tensors(tmp_path, cli):
    """mlx -> mlx: lora_a / lora_b byte for byte (read transposed, written back), the scale and rank kept."""
    from safetensors.torch import load_file, save_file

    os.makedirs(tmp_path / "m")
    g = torch.Generator().manual_seed(0)
    tensors = {
        "model.layers.3.self_attn.q_proj.lora_a": torch.randn(16, 4, generator=g),
        "model.layers.3.self_attn.q_proj.lora_b": torch.randn(4, 16, generator=g),
        "model.embed_tokens.lora_a": torch.randn(32, 4, generator=g),
        "model.embed_tokens.lora_b": torch.randn(4, 16, generator=g),
    }
    save_file(tensors, tmp_path / "m" / "adapters.safetensors")
    config = {
        "fine_tune_type": "lora",
        "num_layers": 2,
        "lora_parameters": {"rank": 4, "scale": 7.5, "dropout": 0.0},
    }
    (tmp_path / "m" / "adapter_config.json").write_text(json.dumps(config))
    assert cli("convert", tmp_path / "m", "-o", tmp_path / "back", "--to", "mlx", "-q")[0] == 0
    back = load_file(tmp_path / "back" / "adapters.safetensors")
    assert back.keys() == tensors.keys()
    assert all(back[k].numpy().tobytes() == tensors[k].numpy().tobytes() for k in tensors)
    params = json.loads((tmp_path / "back" / "adapter_config.json").read_text())["lora_parameters"]
    assert (params["rank"], params["scale"], params["keys"]) == (
        4,
        7.5,
        ["model.embed_tokens", "self_attn.q_proj"],
    )
    # the embedding's delta is scale * lora_a @ lora_b, in the embedding's own [num, dim] layout
    emb = lorakit.load(tmp_path / "m").modules["model.embed_tokens"]
    want = 7.5 * tensors["model.embed_tokens.lora_a"].double() @ tensors["model.embed_tokens.lora_b"].double()
    assert emb.kind == "embedding" and torch.allclose(emb.delta(torch.float64), want, rtol=0, atol=1e-12)


def test_train_writes_an_mlx_folder_mlx_lm_loads(tmp_path, cli):
    """train --format mlx: the same factors as --format peft from the same run, and mlx-lm's logits with the folder
    equal PEFT's with its twin."""
    base = tmp_path / "base"
    examples.write_llama_checkpoint(str(base))
    np.save(tmp_path / "d.npy", np.arange(3000) % 200)
    for fmt in ("peft", "mlx"):
        argv = ["train", "--base", base, "--data", tmp_path / "d.npy", "-o", tmp_path / fmt, "--format", fmt]
        code, out, err = cli(*argv, "--steps", "3", "--seq-len", "16", "--lr", "0.01", "-q")
        assert code == 0, err
    peft_ad, mlx_ad = lorakit.load(tmp_path / "peft"), lorakit.load(tmp_path / "mlx")
    assert mlx_ad.modules.keys() == peft_ad.modules.keys()
    for name, m in peft_ad.modules.items():
        assert torch.equal(mlx_ad.modules[name].delta(torch.float64), m.delta(torch.float64)), name
    floor = (mlx_logits(base, "base", "-", tmp_path / "b.npy") - torch_logits(base)).abs().max()
    want = torch_logits(base, tmp_path / "peft")
    got = mlx_logits(base, "load", tmp_path / "mlx", tmp_path / "a.npy")
    assert (got - want).abs().max() < 2 * floor + 1e-5 and (
        want - torch_logits(base)
    ).abs().max() > 10 * floor


def test_an_embedding_lora_on_a_tied_model_changes_the_head_too_as_mlx_lm_computes_it(tmp_path, cli):
    """mlx-lm computes a tied model's head as its embedding, LoRA included: read with the base, its embedding LoRA is
    the same LoRA on lm_head, so the merged model stays tied and gives mlx-lm's logits (merged as the embedding's
    alone, it did not). Written back for that base, the head's twin is dropped; an embedding LoRA alone (PEFT without
    ensure_weight_tying) is refused, since mlx-lm would apply it to the head too."""
    base = tmp_path / "base"
    examples.write_llama_checkpoint(str(base), tie=True)
    floor = (mlx_logits(base, "base", "-", tmp_path / "b.npy") - torch_logits(base)).abs().max()
    want = mlx_logits(base, "embed", tmp_path / "mlx", tmp_path / "a.npy")
    code, out, err = cli("merge", base, tmp_path / "mlx", "-o", tmp_path / "merged", "-q")
    assert code == 0, err
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is True
    got = torch_logits(tmp_path / "merged")
    assert (got - want).abs().max() < 2 * floor + 1e-5 and (
        want - torch_logits(base)
    ).abs().max() > 100 * floor
    code, out, err = cli(
        "convert", tmp_path / "mlx", "-o", tmp_path / "back", "--to", "mlx", "--base", base, "-q"
    )
    assert code == 0, err
    assert "lm_head.lora_a" not in json.dumps(
        list(lorakit.io.read_header(tmp_path / "back" / "adapters.safetensors").entries)
    )
    assert mlx_logits(base, "load", tmp_path / "back", tmp_path / "c.npy").allclose(want, rtol=0, atol=1e-6)
    ad = lorakit.load(tmp_path / "mlx")  # no base: the embedding's LoRA alone
    ad.save(tmp_path / "alone.safetensors")
    code, out, err = cli(
        "convert", tmp_path / "alone.safetensors", "-o", tmp_path / "x", "--to", "mlx", "--base", base
    )
    assert_one_line_error(
        code, out, err, "the base ties its embeddings, and mlx-lm applies an embedding LoRA to the"
    )
