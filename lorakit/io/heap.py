"""The C heap during a requantizing merge: freed blocks are kept for the next ones, not given back to the OS.

Requantization allocates and frees the same few block sizes (megabytes each) thousands of times, from two or more
threads. With glibc's defaults (a sliding mmap threshold from 128 KiB, the heap's top trimmed above twice it), many of
them still come fresh from the OS, at a page fault per 4 KiB: an FP8 feedback merge of 405M parameters took 560k minor
faults (1.7 s of system time) with them, 160k (1.0 s) with these settings.

- Memory stays bounded by what is in flight, plus up to 128 MiB kept free.
- When the merge ends, the defaults are back and the heap is trimmed. The mmap threshold stays fixed at 128 KiB:
  glibc has no way back to its sliding threshold.
- M_ARENA_MAX is not used: it would stay for the rest of the process.
- Full-precision merges are left alone. Their modules are single temporaries of 100+ MB, mmapped either way. Measured on
  4096 x 11008 FP8 -> bf16, they gain ~5% and hold ~0.35 GB more.
- With a libc other than glibc, nothing is done.
"""

import contextlib
import ctypes

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
DEFAULTS = {M_TRIM_THRESHOLD: 128 << 10, M_TOP_PAD: 128 << 10, M_MMAP_THRESHOLD: 128 << 10}  # mallopt(3)
# blocks (<= 8 MB) come from the heap; a whole module's codes or fp32 copy (45 MB and up) are still mmapped, and
# go back to the OS as soon as they are freed
RETAINING = {M_TRIM_THRESHOLD: 128 << 20, M_TOP_PAD: 16 << 20, M_MMAP_THRESHOLD: 32 << 20}


def glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 (glibc, not another libc.so.6)
        return libc
    except (OSError, AttributeError):
        return None


@contextlib.contextmanager
def retained_heap(enabled=True):
    libc = glibc() if enabled else None
    if libc is None:
        yield
        return
    for param, value in RETAINING.items():
        libc.mallopt(param, value)
    try:
        yield
    finally:
        for param, value in DEFAULTS.items():
            libc.mallopt(param, value)
        libc.malloc_trim(0)
