"""The `lorakit` command: a thin click layer over the library functions of the same names.

Only click is imported at start-up; each command imports its library function when it runs, so `--help` is fast.
"""
import functools
import json as jsonlib
import os
import sys

import click

from . import render
from ._version import __version__


def _fail(message, code=2):
    click.echo(f"lorakit: error: {message}", err=True)
    sys.exit(code)


def command(group, name, **kw):
    """A subcommand with --debug, clean one-line errors and exit code 2 on bad input."""
    def wrap(fn):
        @group.command(name, **kw)
        @click.option("--debug", is_flag=True, help="Show the full traceback on errors.")
        @functools.wraps(fn)
        def run(*args, debug=False, **kwargs):
            from .errors import LorakitError
            try:
                return fn(*args, **kwargs)
            except LorakitError as e:
                if debug:
                    raise
                _fail(str(e))
            except KeyboardInterrupt:
                _fail("interrupted", 130)
            except Exception as e:  # a bug, not bad input: still one line unless --debug
                if debug:
                    raise
                _fail(f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)")
        return run
    return wrap


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
@click.option("--base", type=click.Path(), help="Base checkpoint: adds ||dW|| / ||W|| per module (with --spectrum).")
@click.option("-v", "--verbose", is_flag=True, help="One line per module.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def inspect_cmd(adapter, as_json, spectrum, base, verbose, quiet):
    """Summarize an adapter of any readable format (header only unless --spectrum)."""
    from .commands.inspect import inspect
    if base and not spectrum:
        spectrum = True
    emit(inspect(adapter, spectrum=spectrum, base=base, verbose=verbose, quiet=quiet), as_json, render.inspect_text)


# ---------------------------------------------------------------- validate
@command(main, "validate")
@click.argument("files", nargs=-1, required=True, type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def validate_cmd(files, as_json):
    """Check files against the lorakit adapter spec. Exit 0 valid, 1 invalid, 2 unreadable."""
    from .commands.validate import validate
    report = validate(list(files))
    emit(report, as_json, render.validate_text)
    if not all(f["readable"] for f in report["files"]):
        sys.exit(2)
    sys.exit(0 if report["valid"] else 1)


# ---------------------------------------------------------------- demo
@command(main, "demo")
@click.option("--keep", type=click.Path(), help="Write the demo files into this folder instead of a temp folder.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def demo_cmd(keep, quiet):
    """Build a tiny base model and adapter, and show what lorakit does with them."""
    from .commands.demo import demo
    demo(keep=keep, quiet=quiet, echo=click.echo)


if __name__ == "__main__":
    main()
