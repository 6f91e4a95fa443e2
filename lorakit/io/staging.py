"""Outputs written file by file into a work folder next to OUT, each file recorded in a journal once it is complete,
published (renamed into place) when every file is done: a merge killed at 90% resumes with the 10% left, and
several machines can each write their part of the files into one folder on shared storage.

The work folder is `.<OUT name>.lorakit-work` beside OUT (for several output files, beside the first). It holds the
finished files under their own names, each one's temporary while it is written (`.<name>.tmp`), and a journal per
part: `journal-<i>-of-<N>.jsonl`, whose first line is the identity of the job (its inputs' sizes and modification
times, its options, the planned files) and every further line one finished file (name, size, CRC-32 of its bytes
counted as they were written, or for a file copied whole the input it copies), appended after the file is synced
and renamed. A line cut short by a power loss is not a finished file; a journal
that does not parse otherwise, or whose identity differs from this job's, is refused. Each part holds a lock on its
journal while it writes.
"""

import fcntl
import json
import os
import shutil
import zlib

from ..errors import LorakitError, opt
from .atomic import _make_parents, _publish, _remove_empty
from .safetensors import kernel_copy

WORK = ".lorakit-work"
HASH_CHUNK = 8 << 20


def work_folder(output):
    parent, name = os.path.split(os.path.abspath(os.fspath(output)))
    return os.path.join(parent, f".{name}{WORK}")


def file_crc32(path):
    """The CRC-32 of a file's bytes (what the journal checks a finished file by)."""
    crc = 0
    with open(path, "rb", buffering=0) as f:
        view = memoryview(bytearray(HASH_CHUNK))
        while n := f.readinto(view):
            crc = zlib.crc32(view[:n], crc)
    return crc


def copy_file(source, path):
    """A whole file copied by the kernel (io.safetensors.kernel_copy); a plain copy of what the kernel cannot."""
    size = os.path.getsize(source)
    with open(source, "rb") as src, open(path, "wb") as dst:
        done = kernel_copy(src.fileno(), dst.fileno(), size, 0, 0)
        if done < size:
            src.seek(done)
            dst.seek(done)
            shutil.copyfileobj(src, dst, 16 << 20)
        dst.truncate(size)


def input_identity(paths):
    """What says an input is the same file as before: its real path, size and modification time (ns), each file
    of a folder included."""
    out = []
    for p in sorted({os.path.realpath(os.fspath(p)) for p in paths if p is not None}):
        files = [p] if not os.path.isdir(p) else sorted(os.path.join(p, f) for f in os.listdir(p))
        for f in files:
            if os.path.isfile(f):
                st = os.stat(f)
                out.append([f, st.st_size, st.st_mtime_ns])
    return out


def parse_part(part):
    """'i/N' -> (i, N), 1 <= i <= N; None -> (1, 1)."""
    if part is None:
        return 1, 1
    try:
        i, n = (int(x) for x in str(part).split("/"))
    except ValueError:
        raise LorakitError(f"{opt('part', bare=True)} is i/N (e.g. 2/8), not '{part}'") from None
    if not 1 <= i <= n:
        raise LorakitError(f"{opt('part', bare=True)} {part}: i must be between 1 and N")
    return i, n


def idle_part(output, files, sizes, part):
    """Whether `part` of a merge split into several has none of its files and finds the output published (no work
    folder): a part with nothing to write run after the others (N above the file count, a late array task) has
    nothing to check or do, and succeeds."""
    index, parts = parse_part(part)
    if parts == 1 or assign(list(files), sizes or {}, parts)[index - 1]:
        return False
    output = os.path.abspath(os.fspath(output))
    return os.path.lexists(output) and not os.path.isdir(work_folder(output))


