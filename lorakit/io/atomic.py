"""Atomic outputs: every output is written under a temporary name next to its destination and renamed only when
complete, so a reader never sees a partial file and an interrupted command leaves the old output in place."""
import os
import shutil
import tempfile
from contextlib import contextmanager

from ..errors import LorakitError


@contextmanager
def atomic_output(path, force=False, directory=False):
    """Yield a temporary path next to `path`; rename it to `path` only when the block completes."""
    path = os.path.abspath(str(path))
    if os.path.exists(path) and not force:
        raise LorakitError("output exists (use --force to overwrite)", path=path)
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise LorakitError("output folder does not exist", path=parent)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.") if directory else None
    if not directory:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        os.close(fd)
    try:
        yield tmp
        if os.path.isdir(path) and force:
                shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True) if os.path.isdir(tmp) else _unlink(tmp)
        raise


def _unlink(p):
    try:
        os.unlink(p)
    except FileNotFoundError:
        pass


