"""Quantize a Hugging Face folder with the real llm-compressor (RTN / min-max, no calibration), for the benchmarks'
compressed-tensors bases and their requantize anchors. Runs in llm-compressor's own venv (LLMC_PYTHON):

    $LLMC_PYTHON benchmarks/llmc_quantize.py SRC OUT '{"scheme": "NVFP4A16"}'

The JSON holds QuantizationModifier's arguments; lm_head stays unquantized as people leave it."""

import json
import sys

import torch
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
from transformers import AutoModelForCausalLM

src, out, arguments = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
oneshot(model=model, recipe=QuantizationModifier(targets="Linear", **{"ignore": ["lm_head"], **arguments}))
model.save_pretrained(out, save_compressed=True)