class Staging:
    """The work folder of one output: `todo` (this part's files not yet done), `path(name)` to write a file to,
    `done(name)` once it is complete, `complete` when every part's files are done, `publish()` to rename."""

    def __init__(self, output, files, identity, folder, part=None, resume=False, force=False, sizes=None):
        self.output, self.files, self.folder = os.path.abspath(os.fspath(output)), list(files), folder
        # as the journal holds it: JSON (paths as strings, tuples as lists), so that the two compare
        self.identity = json.loads(
            json.dumps({"version": 1, **identity, "files": self.files}, default=os.fspath)
        )
        self.part, self.parts = parse_part(part)
        self.force, self.work = force, work_folder(self.output)
        self.sizes = sizes or {}  # bytes of each file, where known
        self.idle = idle_part(self.output, self.files, self.sizes, part)
        if self.idle:  # nothing of this merge falls to this part, and the other parts have published it
            self.finished, self.todo, self.resumed, self.written, self.published = {}, [], 0, 0, True
            return
        self.made = _make_parents(self.output)
        self.join = resume or self.parts > 1
        self._open(self.join)
        try:
            self.finished = self._verified(self._journals())
        except BaseException:
            self.lock.close()
            raise
        if os.path.getsize(self.journal_path) == 0:  # only once every journal there is this job's
            self._append(self.identity)
        mine = assign(self.files, self.sizes, self.parts)[self.part - 1]
        self.todo = [f for f in mine if f not in self.finished]
        self.resumed, self.written, self.published = len(mine) - len(self.todo), 0, False

    def _open(self, join):
        """The work folder, created, joined (resume, parts) or swept (a plain run after a killed one)."""
        if os.path.isdir(self.work) and not join:
            if self._locked_by_another():
                raise LorakitError("another merge is writing this output now", path=self.output)
            shutil.rmtree(self.work)
        os.makedirs(self.work, exist_ok=True)
        self.journal_path = os.path.join(self.work, f"journal-{self.part}-of-{self.parts}.jsonl")
        self.lock = open(self.journal_path, "a+")
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LorakitError(
                f"part {self.part}/{self.parts} of this output is being written by another process",
                path=self.output,
            ) from None
        self._cut_torn_line()

    def _cut_torn_line(self):
        """A journal line cut short by a power loss is dropped before anything is appended after it."""
        with open(self.journal_path, "rb") as f:
            data = f.read()
        if data and not data.endswith(b"\n"):
            os.truncate(self.journal_path, data.rfind(b"\n") + 1)

    def _locked_by_another(self):
        for name in os.listdir(self.work):
            if name.startswith("journal-"):
                with open(os.path.join(self.work, name)) as f:
                    try:
                        fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    except BlockingIOError:
                        return True
        return False

    def _journals(self):
        """{file: (size, sha256)} of every part's journal, each checked against this job's identity."""
        done = {}
        for name in sorted(os.listdir(self.work)):
            if name.startswith("journal-") and name.endswith(".jsonl"):
                done.update(self._read_journal(os.path.join(self.work, name)))
        return done

    def _read_journal(self, path):
        with open(path) as f:
            lines = f.read().split("\n")
        complete = lines[:-1]  # the text after the last newline is a line cut short: not a finished file
        if not complete:  # opened by a run refused before it wrote anything
            return {}
        try:
            records = [json.loads(line) for line in complete]
            if not all(_is_file_record(r) for r in records[1:]):
                raise ValueError("a line is not a finished file's record")
        except ValueError:
            raise LorakitError(
                "the journal of an earlier run does not parse (corrupt): remove the work folder or run without "
                f"{opt('resume', bare=True)}",
                path=path,
            ) from None
        if not records or records[0] != self.identity:
            raise LorakitError(
                f"the journal of an earlier run is for other inputs or options ({_what_differs(records, self.identity)}): "
                f"run the same command, or without {opt('resume', bare=True)} to start again",
                path=path,
            )
        return {r["file"]: r for r in records[1:]}

    def _verified(self, done):
        """The journal's files whose bytes on disk are still what it recorded (others are written again): the
        same size and CRC-32, or for a whole copy, the same bytes as its source."""
        ok = {}
        for name, record in done.items():
            path = os.path.join(self.work, name)
            if not os.path.isfile(path) or os.path.getsize(path) != record["size"]:
                continue
            if record.get("copy_of") is not None:
                good = os.path.isfile(record["copy_of"]) and file_crc32(path) == file_crc32(record["copy_of"])
            else:
                good = file_crc32(path) == record["crc32"]
            if good:
                ok[name] = record
        return ok

    def path(self, name):
        """Where file `name` is written; renamed to its own name by done()."""
        return os.path.join(self.work, f".{name}.tmp")

    def done(self, name, crc32=None, copy_of=None):
        """File `name` is complete: synced, renamed into the work folder, recorded in the journal with its size
        and CRC-32 (`crc32` as counted while writing; read back where not given), or as a whole copy of the
        input `copy_of`."""
        tmp, final = self.path(name), os.path.join(self.work, name)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        record = {"file": name, "size": os.path.getsize(final)}
        if copy_of is not None:
            record["copy_of"] = os.fspath(copy_of)
        else:
            record["crc32"] = crc32 if crc32 is not None else file_crc32(final)
        self._append(record)
        self.finished[name] = record
        self.written += 1

    def _append(self, record):
        self.lock.write(json.dumps(record, sort_keys=True) + "\n")
        self.lock.flush()
        os.fsync(self.lock.fileno())

    @property
    def complete(self):
        """Whether every file of every part is done (the journals read again: other parts write them too)."""
        if self.idle:
            return False  # published already: nothing to publish again
        self.finished.update(self._journals())
        return all(f in self.finished for f in self.files)

    def publish(self):
        """Rename the result into place and remove the work folder: the folder itself, or each file to OUT's
        folder. One part publishes: the one that takes the publication lock first."""
        marker = open(os.path.join(self.work, ".publishing"), "a")
        try:
            fcntl.flock(marker, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            marker.close()
            return
        for name in os.listdir(self.work):
            if name.startswith("journal-") or name.startswith("."):
                os.unlink(os.path.join(self.work, name))
        self.lock.close()
        marker.close()
        if self.folder:
            _publish(self.work, self.output, self.force, True)
        else:
            parent = os.path.dirname(self.output)
            for name in self.files:
                _publish(os.path.join(self.work, name), os.path.join(parent, name), self.force, False)
            os.rmdir(self.work)
        self.published = True

    def close(self):
        if not self.idle:
            self.lock.close()

    def abort(self):
        """After an error (not a kill): a plain run leaves nothing; a resumed or parted one keeps its work for the
        next --resume."""
        if self.idle:
            return
        self.lock.close()
        if not self.join:
            shutil.rmtree(self.work, ignore_errors=True)
            _remove_empty(self.made)


def assign(files, sizes, parts):
    """The files of each part: contiguous runs of the file order with about equal bytes (a file's size from
    `sizes`, 1 where unknown); the same assignment on every machine."""
    total = sum(sizes.get(f, 1) for f in files)
    out, acc = [[] for _ in range(parts)], 0
    for f in files:
        share = min(parts - 1, int(acc * parts / total)) if total else 0
        out[share].append(f)
        acc += sizes.get(f, 1)
    return out


def _is_file_record(r):
    if not isinstance(r, dict) or not isinstance(r.get("file"), str) or not isinstance(r.get("size"), int):
        return False
    return isinstance(r.get("crc32"), int) or isinstance(r.get("copy_of"), str)


def _what_differs(records, identity):
    if not records:
        return "it is empty"
    keys = sorted(k for k in identity if records[0].get(k) != identity.get(k))
    return ", ".join(keys) + " changed" if keys else "another version"
