"""Convert a 1 GiB adapter between formats; each conversion next to a plain file copy of the same bytes."""
import os
import shutil
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import table, timed  # noqa: E402

import lorakit  # noqa: E402
from lorakit import examples  # noqa: E402

SIZE = dict(layers=32, hidden=4096, intermediate=11008, vocab=32000, heads=32, kv_heads=8)

with tempfile.TemporaryDirectory() as d:
    shapes = examples.llama_shapes(**SIZE)
    # rank 240 on all linear layers of a Llama-7B-shaped model in bf16: about 1 GiB
    ad = examples.random_adapter(shapes, targets=examples.LINEAR_TARGETS, rank=240, alpha=64.0,
                                 dtype=torch.bfloat16)
    src = os.path.join(d, "a.safetensors")
    ad.save(src)
    del ad
    size = os.path.getsize(src)
    t_copy, _ = timed(lambda: shutil.copyfile(src, os.path.join(d, "copy.safetensors")))
    rows = [["plain file copy", f"{t_copy:.2f}", "1.00x"]]
    steps = [("lorakit -> peft", src, "peft", "peft_out"), ("peft -> lorakit", "peft_out", "lorakit", "back.safetensors"),
             ("lorakit -> kohya", src, "kohya", "k.safetensors"),
             ("kohya -> lorakit", "k.safetensors", "lorakit", "k2.safetensors")]
    for label, inp, to, out in steps:
        inp = inp if os.path.isabs(inp) else os.path.join(d, inp)
        t, _ = timed(lambda: lorakit.convert(inp, os.path.join(d, out), to=to, force=True))
        rows.append([label, f"{t:.2f}", f"{t / t_copy:.2f}x"])
    table(f"convert a {size / 2 ** 30:.2f} GiB bf16 adapter (Llama-7B shapes, rank 240, all linear)",
          ["conversion", "seconds", "vs copy"], rows)
