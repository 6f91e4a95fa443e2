"""The merge, plan then execute: adapters (already on the base's names) into an opened Base, streamed tensor by
tensor into an output of the same container kind, then the report. The command only checks arguments."""

import os
import shutil
import time
from dataclasses import dataclass

from ..devices import device_memory
from ..errors import LorakitError, listed, opt
from ..io import Staging, atomic_output, check_output, input_identity, spec_nbytes, tokenizer_files
from ..io.staging import idle_part, parse_part
from ..progress import progress
from . import pipeline
from .plan import plan_merge
from .report import merge_notes, survival_summary


def merge_into(base, loaded, output, options, input_paths=(), calibration=None):
    """Merge `loaded` ([(label, Adapter, weight)]) into the Base `base`, writing `output`. Returns the report.
    `calibration` (lorakit.training.calibration.Calibration): the layer inputs requantizing feeds errors through."""
    if base.components is not None:
        return merge_components(base, loaded, output, options, input_paths)
    loaded = [(label, base.to_base_names(ad), w) for label, ad, w in loaded]
    outputs = base.output_files(output)
    for path in outputs:  # an existing output: refused now, or (a part of several) once its files are known
        check_output(
            path,
            [base.path, options.full_precision_base, *input_paths, *base.ckpt.files],
            options.force or parted(options),
        )
    plan = plan_merge(base, loaded, options)
    if plan.tokenizer_from is not None:
        tokenizer_files(plan.tokenizer_from)  # refused now, before anything is written
    missed = plan.skipped + plan.elsewhere
    if missed and not any(p.touched for p in plan.tensors.values()):
        raise LorakitError(
            f"none of the adapter tensors is in the base ({len(missed)} skipped, e.g. {missed[0]}): "
            "is this the right base?",
            path=base.path,
        )
    full = base.full_precision(options.full_precision_base) if options.full_precision_base else None
    job = pipeline.MergeJob(base, plan, options, full, calibration.factors if calibration else None)
    if job.requantizes and "original" in (options.strategy, options.onto) and full is None:
        raise LorakitError(
            "--strategy original and --onto original need --full-precision-base", path=base.path
        )
    writer = base.writer(job, outputs, plan.untie, options.shard_bytes)
    staging = stage(base, writer, outputs, options, input_paths, job.device)
    effort = execute(job, writer, staging, outputs[0], options)
    return merge_report(base, loaded, output, options, plan, job, writer, staging, effort)


def stage(base, writer, outputs, options, input_paths, device):
    """The output's work folder: its journal names this merge's inputs and options (the device's kind among them:
    a GPU's sums may round a last bit differently), so that --resume and --part join only the same merge."""
    from dataclasses import asdict

    names = [name for name, _ in writer.shards]
    sizes = {name: sum(map(spec_nbytes, specs)) for name, specs in writer.shards}
    idle = idle_part(outputs[0], names, sizes, options.part)
    for path in outputs:  # now that the writer knows: a folder replaces only a folder, a file a file
        check_output(path, force=options.force or idle, directory=writer.folder)
    inputs = [base.path, *input_paths, options.full_precision_base, options.calibration, options.initial]
    identity = {
        "inputs": input_identity(inputs),
        "options": {k: v for k, v in asdict(options).items() if k not in RUN_ONLY},
        "device": device.type,
    }
    return Staging(
        outputs[0], names, identity, writer.folder, options.part, options.resume, options.force, sizes
    )


def parted(options):
    """Whether this run is one part of several (--part i/N, N > 1)."""
    return parse_part(options.part)[1] > 1


# options that change how a merge runs, not what it writes: a resumed or parted run may differ in them
RUN_ONLY = ("threads", "quiet", "force", "resume", "part", "max_memory", "device")


@dataclass
class Effort:
    """What writing the output took: worker threads, wall-clock seconds and the process's CPU seconds (user +
    system, every thread: the workers and the writer's I/O threads) side by side. CPU seconds near workers x wall
    say the CPU sets the pace; far below it, the disk."""

    workers: int
    seconds: float
    cpu_seconds: float


