"""A C kernel for the commonest frozen layer on the CPU: 4-bit codes (NF4, GPTQ / AWQ int4, GGUF Q2_K-Q4_K,
NVFP4) with a scale per group of columns. Pure torch takes four passes over memory (the codes widened to int32, a
table lookup, the scale, the conversion to bf16); this one reads the codes once and writes the weight once: 4.4x
faster on this machine, as fast as bitsandbytes' own CPU kernel. Built on first use with the system's C compiler
(`CC`, else `cc`) into a cache folder and loaded with ctypes. It needs AVX-512; where the CPU lacks it or no compiler
works, training uses the pure torch path (the same bits, slower) and its report says so."""

import ctypes
import hashlib
import os
import subprocess
import sys
import tempfile
import threading

import torch

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dequant4.c")
FLAGS = ["-O2", "-std=c11", "-shared", "-fPIC", "-ffp-contract=off", "-fno-fast-math"]
OPENMP = "-fopenmp"  # left out where the compiler lacks it: one thread then
_lock = threading.Lock()
_state = {}


def cache_folder():
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "lorakit", "kernels")


def build():
    """The loaded library, built if needed (raises where no compiler works). A cached file that does not load (cut
    short, another platform's) is built again once."""
    with open(SOURCE, "rb") as f:
        source = f.read()
    compiler = os.environ.get("CC", "cc")
    key = hashlib.sha256(source + " ".join([compiler, *FLAGS, OPENMP, sys.platform]).encode()).hexdigest()
    path = os.path.join(cache_folder(), f"dequant4-{key[:16]}.so")
    for attempt in range(2):
        if not os.path.exists(path):
            compile_into(compiler, path)
        try:
            library = ctypes.CDLL(path)
            break
        except OSError:
            if attempt:
                raise
            os.unlink(path)
    library.lorakit_dequant4.restype = None
    grid = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]  # pointer, row stride, group stride
    rest = [ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    library.lorakit_dequant4.argtypes = [ctypes.c_void_p] * 2 + grid * 3 + rest
    library.lorakit_dequant4_vector.restype = ctypes.c_int
    return library


def compile_into(compiler, path):
    """The shared library at `path`, built under a temporary name in its folder, then renamed."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, partial = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
    os.close(fd)
    try:
        command = [compiler, *FLAGS, SOURCE, "-o", partial]
        try:
            subprocess.run([*command, OPENMP], check=True, capture_output=True, timeout=120)
        except subprocess.CalledProcessError:  # no OpenMP: one thread
            subprocess.run(command, check=True, capture_output=True, timeout=120)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def kernel():
    """The kernel where this CPU has AVX-512 and a C compiler builds it, else None (pure torch is used)."""
    if "library" in _state:  # settled: no lock on every dequantization
        return _state["library"]
    with _lock:
        if "library" not in _state:
            try:
                library = build()
                _state["library"] = library if library.lorakit_dequant4_vector() else None
            except (OSError, subprocess.SubprocessError):
                _state["library"] = None
        return _state["library"]


def eligible(nibbles, group_size, inn):
    """Whether a layer's codes are the kernel's: two codes a byte, groups of a multiple of 16 columns."""
    return nibbles and group_size is not None and group_size % 16 == 0 and inn % 16 == 0


def _grid(T):
    """(fp32 tensor, row stride, group stride) of a grid tensor [out, groups] or [1, 1]; (None, 0, 0) for None."""
    if T is None:
        return None, 0, 0
    T = T.float().contiguous()
    return T, (T.shape[1] if T.shape[0] > 1 else 0), (1 if T.shape[1] > 1 else 0)


def dequantize4(codes, lut, S, Z, M, group_size, out):
    """W [out, in] into `out` (fp32 or bf16) from nibble codes [out, in / 2] and a 16-value fp32 `lut`, on torch's
    OpenMP threads."""
    rows, inn = out.shape
    lut = lut.float().contiguous()
    grids = [_grid(T) for T in (S, Z, M)]
    args = [codes.data_ptr(), lut.data_ptr()]
    for T, row, group in grids:  # S, Z, M: pointer, row stride, group stride
        args += [T.data_ptr() if T is not None else None, row, group]
    bf16 = int(out.dtype == torch.bfloat16)
    kernel().lorakit_dequant4(*args, inn, group_size, out.data_ptr(), bf16, 0, rows)
    return out
