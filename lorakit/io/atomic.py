"""Outputs that never lose data.

- OUT is checked before any work (`check_output`): it is never an input, never inside one and never contains one;
  an existing OUT is replaced only with --force, and only by an output of the same kind (a file by a file, a model
  folder by a folder).
- Everything is written under a temporary name next to OUT (`.OUT.lorakit-<pid>.<random>.tmp`, created with the
  user's umask) and renamed only when complete; without --force the rename refuses to replace an OUT that appeared
  meanwhile (another process), so two runs cannot silently overwrite each other.
- Temporaries left by a killed run (its process gone, or its pid reused since) are removed by the next run writing
  in the same folder, whatever OUT it writes.
"""

import ctypes
import errno
import os
import re
import secrets
import shutil
from contextlib import contextmanager

from ..errors import LorakitError, opt

TAG = ".lorakit-"


def _real(path):
    return os.path.realpath(os.path.abspath(os.fspath(path)))


def _inside(child, parent):
    return child != parent and os.path.commonpath([child, parent]) == parent


def _empty_folder(path):
    return os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path)


def check_output(output, inputs=(), force=False, directory=None):
    """Refuse an OUT that would lose data, before anything is computed. `directory`: True when the command writes a
    folder, False for a file, None when unknown yet."""
    if not os.fspath(output).strip():
        raise LorakitError("the output path is empty: give one (-o OUT)")
    out, flag = _real(output), opt("force", True)
    for given in inputs:
        if given is None:
            continue
        inp = _real(given)
        if out == inp:
            raise LorakitError("the output is also an input: choose another output path", path=output)
        if _inside(out, inp):
            raise LorakitError(
                f"the output lies inside the input {given}: choose a path outside it", path=output
            )
        if _inside(inp, out):
            raise LorakitError(
                f"the output would contain the input {given}: choose another output path", path=output
            )
    missing_parents = _missing_parents(out)
    parent = os.path.dirname(missing_parents[-1] if missing_parents else out)
    if not os.path.isdir(parent):
        raise LorakitError("is a file, not a folder: cannot write the output under it", path=parent)
    if not os.path.lexists(out):
        return
    if directory is not False and _empty_folder(out):  # made beforehand (mkdir out): nothing in it to lose
        return
    if not force:
        raise LorakitError(f"output exists (use {flag} to replace it)", path=output)
    if directory is None:
        return
    is_dir = os.path.isdir(out) and not os.path.islink(out)
    if directory and not is_dir:
        raise LorakitError(
            f"output exists as a file; this writes a folder, and {flag} replaces only an output of "
            "the same kind",
            path=output,
        )
    if not directory and is_dir:
        raise LorakitError(
            f"output exists as a folder; this writes a single file, and {flag} replaces only an "
            "output of the same kind",
            path=output,
        )
    if (
        directory
        and os.listdir(out)
        and not any(f.endswith((".safetensors", ".json", ".bin")) for f in os.listdir(out))
    ):
        raise LorakitError(
            f"output folder holds no model or adapter files: {flag} replaces only an output of this "
            "kind, not any folder",
            path=output,
        )


def _missing_parents(path):
    """OUT's parent folders that do not exist, deepest first (they are created, as save_pretrained does)."""
    missing, folder = [], os.path.dirname(path)
    while not os.path.lexists(folder) and os.path.dirname(folder) != folder:
        missing.append(folder)
        folder = os.path.dirname(folder)
    return missing


def _make_parents(path):
    """Create OUT's missing parent folders; returns them, deepest first, for removal if the command fails."""
    made = _missing_parents(path)
    for f in reversed(made):
        try:
            os.mkdir(f, 0o777)
        except FileExistsError:
            pass
        except OSError as e:
            raise LorakitError(f"cannot create the output folder: {e.strerror or e}", path=f) from None
    return made


def _remove_empty(folders):
    for f in folders:
        try:
            os.rmdir(f)
        except OSError:
            break


# `.<OUT name>.lorakit-<pid>.<8 hex>.<tmp|old>`: what _temporary_name makes, whatever the OUT
STALE = re.compile(r"\..*" + re.escape(TAG) + r"(\d+)\.[^.]+\.(tmp|old)")


def remove_stale_temporaries(path):
    """Every lorakit temporary in OUT's folder (of any OUT) left by a run whose process is gone (SIGKILL, power
    loss): its pid is not running, or is running a process started after the temporary was made (a reused pid)."""
    parent = os.path.dirname(path)
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        m = STALE.fullmatch(name)
        if m is None or int(m[1]) == os.getpid():
            continue
        stale = os.path.join(parent, name)
        try:
            made = os.lstat(stale).st_mtime
        except OSError:
            continue
        if _alive(int(m[1]), made):
            continue
        shutil.rmtree(stale, ignore_errors=True) if os.path.isdir(stale) else _unlink(stale)


def _alive(pid, since):
    """Whether process `pid` runs and was started before time `since` (so it may own what was made then)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    started = _start_time(pid)
    return started is None or started <= since + 1


def _start_time(pid):
    """A process's start time (seconds since the epoch) from /proc, or None where /proc does not tell."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _temporary_name(path, suffix):
    parent, base = os.path.split(path)
    return os.path.join(parent, f".{base}{TAG}{os.getpid()}.{secrets.token_hex(4)}.{suffix}")


def _rename_noreplace(src, dst):
    """rename(src, dst) that fails with FileExistsError when dst exists, atomically where the kernel can."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        renameat2 = None
    if renameat2 is not None:
        at_fdcwd, rename_noreplace = -100, 1
        if renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), rename_noreplace) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), dst)
        if err not in (errno.EINVAL, errno.ENOSYS):  # EINVAL/ENOSYS: no renameat2 on this filesystem
            raise OSError(err, os.strerror(err), dst)
    if os.path.isdir(src):
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "exists", dst)
        os.rename(src, dst)
    else:
        os.link(src, dst)  # fails if dst exists
        os.unlink(src)


@contextmanager
def atomic_output(path, force=False, directory=False):
    """Yield a temporary path next to `path`; rename it to `path` only when the block completes."""
    path = os.path.abspath(os.fspath(path))
    check_output(path, force=force, directory=directory)
    made = _make_parents(path)
    remove_stale_temporaries(path)
    tmp = _temporary_name(path, "tmp")
    try:
        if directory:
            os.mkdir(tmp, 0o777)  # the umask applies, as for any folder the user makes
        else:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as e:
        _remove_empty(made)
        raise LorakitError(f"cannot write next to the output: {e.strerror or e}", path=path) from None
    try:
        yield tmp
        _publish(tmp, path, force, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True) if os.path.isdir(tmp) else _unlink(tmp)
        _remove_empty(made)
        raise


def _publish(tmp, path, force, directory):
    try:
        if directory and _empty_folder(path):
            _rename_onto_empty(tmp, path)
        elif not (force and os.path.lexists(path)):
            _rename_noreplace(tmp, path)
        elif not directory:
            os.replace(tmp, path)  # atomic: the old file stays until the new one is complete
        else:
            old = _temporary_name(path, "old")
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
    except FileExistsError:
        raise LorakitError(
            "output appeared while this command ran (another process writing it?): it was left "
            "alone and this result discarded",
            path=path,
        ) from None


def _rename_onto_empty(tmp, path):
    """A folder made beforehand and still empty is replaced in one rename (POSIX replaces an empty folder only):
    something written into it meanwhile makes the rename fail, and it is left alone."""
    try:
        os.rename(tmp, path)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise FileExistsError(path) from None
        raise


def _unlink(p):
    try:
        os.unlink(p)
    except FileNotFoundError:
        pass