def cpu_seconds():
    t = os.times()
    return t.user + t.system


def execute(job, writer, staging, output, options):
    """Write this part's files into the work folder; when every part's are done, what goes beside them, then
    publish (rename into place). Returns the Effort."""
    _large_buffers_back_to_os()
    todo = sum(staging.sizes[name] for name in staging.todo)
    start, cpu = time.perf_counter(), cpu_seconds()
    try:
        # a --max-memory that holds no worker is refused here, so that the work folder is swept; before the bar
        # exists (an unclosed tqdm leaves its monitor thread behind, and a later fork of this process hangs on it)
        threads = workers(job, options)
        bar = progress(total=todo, quiet=options.quiet, desc="merge", unit="B", unit_scale=True)
        with bar:
            pipeline.run(job, writer, staging, threads, bar)
        if staging.complete:
            paths = {name: os.path.join(staging.work, name) for name, _ in writer.shards}
            weight_map = {spec[0]: name for name, specs in writer.shards for spec in specs}
            writer.finish(staging.work, paths, weight_map, writer.total)
            staging.publish()
    except BaseException as e:
        staging.abort()
        if isinstance(e, OSError):
            raise LorakitError(f"cannot write the output: {e.strerror or e}", path=output) from None
        raise
    staging.close()
    return Effort(threads, time.perf_counter() - start, cpu_seconds() - cpu)


def merge_report(base, loaded, output, options, plan, job, writer, staging, effort):
    notes = merge_notes(base, loaded, plan, job, options)
    if staging.idle:
        notes.insert(
            0,
            f"part {staging.part}/{staging.parts}: none of the output's files falls to this part, and the other parts have published it",
        )
    report = {
        "output": os.fspath(output),
        "published": staging.published,
        "part": f"{staging.part}/{staging.parts}",
        "files_written": staging.written,
        "files_resumed": staging.resumed,
        "base": base.path,
        "adapters": [{"file": p, "weight": w} for p, _, w in loaded],
        "unmerge": options.unmerge,
        "tensor_count": sum(len(s) for _, s in writer.shards),
        "merged_count": sum(p.touched for p in plan.tensors.values()),
        "bytes": writer.total,
        "dtype": options.dtype or "keep",
        "device": str(job.device),
        "workers": effort.workers,
        "seconds": round(effort.seconds, 3),
        "cpu_seconds": round(effort.cpu_seconds, 3),
        "skipped": plan.skipped,
        "elsewhere": plan.elsewhere,
        "notes": notes,
        **base.report(writer),
    }
    if base.quantized:
        report["quantization"] = survival_summary(
            base.view.handler, options.strategy, job, notes, calibrated=options.calibration is not None
        )
    return report


def merge_components(base, loaded, output, options, input_paths):
    """A base of several models (a diffusers pipeline): each component merged with the modules under its name,
    everything else copied; one atomic output folder."""
    if options.resume or options.part:
        raise LorakitError(
            f"{opt('resume', bare=True)} and {opt('part', bare=True)} work on one model's files; a pipeline folder "
            "is written whole",
            path=base.path,
        )
    parts, skipped = split_by_component(base, loaded)
    if skipped and not options.skip_unmatched:
        raise LorakitError(
            f"{len(skipped)} adapter tensor(s) are in no component of the pipeline: {', '.join(skipped[:6])} "
            f"({opt('skip_unmatched', True)} merges the rest)",
            path=base.path,
        )
    if not parts:
        raise LorakitError("none of the adapter tensors is in a component of the pipeline", path=base.path)
    reports = {}
    with atomic_output(output, force=options.force, directory=True) as tmp:
        for entry in sorted(os.listdir(base.path)):
            src, dst = os.path.join(base.path, entry), os.path.join(tmp, entry)
            if entry in parts:
                reports[entry] = merge_into(base.components[entry], parts[entry], dst, options)
            elif os.path.isdir(src):
                shutil.copytree(src, dst)
            else:
                shutil.copy2(src, dst)
    return components_report(base, loaded, output, options, reports, skipped)


