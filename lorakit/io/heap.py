"""The C heap during a merge: freed blocks are kept for the next ones instead of going back to the OS.

A merge allocates and frees the same few sizes of block (megabytes each) thousands of times. glibc's defaults hand
each one back to the OS (mmap above 128 KiB, trimming the top of the heap), so every fresh block costs a page fault
per 4 KiB, about 1 ms a 4 MB block: as much as the arithmetic on it. Memory stays bounded by what is in flight (plus
128 MiB kept free), and the defaults are back, the heap trimmed, when the merge ends. (Elsewhere than glibc: nothing
to do.) Requantization only, whose blocks are a few MB: full-precision modules are single temporaries above glibc's
32 MiB ceiling, which gain ~5% and keep ~0.35 GB more (4096 x 11008 FP8 -> bf16, measured).
"""
import contextlib
import ctypes

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
DEFAULTS = {M_TRIM_THRESHOLD: 128 << 10, M_TOP_PAD: 128 << 10, M_MMAP_THRESHOLD: 128 << 10}  # mallopt(3)
RETAINING = {M_TRIM_THRESHOLD: 128 << 20, M_TOP_PAD: 16 << 20, M_MMAP_THRESHOLD: 32 << 20}  # 32 MiB: glibc's most


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
