"""Command options, declared once: a dataclass per option set, shared by the CLI (its click options are made from
the fields), the commands (the library functions take the same keywords) and the engine (which receives the record).

A field's metadata holds its help text and, where the CLI needs them, its choices and type. Validation lives in the
dataclass (`check`), so the CLI and the library refuse the same values with the same message. Torch-free: the CLI
imports this at start-up.
"""

import functools
import inspect
import math
import os
import re
from dataclasses import dataclass, field, fields

from .devices import pick_device
from .errors import LorakitError, missing, opt
from .io.dtypes import ALIASES, USER_DTYPES
from .methods import METHODS
from .quant import STRATEGIES

TRAIN_FORMATS = ("lorakit", "peft", "mlx")  # what train writes: the spec, and the two folders of other tools
DTYPE_HELP = f"{', '.join(USER_DTYPES)} (or {', '.join(ALIASES)})"
ONTO = ("dequantized", "original")
MERGE_DEVICES = ("cuda", "cpu")  # where merge sums full-precision tensors (lorakit.devices)
QUANTIZE = ("nf4", "int8", "fp8", "nvfp4", "fp8-block")  # train --quantize (lorakit.training.frozen)
MIN_SHARD = 1 << 20
SEED_MAX = (1 << 63) - 1  # torch.Generator.manual_seed takes a signed 64-bit integer


def option(default, help, choices=None, type=None, path=False):
    return field(default=default, metadata={"help": help, "choices": choices, "type": type, "path": path})


@dataclass(frozen=True)
class MergeOptions:
    dtype: str = option(
        "keep",
        f"Output dtype of floating tensors: keep (each tensor's own), {DTYPE_HELP}. GGUF bases: the type of merged "
        "tensors whose GGML type has no codec (IQ*); every other tensor keeps its type.",
    )
    unmerge: bool = option(False, "Subtract the adapters instead of adding them.")
    shard_size: str = option(None, "Re-shard the output (e.g. 5GB, 2GiB).")
    threads: int = option(
        None, "Worker threads (default: one per core, as many as --max-memory holds).", type=int
    )
    max_memory: str = option(
        None,
        "The memory the merge may use (e.g. 1GB): as many workers as fit (each holds about twice the largest "
        "tensor it merges); refused when not even one fits.",
    )
    device: str = option(
        "auto",
        "Where full-precision tensors are summed: auto (a CUDA GPU when torch sees one, else the CPU), cpu, cuda, "
        "cuda:N. Reading, writing and requantizing stay on the CPU.",
    )
    resume: bool = option(
        False,
        "Go on with a merge that was killed: the files its journal records as done (and whose bytes check) are "
        "kept, the rest written; refused if the inputs or options changed.",
    )
    part: str = option(
        None,
        "i/N: write part i of N of the output files (any scheduler runs the N commands, into one output folder on "
        "shared storage); the last part to finish publishes the output.",
    )
    force: bool = option(False, "Replace OUT if it exists (an output of the same kind; never an input).")
    quiet: bool = option(False, "No progress bar.")
    ignore_fingerprint: bool = option(False, "Merge even if the adapter names another base.")
    strategy: str = option(
        next(iter(STRATEGIES)),
        "Quantized bases: how W + dW goes back onto the grid (see README).",
        choices=tuple(STRATEGIES),
    )
    full_precision_base: str = option(
        None, "The unquantized base (for --strategy original / --onto original).", path=True
    )
    onto: str = option(
        "dequantized",
        "Quantized bases: merge onto dequant(Q(W)) (what a QLoRA adapter saw) or onto the original W.",
        choices=ONTO,
    )
    seed: int = option(0, "Seed of --strategy stochastic and the probes.", type=int)
    calibration: str = option(
        None,
        "Quantized Llama-family bases: token ids (.npy/.bin/.jsonl) or text (with the base's tokenizer.json) on "
        "which the adapted model's layer inputs are measured; requantizing is then GPTQ with their Hessians "
        "(--strategy gptq), and the report leads with the merged model's KL on held-out tokens of it.",
        path=True,
    )
    initial: str = option(
        None,
        "A PEFT adapter whose initialisation changed its base (PiSSA, OLoRA, CorDA, LoRA-GA): the adapter as saved "
        "before training; dW = B A - B0 A0 is merged into the original base.",
        path=True,
    )
    skip_unmatched: bool = option(
        False,
        "Merge the adapter tensors the base has, report the others by name (parts stored in other files: a Flux "
        "LoRA's CLIP-L, SDXL's second text encoder).",
    )

    @property
    def shard_bytes(self):
        return parse_size(self.shard_size)

    @property
    def max_memory_bytes(self):
        return parse_size(self.max_memory, "max memory")

    def check(self):
        """Refuse (never clamp) what is out of range; returns self."""
        self.shard_bytes  # noqa: B018 (refused now, before any work)
        self.max_memory_bytes  # noqa: B018
        if self.part is not None:
            from .io.staging import parse_part

            parse_part(self.part)
        in_range("threads", self.threads, 1, integer=True)
        seed_in_range(self.seed)
        pick_device(self.device, MERGE_DEVICES)  # refused now, before the base is opened
        existing(self.full_precision_base, "full_precision_base")
        existing(self.calibration, "calibration")
        existing(self.initial, "initial")
        if self.calibration and self.strategy not in ("auto", "gptq"):
            raise LorakitError(f"--calibration is for --strategy gptq (auto picks it), not '{self.strategy}'")
        if self.strategy == "gptq" and not self.calibration:
            raise LorakitError("--strategy gptq needs --calibration DATA (token ids or text)")
        if self.strategy not in STRATEGIES:
            raise LorakitError(f"unknown strategy '{self.strategy}' (choose from {', '.join(STRATEGIES)})")
        if self.onto not in ONTO:
            raise LorakitError(f"{opt('onto', bare=True)} is 'dequantized' or 'original', not '{self.onto}'")
        return self