def split_by_component(base, loaded):
    """({component: [(label, Adapter on the component's names, weight)]}, [adapter tensors in no component])."""
    from ..core import Adapter
    from ..formats.diffusers import split_components

    parts, skipped = {}, []
    for label, ad, w in loaded:
        split, outside = split_components(ad)
        if outside and "transformer" in base.components:
            # original DiT names (BFL, Wan, ...): the transformer's plan cuts them into its diffusers tensors
            split.setdefault("transformer", Adapter()).modules.update(
                {n: m for n, m in ad.modules.items() if f"{n}.weight" in outside}
            )
            outside = [n for n in outside if n[: -len(".weight")] not in ad.modules]
        skipped += outside
        for c, sub in split.items():
            if c in base.components:
                parts.setdefault(c, []).append((label, sub, w))
            else:
                skipped += [f"{n}.weight" for n in sub.modules] + list(sub.replacements) + list(sub.deltas)
    return parts, skipped


def components_report(base, loaded, output, options, reports, skipped):
    notes = [f"{c}: {n}" for c, r in reports.items() for n in r["notes"]]
    if skipped:
        notes.append(f"skipped {len(skipped)} adapter tensor(s) in no component: {listed(skipped)}")
    total = lambda key: sum(r[key] for r in reports.values())
    return {
        "output": os.fspath(output),
        "base": base.path,
        "adapters": [{"file": p, "weight": w} for p, _, w in loaded],
        "unmerge": options.unmerge,
        "components": {c: r["merged_count"] for c, r in reports.items()},
        "tensor_count": total("tensor_count"),
        "merged_count": total("merged_count"),
        "shard_count": total("shard_count"),
        "bytes": total("bytes"),
        "dtype": options.dtype or "keep",
        "skipped": skipped + [s for r in reports.values() for s in r["skipped"]],
        "notes": notes,
    }


def workers(job, options):
    """Worker threads: --threads, else one per core this process may run on; as many as fit in what the process
    does not hold yet of --max-memory, or without it of all the machine's memory (each holds the largest tensor or
    quantized module it computes). --threads beyond what all the machine's memory holds is refused."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    wanted = options.threads or cores
    limit = options.max_memory_bytes
    within = f"{opt('max_memory', bare=True)} {options.max_memory}"
    if limit is None:
        limit, within = device_memory(), "all the memory this machine has"
    if limit is None:
        return wanted
    each, held, shared = job.worker_bytes(), resident_bytes(), job.shared_bytes()
    fit = (limit - held - shared) // max(1, each)
    one = f"one worker needs about {(each + shared) / 2**20:.0f} MiB (the largest tensor it merges, twice)"
    if fit < 1:
        raise LorakitError(
            f"{within} holds no worker: this process holds {held / 2**20:.0f} MiB already and {one}"
        )
    if options.max_memory is None and options.threads is not None and options.threads > fit:
        raise LorakitError(
            f"{opt('threads', bare=True)} {options.threads}: {within} holds {int(fit)} worker(s), {one}: give fewer"
        )
    return int(min(wanted, fit))


def resident_bytes():
    """This process's resident memory now (VmRSS), 0 where /proc does not tell."""
    try:
        with open("/proc/self/status") as f:
            line = next(x for x in f if x.startswith("VmRSS"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration, ValueError):
        return 0


def _large_buffers_back_to_os():
    """glibc keeps freed tensor-sized buffers in its heap once its mmap threshold has adapted upwards, so peak RSS
    grows with the number of tensors seen. A fixed 8 MiB threshold gives tensor-sized buffers back when freed (the
    tensors in flight live in BufferPools anyway) while the 2 MB fp32 row blocks stay in the heap, reused without
    page faults."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 8 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune
