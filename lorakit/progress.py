"""The one progress bar: tqdm on stderr, off with --quiet, and off when stderr is not a terminal (a CI log gets no
carriage-return frames)."""

import sys


def progress(iterable=None, quiet=False, **options):
    from tqdm import tqdm

    return tqdm(iterable, disable=quiet or not sys.stderr.isatty(), file=sys.stderr, **options)