@dataclass(frozen=True)
class TrainOptions:
    rank: int = option(16, None, type=int)
    alpha: float = option(32.0, None, type=float)
    targets: str = option("q_proj,v_proj", "Module names, suffixes or globs.")
    steps: int = option(100, None, type=int)
    lr: float = option(2e-4, None, type=float)
    batch: int = option(8, "Global batch (split over torchrun processes).", type=int)
    seq_len: int = option(256, None, type=int)
    grad_accum: int = option(1, None, type=int)
    eval_every: int = option(50, "Held-out eval every N steps (0: end).", type=int)
    warmup: int = option(None, "Warmup steps (default: 10% of the steps).", type=int)
    device: str = option("auto", "auto (CUDA, then MPS, then CPU), cpu, cuda...")
    dtype: str = option(
        "auto",
        "Compute dtype of the frozen base: auto (bf16 on a GPU, and on a CPU with bf16 instructions when the base's "
        f"linear layers are codes, else fp32), {DTYPE_HELP}.",
    )
    seed: int = option(0, None, type=int)
    format: str = option("lorakit", None, choices=TRAIN_FORMATS)
    resume: str = option(None, "Start from this adapter's factors.", path=True)
    quantize: str = option(
        None,
        "Keep the frozen base's linear layers as codes, quantized on load: nf4 (QLoRA: blocks of 64, "
        "double-quantized absmax, as bitsandbytes), int8 or fp8 per row, nvfp4 (llm-compressor's recipe: E4M3 "
        "scales per 16, one FP32 scale per tensor), fp8-block (128 x 128 blocks). A quantized base stays quantized "
        "anyway.",
        choices=QUANTIZE,
    )
    checkpointing: bool = option(
        False, "Gradient checkpointing: recompute each block's activations in backward."
    )
    max_memory: str = option(
        None, "Refuse to start when the estimated peak memory of a process exceeds this (e.g. 6GB, 12GiB)."
    )
    force: bool = option(False, "Replace OUT if it exists (an output of the same kind; never an input).")
    quiet: bool = option(False, "No progress bar.")

    @property
    def max_memory_bytes(self):
        return parse_size(self.max_memory, "--max-memory")

    def check(self):
        """Refuse (never clamp) what is out of range; returns self."""
        existing(self.resume, "resume")
        self.max_memory_bytes  # noqa: B018 (refused now, before any work)
        if self.quantize is not None and self.quantize not in QUANTIZE:
            raise LorakitError(f"--quantize is one of {', '.join(QUANTIZE)}, not '{self.quantize}'")
        for name in ("rank", "steps", "batch", "seq_len", "grad_accum"):
            in_range(name, getattr(self, name), 1, integer=True)
        for name in ("eval_every", "warmup"):
            in_range(name, getattr(self, name), 0, integer=True)
        if self.warmup is not None and self.warmup > self.steps:  # the schedule would never reach --lr
            raise LorakitError(
                f"{opt('warmup', bare=True)} must be <= {opt('steps', bare=True)} ({self.steps}), got {self.warmup}"
            )
        seed_in_range(self.seed)
        in_range("alpha", self.alpha, 0, low_open=True)
        in_range("lr", self.lr, 0, low_open=True)
        if self.format not in TRAIN_FORMATS:
            raise LorakitError(f"--format is {', '.join(TRAIN_FORMATS)}, not '{self.format}'")
        return self


