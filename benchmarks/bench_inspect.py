"""inspect reads only the header: a 1 GiB adapter against reading its bytes (safetensors load_file) in one run."""

import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import table, timed  # noqa: E402

from lorakit import inspect  # noqa: E402
from lorakit.core import Adapter, Module  # noqa: E402

with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "big.safetensors")
    ad = Adapter()
    # 128 modules of 4096 x 4096 at rank 256, fp32: 128 * 2 * 256 * 4096 * 4 B = 1 GiB
    for i in range(128):
        ad.add(
            Module(
                f"model.layers.{i // 4}.self_attn.{'qkvo'[i % 4]}_proj",
                torch.empty(256, 4096).normal_(),
                torch.empty(4096, 256).normal_(),
                alpha=16.0,
            )
        )
    ad.save(path)
    del ad
    size = os.path.getsize(path)
    os.system("sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null")
    t_inspect, r = timed(lambda: inspect(path), repeat=3)
    from safetensors.torch import load_file

    t_load, _ = timed(lambda: load_file(path), repeat=1)
    t_read, _ = timed(lambda: open(path, "rb").read(), repeat=1)
    table(
        f"inspect a {size / 2**30:.2f} GiB adapter ({r['module_count']} modules)",
        ["what", "seconds", "vs safetensors.load_file"],
        [
            ["lorakit inspect (header only)", f"{t_inspect:.3f}", f"{t_inspect / t_load:.4f}x"],
            ["safetensors load_file", f"{t_load:.3f}", "1x"],
            ["read all bytes (open().read())", f"{t_read:.3f}", f"{t_read / t_load:.2f}x"],
        ],
    )
