"""A merge at the size where memory decides whether it runs at all: a generated >= 10 GB bf16 Llama-style
checkpoint (sharded, written tensor by tensor), a rank-16 all-linear adapter merged with `--max-memory 1GB`, side by
side with `cp -r` + `sync` of the same folder in the same run; the whole process's peak RSS (VmHWM) against the
limit. BENCH_GB (10), BENCH_ROUNDS (1), BENCH_MAX_MEMORY (1GB)."""

import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_merge import TARGETS, write_base  # noqa: E402
import bench_merge  # noqa: E402
from common import measure_command, measure_python, table  # noqa: E402

from lorakit import examples  # noqa: E402

GB = float(os.environ.get("BENCH_GB", 10))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", 1))
LIMIT = os.environ.get("BENCH_MAX_MEMORY", "1GB")
HIDDEN, INTERMEDIATE, VOCAB = 4096, 11008, 32000


def main():
    # layers of a Llama-7B-like shape until the checkpoint reaches BENCH_GB
    per_layer = 2 * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTERMEDIATE)
    layers = max(1, round((GB * 1e9 - 4 * VOCAB * HIDDEN) / per_layer))
    bench_merge.SIZE = dict(
        layers=layers, hidden=HIDDEN, intermediate=INTERMEDIATE, vocab=VOCAB, heads=32, kv_heads=32
    )
    work = tempfile.mkdtemp(prefix="lorakit-bench-large-", dir=os.environ.get("BENCH_WORK"))
    try:
        shapes, total = write_base(os.path.join(work, "base"))
        examples.random_adapter(shapes, targets=TARGETS, rank=16, alpha=32.0, magnitude=0.01).save(
            os.path.join(work, "all.safetensors")
        )
        rows = []
        for _ in range(ROUNDS):
            cp = measure_command(f"cp -r {work}/base {work}/out")
            shutil.rmtree(f"{work}/out")
            lk = measure_python(
                f"import lorakit; lorakit.merge({work + '/base'!r}, [{work + '/all.safetensors'!r}], "
                f"{work + '/out'!r}, quiet=True, max_memory={LIMIT!r})"
            )
            shutil.rmtree(f"{work}/out")
            rows += [
                ["cp -r + sync (I/O floor)", f"{cp.wall:.1f}", "1.00x", f"{cp.cpu:.1f}", f"{cp.rss:.0f}"],
                [
                    f"lorakit merge --max-memory {LIMIT}",
                    f"{lk.wall:.1f}",
                    f"{lk.wall / cp.wall:.2f}x",
                    f"{lk.cpu:.1f}",
                    f"{lk.rss:.0f}",
                ],
            ]
        table(
            f"merge a rank-16 all-linear adapter into a {total / 1e9:.1f} GB bf16 checkpoint ({layers} layers of "
            f"{HIDDEN} x {INTERMEDIATE}), {os.cpu_count()} CPUs",
            ["run", "wall s", "vs cp", "CPU s", "peak RSS MiB"],
            rows,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
