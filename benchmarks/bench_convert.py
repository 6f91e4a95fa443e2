"""Convert a 1 GiB adapter between formats; each conversion next to a plain copy of the same bytes. Everything runs in
a fresh process and is timed until its output is on disk (cp + sync; lorakit's import included), two rounds
interleaved."""

import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import measure_command, measure_python, table  # noqa: E402

from lorakit import examples  # noqa: E402

SIZE = dict(layers=32, hidden=4096, intermediate=11008, vocab=32000, heads=32, kv_heads=8)
STEPS = [
    ("lorakit -> peft", "a.safetensors", "peft", "peft_out"),
    ("peft -> lorakit", "peft_out", "lorakit", "back.safetensors"),
    ("lorakit -> kohya", "a.safetensors", "kohya", "k.safetensors"),
    ("kohya -> lorakit", "k.safetensors", "lorakit", "k2.safetensors"),
]

with tempfile.TemporaryDirectory() as d:
    shapes = examples.llama_shapes(**SIZE)
    # rank 240 on all linear layers of a Llama-7B-shaped model in bf16: about 1 GiB
    ad = examples.random_adapter(
        shapes, targets=examples.LINEAR_TARGETS, rank=240, alpha=64.0, dtype=torch.bfloat16
    )
    src = os.path.join(d, "a.safetensors")
    ad.save(src)
    del ad
    size = os.path.getsize(src)
    times = {label: [] for label in ["plain copy (cp + sync)"] + [s[0] for s in STEPS]}
    for _ in range(2):
        times["plain copy (cp + sync)"].append(measure_command(f"cp {src} {d}/copy.safetensors")[0])
        for label, inp, to, out in STEPS:
            code = (
                f"import lorakit; lorakit.convert({os.path.join(d, inp)!r}, {os.path.join(d, out)!r}, to={to!r}, "
                "force=True)"
            )
            times[label].append(measure_python(code)[0])
    t_copy = min(times["plain copy (cp + sync)"])
    rows = [
        [label, " / ".join(f"{t:.2f}" for t in ts), f"{min(ts) / t_copy:.2f}x"] for label, ts in times.items()
    ]
    table(
        f"convert a {size / 2**30:.2f} GiB bf16 adapter (Llama-7B shapes, rank 240, all linear), 2 rounds",
        ["conversion", "seconds (round 1 / 2)", "best vs copy"],
        rows,
    )
