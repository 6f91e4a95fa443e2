"""The `lorakit` command: a thin click layer over the library functions of the same names.

Only click is imported at start-up; each command imports its library function when it runs, so `--help` is fast.
"""

import functools
import json as jsonlib
import signal
import sys

import click

from . import render
from ._version import __version__
from .formats import FORMATS
from .options import (
    CombineOptions,
    ExtractOptions,
    MergeOptions,
    ResizeOptions,
    TrainOptions,
    cli_options,
)
from .serving import ENGINES


class Terminated(KeyboardInterrupt):
    pass


def _terminated(signum, frame):
    raise Terminated()


def _fail(message, code=2, as_json=False, error=None):
    """One line on stderr; under --json also a JSON object on stdout (scripts read stdout)."""
    if as_json:
        detail = {
            "path": getattr(error, "path", None),
            "tensor": getattr(error, "tensor", None),
            "code": getattr(error, "code", None),
        }
        click.echo(
            jsonlib.dumps(
                {
                    "error": message,
                    **{k: str(v) for k, v in detail.items() if v is not None},
                    "exit_code": code,
                },
                indent=2,
            )
        )
    click.echo(f"lorakit: error: {message}", err=True)
    sys.exit(code)


def command(group, name, **kw):
    """A subcommand with --debug, clean one-line errors and exit code 2 on bad input."""

    def wrap(fn):
        @group.command(name, **kw)
        @click.option("--debug", is_flag=True, help="Show the full traceback on errors.")
        @functools.wraps(fn)
        def run(*args, debug=False, **kwargs):
            from .errors import CLI, LorakitError

            signal.signal(signal.SIGTERM, _terminated)  # like Ctrl-C: temporaries removed, outputs untouched
            CLI["active"] = True  # messages name options as --force, not force=True
            fail = functools.partial(_fail, as_json=kwargs.get("as_json", False))
            try:
                return fn(*args, **kwargs)
            except LorakitError as e:
                if debug:
                    raise
                fail(str(e), error=e)
            except Terminated:
                fail("terminated (SIGTERM): nothing was written", 143)
            except KeyboardInterrupt:
                fail("interrupted: nothing was written", 130)
            except OSError as e:  # an input that cannot be read, a disk that fails: bad input, not a bug
                if debug:
                    raise
                fail(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}")
            except MemoryError:
                fail("out of memory (the input is larger than this machine can hold)")
            except Exception as e:  # a bug, not bad input: still one line unless --debug
                if debug:
                    raise
                fail(f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)")
            finally:
                CLI["active"] = False

        return run

    return wrap


def _engine_option(help):
    """--for ENGINE, the choices from lorakit.serving.ENGINES."""
    return click.option("--for", "for_engine", type=click.Choice(list(ENGINES)), help=help)


def _verbose(what="Every module's row (default: the totals and the worst modules)."):
    return click.option("-v", "--verbose", is_flag=True, help=what)


def emit(report, as_json, human):
    click.echo(jsonlib.dumps(report, indent=2, default=str) if as_json else human(report))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, "-V", "--version", prog_name="lorakit")
def main():
    """lorakit: inspect, validate, convert, combine, resize, diff, extract, merge and train LoRA adapters.

    Every command is also a library function of the same name: `lorakit merge` is `lorakit.merge()`.
    """


