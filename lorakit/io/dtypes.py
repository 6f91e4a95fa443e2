"""THE dtype table: safetensors dtype names, their sizes, torch dtypes and the names users pass to --dtype.

Torch-free at import (header-only work and `--help` never import torch); torch dtypes are looked up on use.
"""

from ..errors import LorakitError

# safetensors dtype name -> (bytes per element, torch dtype attribute)
DTYPES = {
    "F64": (8, "float64"),
    "F32": (4, "float32"),
    "F16": (2, "float16"),
    "BF16": (2, "bfloat16"),
    "F8_E4M3": (1, "float8_e4m3fn"),
    "F8_E5M2": (1, "float8_e5m2"),
    "F8_E8M0": (1, "float8_e8m0fnu"),
    "I64": (8, "int64"),
    "I32": (4, "int32"),
    "I16": (2, "int16"),
    "I8": (1, "int8"),
    "U8": (1, "uint8"),
    "U16": (2, "uint16"),
    "U32": (4, "uint32"),
    "U64": (8, "uint64"),
    "BOOL": (1, "bool"),
}
# dtypes packed below a byte (microscaling formats): bits per element; they are copied as bytes, never computed
PACKED_BITS = {"F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
# what --dtype accepts: the short names (the choices shown) and their usual aliases -> safetensors name
USER_DTYPES = {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}
ALIASES = {
    "float32": "fp32",
    "float": "fp32",
    "f32": "fp32",
    "float16": "fp16",
    "half": "fp16",
    "f16": "fp16",
    "bfloat16": "bf16",
}
# floating dtypes an adapter's factors may have (the spec's rule, LK103): the --dtype choices
FACTOR_DTYPES = tuple(USER_DTYPES.values())


def itemsize(st_name):
    return DTYPES[st_name][0]


def nbytes(st_name, numel):
    """Bytes of `numel` elements of a known dtype (packed ones included), or None for a dtype this table lacks."""
    if st_name in DTYPES:
        return DTYPES[st_name][0] * numel
    if st_name in PACKED_BITS and numel * PACKED_BITS[st_name] % 8 == 0:
        return numel * PACKED_BITS[st_name] // 8
    return None


def torch_dtype(st_name):
    import torch

    return getattr(torch, DTYPES[st_name][1])


def st_dtype(dtype):
    """torch dtype -> safetensors name."""
    name = str(dtype).removeprefix("torch.")
    for st, (_, attr) in DTYPES.items():
        if attr == name:
            return st
    raise KeyError(dtype)


def dtype_name(dtype):
    """torch dtype -> 'bfloat16' (config.json's and reports' spelling)."""
    return str(dtype).removeprefix("torch.")


def user_dtype(name):
    """A --dtype value ('bf16', 'bfloat16', ...) -> torch dtype; None for None."""
    if name is None:
        return None
    key = ALIASES.get(str(name).lower(), str(name).lower())
    if key not in USER_DTYPES:
        raise LorakitError(
            f"unknown dtype '{name}' (choose from {', '.join(USER_DTYPES)}; aliases {', '.join(ALIASES)})"
        )
    return torch_dtype(USER_DTYPES[key])
