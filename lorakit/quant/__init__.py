"""Quantized BASE checkpoints: a registry of formats (each one file implementing lorakit.quant.base.QuantFormat),
detection, and the strategies that put W + dW back on a grid (bases read them through lorakit.bases). Adding a format: a file here with its QuantFormat class, and its row in FORMATS.

Torch-free at import: the CLI takes the strategy choices from here.
"""

import importlib

from ..errors import LorakitError
from . import ct_config

# name -> (module in this package, class, what it reads). Detection tries them in this order.
FORMATS = {
    "gptq": (
        "gptq_awq",
        "GPTQ",
        "GPTQ 2/4/8 bits, groups, sym/asym, v1 (z-1) and v2 zero points, desc_act g_idx",
    ),
    "awq": ("gptq_awq", "AWQ", "AWQ GEMM int4 with its interleaved packing"),
    "fp8-block": (
        "fp8",
        "FP8Block",
        "FP8 E4M3 in blocks: DeepSeek-V3 (weight_scale_inv), compressed-tensors FP8_BLOCK (weight_scale)",
    ),
    "mxfp8": ("mxfp8", "MXFP8", "MXFP8 (compressed-tensors mxfp8-quantized: E4M3, E8M0 scales per 32)"),
    "fp8": ("fp8", "FP8Channel", "FP8 E4M3 per tensor / per channel (compressed-tensors, FBGEMM)"),
    "int8": ("int8", "Int8Channel", "INT8 per channel (compressed-tensors weight_scale; bitsandbytes SCB)"),
    "ct-int": (
        "ct_packed",
        "CTPacked",
        "compressed-tensors pack-quantized INT2/4/8 (llm-compressor W4A16, W4A16_ASYM, W8A16): groups or "
        "channels, sym / asym, g_idx",
    ),
    "nvfp4": (
        "nvfp4",
        "NVFP4",
        "NVFP4 (E2M1, E4M3 scales per 16, FP32 per tensor): compressed-tensors nvfp4-pack-quantized, ModelOpt",
    ),
    "nf4": ("nf4", "NF4", "bitsandbytes NF4 with and without double quantization"),
    "mxfp4": ("mxfp4", "MXFP4", "MXFP4 (OCP microscaling FP4 E2M1, E8M0 scales per 32): gpt-oss' experts"),
    "gguf": (
        "gguf",
        "GGUFBlocks",
        "llama.cpp GGUF files (found by their container): Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, "
        "Q2_K..Q6_K kept; other types read (gguf package), merged ones written in --dtype",
    ),
}

# how W + dW goes back onto a grid (lorakit.quant.requant); the first is the default
STRATEGIES = {
    "auto": "per module, the candidate whose output error against W + dW is smallest on probes (random inputs, the "
    "adapter's inputs; the layer's own with --calibration), measured on a sample of its rows: keep the old codes "
    "(the adapter dropped there), same-grid, refit, rescale, stochastic (gptq with --calibration); never further "
    "from W + dW than the old codes",
    "feedback": "the old grid; columns rounded in order, each column's error carried into the next ones so that the "
    "error seen through the adapter's input subspace stays near zero (GPTQ-style, low-rank A^T A)",
    "same-grid": "the old grid, nearest code (PEFT's bitsandbytes merge): small deltas round straight back",
    "stochastic": "the old grid, unbiased random rounding (--seed)",
    "rescale": "fresh scales / zero points fitted to W_deq + dW, then nearest",
    "refit": "the old grid, nearest code; where W_deq + dW leaves a block's range, scales refitted to cover both "
    "(never clipped)",
    "original": "quantize W + dW afresh from --full-precision-base",
    "gptq": "the old grid, columns rounded in order with GPTQ's update from the Hessian of the layer's inputs on "
    "--calibration data (a clipped weight's error spread over later columns like any other)",
}


def score(row):
    """What auto minimizes: the squared output error relative to the adapter's own, ||E x||^2 / ||dW x||^2, on the
    layer's own inputs where calibration data measured them, else the mean over random inputs and the adapter's
    inputs; keeping the codes scores 1."""
    if row.get("probe_error_calibration") is not None:
        return row["probe_error_calibration"] ** 2
    return (row["probe_error_random"] ** 2 + row["probe_error_aligned"] ** 2) / 2


# tensor name endings that only quantized checkpoints have: refused when no format claims them
QUANT_NAMES = (
    ".qweight",
    ".qzeros",
    ".scales",
    ".g_idx",
    ".weight_scale",
    ".weight_scale_inv",
    ".SCB",
    ".absmax",
    ".quant_map",
    ".nested_absmax",
    ".quant_state",
    ".weight_packed",
    ".weight_zero_point",
    ".weight_global_scale",
    ".weight_scale_2",
    ".weight_shape",
)


def format_class(name):
    module, cls, _ = FORMATS[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def quantization_config(config, older, path, modelopt=None):
    """config.json's quantization_config (`config`: the parsed config.json or None), else quantize_config.json
    (`older`: older GPTQ files, parsed, or None), else ModelOpt's hf_quant_config.json (`modelopt`, parsed, or None),
    else {}. `path` names the file in errors."""
    qconfig = (config or {}).get("quantization_config")
    if qconfig is None and older is not None:
        qconfig = {"quant_method": "gptq", **older}
    if qconfig is None and isinstance(modelopt, dict):
        quantization = modelopt.get("quantization")
        qconfig = {"quant_method": "modelopt", **(quantization if isinstance(quantization, dict) else {})}
    if qconfig is None:
        qconfig = {}
    if not isinstance(qconfig, dict):
        raise LorakitError("quantization_config must be a JSON object", path=path)
    return qconfig


def check_claimed(fmt, ckpt, found, base):
    """Every stored tensor named as quantized checkpoints name theirs belongs to a module the format found: a module
    missing one of its tensors (or stored otherwise than the others) is refused, not read as plain weights."""
    members = {t for m in found.values() for t in fmt.members(ckpt, m)}
    stray = next((n for n in ckpt.where if n.endswith(QUANT_NAMES) and n not in members), None)
    if stray is not None:
        raise LorakitError(
            f"a {fmt.name} checkpoint whose tensor '{stray}' belongs to no complete {fmt.name} module (a tensor of "
            "the module missing, or of another dtype): refusing to treat it as a weight",
            path=ckpt.where.get(stray, base),
        )


def detect(ckpt, q, base):
    """(format, {module: {role: tensor}}) of a quantized checkpoint (`q`: its quantization_config), (None, {}) for
    a full-precision one. Unknown quantized layouts are refused rather than treated as weights."""
    claimed = False
    for name in FORMATS:
        try:
            fmt = format_class(name).configure(q)
        except LorakitError as e:
            raise LorakitError(str(e), path=base) from None
        if fmt is None:
            continue
        claimed = True
        found = fmt.find(ckpt)
        if found:
            if ct_config.is_compressed_tensors(q):
                ct_config.check_ignored(q, ckpt, found)
            check_claimed(fmt, ckpt, found, base)
            return fmt, found
    if not claimed:
        raise LorakitError(
            f"quantization method '{q.get('quant_method')}' is not supported (lorakit merges into fp8, fbgemm_fp8, "
            "compressed-tensors, gptq, awq, bitsandbytes, modelopt, mxfp4 and GGUF checkpoints): merge into the "
            "full-precision checkpoint it was quantized from",
            path=base,
        )
    example = next((n for n in ckpt.where if n.endswith(QUANT_NAMES)), None)
    if example is not None:
        raise LorakitError(
            f"unknown quantized layout (e.g. tensor '{example}'): refusing to treat packed values as weights",
            path=base,
        )
    return None, {}
