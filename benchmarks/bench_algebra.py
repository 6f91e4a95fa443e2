"""resize and svd-combine of 4096 x 4096 rank-64 modules: lorakit (factors) against the dense approach of PEFT and
sd-scripts (form dW, torch.linalg.svd) in the same run. Goal: >= 50x faster, same result to 1e-5 relative."""

import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import table, timed  # noqa: E402

import lorakit  # noqa: E402
from lorakit.core import Adapter, Module  # noqa: E402

N, RANK, MODULES, NEW_RANK = 4096, 64, int(os.environ.get("BENCH_MODULES", 2)), 32


def make(path, seed):
    g = torch.Generator().manual_seed(seed)
    ad = Adapter()
    for i in range(MODULES):
        # a decaying spectrum, like trained adapters
        decay = torch.logspace(0, -2, RANK)
        ad.add(
            Module(
                f"model.layers.{i}.self_attn.q_proj",
                torch.randn(RANK, N, generator=g) / N**0.5,
                torch.randn(N, RANK, generator=g) * decay,
                alpha=16.0,
            )
        )
    ad.save(path)
    return ad


def dense_truncate(D, k):
    U, S, Vh = torch.linalg.svd(D, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


with tempfile.TemporaryDirectory() as d:
    pa, pb = os.path.join(d, "a.safetensors"), os.path.join(d, "b.safetensors")
    a, b = make(pa, 0), make(pb, 1)
    torch.set_num_threads(os.cpu_count())

    t_lk, _ = timed(
        lambda: lorakit.resize(pa, os.path.join(d, "r.safetensors"), rank=NEW_RANK, force=True, quiet=True)
    )
    t_dense, dense = timed(lambda: [dense_truncate(m.delta(), NEW_RANK) for m in a.modules.values()])
    r = lorakit.load(os.path.join(d, "r.safetensors"))
    diff_resize = max(rel(r.modules[n].delta(), x) for n, x in zip(a.modules, dense))

    t_lk2, _ = timed(
        lambda: lorakit.combine(
            [pa + ":0.6", pb + ":-0.4"],
            os.path.join(d, "c.safetensors"),
            method="svd",
            rank=RANK,
            force=True,
            quiet=True,
        )
    )
    t_dense2, dense2 = timed(
        lambda: [
            dense_truncate(0.6 * a.modules[n].delta() - 0.4 * b.modules[n].delta(), RANK) for n in a.modules
        ]
    )
    c = lorakit.load(os.path.join(d, "c.safetensors"))
    diff_combine = max(rel(c.modules[n].delta(), x) for n, x in zip(a.modules, dense2))

    table(
        f"{MODULES} modules of {N} x {N}, rank {RANK}; {torch.get_num_threads()} threads",
        ["operation", "lorakit s", "dense SVD s (PEFT / sd-scripts)", "speed-up", "max rel. difference"],
        [
            [
                f"resize to rank {NEW_RANK}",
                f"{t_lk:.3f}",
                f"{t_dense:.2f}",
                f"{t_dense / t_lk:.0f}x",
                f"{diff_resize:.1e}",
            ],
            [
                f"svd combine (0.6, -0.4) to rank {RANK}",
                f"{t_lk2:.3f}",
                f"{t_dense2:.2f}",
                f"{t_dense2 / t_lk2:.0f}x",
                f"{diff_combine:.1e}",
            ],
        ],
    )
