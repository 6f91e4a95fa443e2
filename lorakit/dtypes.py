"""The one mapping between safetensors dtype names, user-facing names and torch dtypes."""
import torch

_ST_TO_TORCH = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
}
_TORCH_TO_ST = {v: k for k, v in _ST_TO_TORCH.items()}
# names a user may pass to --dtype
USER_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
               "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def torch_dtype(st_name):
    return _ST_TO_TORCH[st_name]


def st_dtype(dtype):
    return _TORCH_TO_ST[dtype]


def user_dtype(name):
    from .errors import LorakitError
    if name is None:
        return None
    try:
        return USER_DTYPES[name.lower()]
    except KeyError:
        raise LorakitError(f"unknown dtype '{name}' (choose from fp32, fp16, bf16)") from None
