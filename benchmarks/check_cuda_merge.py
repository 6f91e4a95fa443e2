"""Opt-in check of `merge --device cuda` on a machine with a CUDA GPU (issue #40): the same rank-16 all-linear merge
into a generated bf16 Llama-style sharded checkpoint on the CPU and on the GPU, each in a fresh process timed until
its output is synced, beside `cp -r` + `sync`; then every merged tensor of the GPU's output against the CPU's (bf16
ulps: fp32 sums in another order may round a last bit differently) and one against the fp64 merge. Exit 1 when a
tensor differs by more than one ulp, or the GPU's output is further than twice the CPU's from the fp64 merge.
BENCH_LAYERS (8: about 0.9 GB), BENCH_ROUNDS (2, interleaved)."""

import os
import shutil
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("BENCH_LAYERS", "8")  # read by bench_merge as it is imported
import bench_merge  # noqa: E402
from common import measure_command, measure_python, table  # noqa: E402

ROUNDS = int(os.environ.get("BENCH_ROUNDS", 2))


def merge(work, device):
    return measure_python(
        f"import lorakit; lorakit.merge({work + '/base'!r}, [{work + '/all.safetensors'!r}], "
        f"{work + '/' + device!r}, quiet=True, device={device!r})"
    )


def ulps(a, b):
    """The largest distance between two bf16 tensors in units of the last place (their bit patterns as integers)."""
    ia, ib = (t.contiguous().view(torch.int16).int() for t in (a, b))
    ia, ib = (
        torch.where(i < 0, -32768 - i, i) for i in (ia, ib)
    )  # sign-magnitude to a monotone integer line
    return int((ia - ib).abs().max()) if a.numel() else 0


def compare(work, ad):
    from lorakit.io import Checkpoint

    cpu, gpu, worst, differing, total = Checkpoint(f"{work}/cpu"), Checkpoint(f"{work}/cuda"), 0, 0, 0
    for name in cpu.where:
        a, b = cpu.get(name), gpu.get(name)
        worst = max(worst, ulps(a, b))
        differing += int((a.view(torch.int16) != b.view(torch.int16)).sum())
        total += a.numel()
    name = "model.layers.0.mlp.down_proj"
    ref = Checkpoint(f"{work}/base").get(name + ".weight").double() + ad.modules[name].delta(torch.float64)
    err = {
        k: float((c.get(name + ".weight").double() - ref).abs().max())
        for k, c in (("cpu", cpu), ("cuda", gpu))
    }
    print(
        f"GPU against CPU: {differing} of {total} elements differ ({differing / total:.2e}), at most {worst} ulp; "
        f"{name} against the fp64 merge: CPU {err['cpu']:.2e}, GPU {err['cuda']:.2e}"
    )
    # a sum in another order may round an element the other way: one ulp, at most twice the CPU's half-ulp error
    return worst <= 1 and err["cuda"] <= 2 * err["cpu"]


def main():
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 2
    work = tempfile.mkdtemp(prefix="lorakit-cuda-merge-")
    try:
        shapes, total = bench_merge.write_base(os.path.join(work, "base"))
        ad = bench_merge.write_adapters(work, shapes)
        contenders = {
            "cp -r + sync": lambda: measure_command(f"cp -r {work}/base {work}/cp"),
            "lorakit merge --device cpu": lambda: merge(work, "cpu"),
            "lorakit merge --device cuda": lambda: merge(work, "cuda"),
        }
        runs = {k: [] for k in contenders}
        for r in range(ROUNDS):
            for label, run in contenders.items():
                runs[label].append(run())
                if r < ROUNDS - 1:
                    for out in ("cp", "cpu", "cuda"):
                        shutil.rmtree(f"{work}/{out}", ignore_errors=True)
        best = {k: min(v) for k, v in runs.items()}
        floor = best["cp -r + sync"]
        table(
            f"merge rank-16 all-linear into {total / 1e9:.2f} GB of bf16 on {torch.cuda.get_device_name()} "
            f"(torch {torch.__version__}), best of {ROUNDS} interleaved rounds",
            ["run", "wall s", "vs cp", "CPU s", "peak RSS MiB"],
            [
                [k, f"{r.wall:.2f}", f"{r.wall / floor.wall:.2f}x", f"{r.cpu:.2f}", f"{r.rss:.0f}"]
                for k, r in best.items()
            ],
        )
        return 0 if compare(work, ad) else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