# ---------------------------------------------------------------- inspect
@command(main, "inspect")
@click.argument("adapter", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--spectrum", is_flag=True, help="Singular values of each dW, from the factors.")
@click.option(
    "--base", type=click.Path(), help="Base checkpoint: adds ||dW|| / ||W|| per module (with --spectrum)."
)
@_verbose("One line per module (with --spectrum: every one; default: the 8 largest).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def inspect_cmd(adapter, as_json, spectrum, base, verbose, quiet):
    """Summarize an adapter of any readable format (header only unless --spectrum)."""
    from .commands.inspect import inspect

    if base and not spectrum:
        spectrum = True
    emit(
        inspect(adapter, spectrum=spectrum, base=base, verbose=verbose, quiet=quiet),
        as_json,
        functools.partial(render.inspect_text, verbose=verbose),
    )


# ---------------------------------------------------------------- validate
@command(main, "validate")
@click.argument("files", nargs=-1, required=True, type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--quick", is_flag=True, help="Header checks only: read no tensor data.")
@click.option(
    "--fail-fast", is_flag=True, help="Stop a file's value scan at its first tensor with a NaN/Inf."
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@_engine_option("Instead: would this inference server serve the adapter exactly? (exit 1 when not)")
@click.option(
    "--engine-version",
    help="The engine's version: the rules of that version where its behaviour changed (default: the newest measured).",
)
@click.option(
    "--base",
    type=click.Path(),
    help="Also: where every module lands in this base (modules that land nowhere, with the nearest base name).",
)
def validate_cmd(files, as_json, quick, fail_fast, quiet, for_engine, engine_version, base):
    """Check files against the lorakit adapter spec. Exit 0 valid, 1 invalid (a truncated file too), 2 a path that
    cannot be opened. An adapter of another format is valid when its own reader finds nothing wrong. With --for ENGINE:
    whether that engine serves each adapter exactly. With --base: whether every module lands on that base."""
    from .commands.validate import validate

    report = validate(
        list(files),
        quick=quick,
        fail_fast=fail_fast,
        quiet=quiet,
        for_engine=for_engine,
        engine_version=engine_version,
        base=base,
    )
    emit(report, as_json, render.validate_text)
    if not all(f["readable"] for f in report["files"]):
        sys.exit(2)
    sys.exit(0 if report["valid"] else 1)


# ---------------------------------------------------------------- algebra
def _common_output(f, what="Output adapter file."):
    f = click.option("-q", "--quiet", is_flag=True, help="No progress bar.")(f)
    f = click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")(f)
    f = click.option(
        "--force", is_flag=True, help="Replace OUT if it exists (an output of the same kind; never an input)."
    )(f)
    return click.option("-o", "--output", required=True, type=click.Path(), help=what)(f)


def _output(what):
    return functools.partial(_common_output, what=what)


@command(main, "combine")
@click.argument("adapters", nargs=-1, required=True)
@_common_output
@cli_options(CombineOptions, skip=("force", "quiet"))
@_verbose()
def combine_cmd(adapters, output, as_json, verbose, **options):
    """Combine adapters A[:W] B[:W] ... in delta space (exact for cat and linear)."""
    from .commands.algebra import combine

    report = combine(list(adapters), output, **options)
    emit(report, as_json, functools.partial(render.combine_text, verbose=verbose))


@command(main, "resize")
@click.argument("adapter", type=click.Path())
@_common_output
@cli_options(ResizeOptions, skip=("force", "quiet"))
@_verbose()
def resize_cmd(adapter, output, as_json, verbose, **options):
    """Re-rank every module by optimal (Eckart-Young) truncation; the scale is kept."""
    from .commands.algebra import resize

    emit(resize(adapter, output, **options), as_json, functools.partial(render.resize_text, verbose=verbose))


@command(main, "diff")
@click.argument("a", type=click.Path())
@click.argument("b", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@_verbose()
def diff_cmd(a, b, as_json, quiet, verbose):
    """Compare two adapters' deltas module by module (a reparametrized delta compares equal)."""
    from .commands.algebra import diff

    emit(diff(a, b, quiet=quiet), as_json, functools.partial(render.diff_text, verbose=verbose))


@command(main, "extract")
@click.argument("base", type=click.Path())
@click.argument("tuned", type=click.Path())
@_common_output
@cli_options(ExtractOptions, skip=("force", "quiet"))
@_verbose()
def extract_cmd(base, tuned, output, as_json, verbose, **options):
    """Extract an adapter from a base and a fine-tuned checkpoint (files or sharded folders)."""
    from .commands.extract import extract

    report = extract(base, tuned, output, **options)
    emit(report, as_json, functools.partial(render.extract_text, verbose=verbose))


# ---------------------------------------------------------------- convert
@command(main, "convert")
@click.argument("input", type=click.Path())
@_output("Output file (a folder for --to peft).")
@click.option("--to", "to", help=f"Output format ({', '.join(FORMATS)}); with --for, the engine's.")
@_engine_option("Write what this inference server loads, serving the same dW (README: Serving an adapter).")
@click.option(
    "--max-rank", type=int, help="With --for: truncate modules above this rank (energy kept reported)."
)
@click.option("--from", "from_", help="Input format (default: detected from the content).")
@click.option("--base", type=click.Path(), help="Base checkpoint: resolves kohya names and GPT-2 layouts.")
@click.option(
    "--alpha", type=float, help="Alpha for formats that do not store it (loralib .pt, bare PEFT files)."
)
@click.option(
    "--allow-unknown", is_flag=True, help="Convert the rest when some input keys are not understood."
)
@click.option(
    "--rank",
    type=int,
    help="With --base: the rank of W' - W as a LoRA (IA3, OFT; with --for, DoRA and full tensors too).",
)
@click.option("--energy", type=float, help="Or the smallest rank keeping this share of ||W' - W||_F^2 (0-1).")
@click.option(
    "--initial",
    type=click.Path(),
    help="PiSSA / OLoRA / CorDA / LoRA-GA adapters: the adapter as saved before training; writes the LoRA of "
    "dW = B A - B0 A0 for the original base (rank doubled, as PEFT converts it).",
)
@_verbose("Every note (default: like notes summed up in one line).")
def convert_cmd(input, output, as_json, verbose, **options):
    """Convert an adapter between formats (every input key is consumed or reported)."""
    from .commands.convert import convert

    options.pop("quiet")
    emit(convert(input, output, **options), as_json, functools.partial(render.convert_text, verbose=verbose))


# ---------------------------------------------------------------- merge
@command(main, "merge")
@click.argument("base", type=click.Path())
@click.argument("adapters", nargs=-1, required=True)
@_output(
    "Output: a .safetensors file for a file BASE, a folder for a folder BASE, a .gguf file (or the same splits) "
    "for a GGUF BASE."
)
@cli_options(MergeOptions, skip=("force", "quiet"))
@_verbose("Quantized bases: every module's row (default: the worst).")
def merge_cmd(base, adapters, output, as_json, verbose, **options):
    """Merge ADAPTER[:WEIGHT]... into BASE (file, folder or GGUF), streaming; fp32 math, rounded once. Quantized bases
    (FP8, INT8, GPTQ, AWQ, NF4, GGUF Q8_0..Q6_K) are written back in their format with a survival report."""
    from .commands.merge import merge

    report = merge(base, list(adapters), output, **options)
    emit(report, as_json, functools.partial(render.merge_text, verbose=verbose))


# ---------------------------------------------------------------- train
@command(main, "train")
@click.option("--base", required=True, type=click.Path(), help="Hugging Face Llama/Mistral/Qwen2 folder.")
@click.option(
    "--data", required=True, type=click.Path(), help="Token ids: .npy, .bin (uint16/uint32), .jsonl; or text."
)
@_output("Output adapter file (a folder with --format peft).")
@cli_options(TrainOptions, skip=("force", "quiet"))
def train_cmd(base, data, output, as_json, **options):
    """Train a LoRA adapter on a Llama-family checkpoint (GPU when there is one; torchrun for several)."""
    from .commands.train import train

    emit(train(base, data, output, **options), as_json, render.train_text)


# ---------------------------------------------------------------- demo
@command(main, "demo")
@click.option(
    "--keep", type=click.Path(), help="Write the demo files into this folder instead of a temp folder."
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def demo_cmd(keep, quiet):
    """Build a tiny base model and adapter, and show what lorakit does with them."""
    from .commands.demo import demo

    demo(keep=keep, quiet=quiet, echo=click.echo)


if __name__ == "__main__":
    main()