DTYPE_OUT = f"dtype of the output factors: keep, {DTYPE_HELP}."
FORCE = "Replace OUT if it exists (an output of the same kind; never an input)."


class NoChecks:
    def check(self):
        """The command checks these options' ranges itself (they depend on each other)."""
        return self


@dataclass(frozen=True)
class CombineOptions(NoChecks):
    method: str = option(
        "linear", "; ".join(f"{k}: {v[2]}" for k, v in METHODS.items()), choices=tuple(METHODS)
    )
    rank: int = option(None, "Truncate each module optimally to this rank.", type=int)
    energy: float = option(None, "Keep the smallest rank with this share of ||dW||_F^2 (0-1).", type=float)
    density: float = option(None, "Kept share for ties/dare/prune (default 0.5).", type=float)
    seed: int = option(None, "Seed of DARE's random drop (default 0).", type=int)
    dtype: str = option("keep", DTYPE_OUT)
    force: bool = option(False, FORCE)
    quiet: bool = option(False, "No progress bar.")


@dataclass(frozen=True)
class ResizeOptions(NoChecks):
    rank: int = option(None, "New rank of every module.", type=int)
    energy: float = option(None, "Keep this share of ||dW||_F^2 per module (0-1).", type=float)
    sv_ratio: float = option(
        None, "Keep singular values above S[0] / X, plus one (sd-scripts' rank).", type=float
    )
    sv_fro: float = option(
        None, "Keep until the Frobenius norm share reaches X, plus one (sd-scripts).", type=float
    )
    sv_cumulative: float = option(
        None, "Keep until cumsum(S) / sum(S) reaches X, plus one (sd-scripts).", type=float
    )
    minimal: bool = option(False, "With --sv-*: the smallest rank meeting the rule (no sd-scripts +1).")
    max_rank: int = option(None, "Upper bound on the new rank.", type=int)
    dtype: str = option("keep", DTYPE_OUT)
    force: bool = option(False, FORCE)
    quiet: bool = option(False, "No progress bar.")


@dataclass(frozen=True)
class ExtractOptions(NoChecks):
    rank: int = option(None, "Rank of every extracted module.", type=int)
    energy: float = option(
        None, "Smallest rank keeping this share of ||tuned - base||_F^2 (0-1).", type=float
    )
    targets: str = option(None, "Comma-separated module names, suffixes (q_proj) or globs; default: all.")
    seed: int = option(0, "Seed of the randomized SVD.", type=int)
    dtype: str = option("keep", DTYPE_OUT)
    force: bool = option(False, FORCE)
    quiet: bool = option(False, "No progress bar.")


def takes_options(options_class, unpack=False):
    """A command `f(*args, options)` called as `f(*args, **keywords)` with the fields of `options_class` as
    keywords (or `options=` a record); its signature shows them, and unknown keywords are an error. With `unpack`
    the command takes the fields as keyword-only parameters without defaults (the defaults live here)."""
    names = [f.name for f in fields(options_class)]

    def wrap(function):
        @functools.wraps(function)
        def run(*args, options=None, **keywords):
            unknown = sorted(set(keywords) - set(names))
            if unknown:
                raise LorakitError(f"{function.__name__}() takes no option {', '.join(unknown)}")
            record = (options if options is not None else options_class(**keywords)).check()
            if unpack:
                return function(*args, **{n: getattr(record, n) for n in names})
            return function(*args, record)

        params = list(inspect.signature(function).parameters.values())
        own = [p for p in params if p.kind != p.KEYWORD_ONLY][: None if unpack else -1]
        extra = [
            inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default)
            for f in fields(options_class)
        ]
        run.__signature__ = inspect.Signature(own + extra)
        return run

    return wrap


def cli_options(options_class, skip=()):
    """click options for the fields of `options_class` (but `skip`): --name-with-dashes, flags for booleans."""
    import click

    def wrap(function):
        for f in reversed(fields(options_class)):
            if f.name in skip:
                continue
            meta, flag = f.metadata, f"--{f.name.replace('_', '-')}"
            if f.type in (bool, "bool"):
                function = click.option(flag, is_flag=True, help=meta["help"])(function)
                continue
            kind = click.Choice(list(meta["choices"])) if meta["choices"] else meta["type"]
            kind = click.Path() if meta["path"] else kind
            shown = f.default is not None
            function = click.option(
                flag, default=f.default, show_default=shown, type=kind, help=meta["help"]
            )(function)
        return function

    return wrap


def parse_size(text, what="shard size"):
    """'5GB', '500MB', '2GiB', '1000000' -> bytes (`what` names the option in errors)."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(I?)B?\s*", str(text).upper())
    if not m:
        raise LorakitError(f"cannot read {what} '{text}' (e.g. 5GB, 500MB, 2GiB)")
    power = "KMGT".find(m.group(2)) + 1 if m.group(2) else 0
    size = int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** power)
    if size < 1000 or (not m.group(2) and size < MIN_SHARD):
        raise LorakitError(f"{what} '{text}' is {size} bytes: give a unit (5GB, 500MB, 2GiB); at least 1KB")
    return size


def seed_in_range(seed):
    """Refuse a --seed torch's generators cannot take (every command with a seed)."""
    return in_range("seed", seed, 0, SEED_MAX, integer=True)


def in_range(name, value, low=None, high=None, low_open=False, high_open=False, integer=False):
    """Refuse (never clamp) an option outside its range (`name`: the parameter, named as the caller spells it)."""
    if value is None:
        return None
    name = opt(name, bare=True)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and int(value) != value):
        raise LorakitError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
    ok = math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        if low is not None and high is not None:
            where = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        elif low is not None:
            where = f"{'>' if low_open else '>='} {low}"
        else:
            where = f"{'<' if high_open else '<='} {high}"
        # infinity lies past a one-sided bound: say why it is refused all the same
        finite = "" if math.isfinite(value) or low is None or high is not None else " (not a finite number)"
        raise LorakitError(f"{name} must be {where}, got {value}{finite}")
    return value


def existing(path, option):
    """A path option that must exist (never resolved against anything else when it does not)."""
    if path is not None and not os.path.exists(os.fspath(path)):
        raise missing(path, opt(option, bare=True) if option.islower() else option)
    return path
