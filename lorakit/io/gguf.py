"""GGUF checkpoints (llama.cpp) as bases: a strict reader of the container and a streaming writer. No gguf package:
the container is simple, and the writer keeps the input's KV section byte for byte (it is copied, never re-encoded).

Facts (ggml/docs/gguf.md, gguf-py constants): little-endian; magic "GGUF", u32 version (2 or 3), u64 tensor count,
u64 KV count; a KV is a string key (u64 length + UTF-8), a u32 value type and the value; a tensor info is the name,
u32 n_dims, u64 ne[n_dims] (ne[0] innermost: a weight [out, in] has ne = [in, out]), u32 GGML type and a u64 offset
relative to the data section, which starts at the next multiple of `general.alignment` (default 32) after the infos.
Every tensor's data starts at a multiple of the alignment. Split files (`<prefix>-00001-of-00003.gguf`, llama.cpp's
gguf-split) each carry a whole header; the first holds every KV, and `split.count` says how many there are.
"""

import os
import re
import struct

from ..errors import LorakitError
from .checkpoint import Checkpoint
from .safetensors import Entry, TensorFile, check_readable_file

# GGML type id -> (name, elements per block, bytes per block); tensors of every type are copied, known or not by a codec
GGML_TYPES = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}
TYPE_IDS = {name: i for i, (name, _, _) in GGML_TYPES.items()}
# element types that are plain arrays (read as tensors); every other type is blocks of packed codes
PLAIN = ("F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64")

# KV value types: id -> struct format (8: string, 9: array)
SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
STRING, ARRAY = 8, 9
MAX_COUNT = 1 << 40
SPLIT = re.compile(r"(.*)-(\d{5})-of-(\d{5})\.gguf")


def named_gguf(path):
    """Whether a path is named as a GGUF file (its suffix, whatever it holds)."""
    return os.fspath(path).lower().endswith(".gguf")


def is_gguf(path):
    """A file starting with the GGUF magic (a split's first file included)."""
    try:
        with open(path, "rb") as f:
            return os.path.isfile(path) and f.read(4) == b"GGUF"
    except OSError:
        return False


def tensor_nbytes(type_name, shape):
    """Bytes of a tensor of this GGML type and [.., out, in] shape (in a multiple of the block)."""
    _, block, size = GGML_TYPES[TYPE_IDS[type_name]]
    n = 1
    for d in shape:
        n *= d
    return n // block * size


class _Cursor:
    """Reads the header with bounds checks: a truncated or hostile header is one clear error, never a huge read."""

    def __init__(self, f, path, size):
        self.f, self.path, self.size = f, path, size

    def take(self, n):
        if n < 0 or self.f.tell() + n > self.size:
            raise LorakitError(
                "GGUF header runs past the end of the file (truncated or not GGUF)", path=self.path
            )
        return self.f.read(n)

    def unpack(self, fmt):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self):
        n = self.unpack("<Q")
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError:
            raise LorakitError("GGUF header holds a string that is not UTF-8", path=self.path) from None

    def value(self, vtype, depth=0):
        if vtype in SCALARS:
            return self.unpack(SCALARS[vtype])
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY and depth == 0:
            itype, count = self.unpack("<I"), self.unpack("<Q")
            if count > MAX_COUNT:
                raise LorakitError(f"GGUF array of {count} items", path=self.path)
            if itype in SCALARS:  # numbers: skipped in one read, kept as bytes
                fmt = SCALARS[itype]
                return ("array", itype, self.take(count * struct.calcsize(fmt)))
            return [self.value(itype, 1) for _ in range(count)]
        raise LorakitError(f"GGUF KV of unknown value type {vtype}", path=self.path)


class GGUFHeader:
    """One GGUF file's header: version, KVs (decoded, and the raw bytes of the whole KV section), tensor entries in
    torch order ([out, in]; dtype = the GGML type's name) and the alignment."""

    def __init__(self, path):
        check_readable_file(path)
        self.path, self.file_size = path, os.path.getsize(path)
        with open(path, "rb") as f:
            c = _Cursor(f, path, self.file_size)
            if c.take(4) != b"GGUF":
                raise LorakitError("not a GGUF file (no GGUF magic)", path=path)
            self.version = c.unpack("<I")
            if self.version not in (2, 3):
                raise LorakitError(
                    f"GGUF version {self.version}: versions 2 and 3 (little-endian) are read", path=path
                )
            n_tensors, n_kv = c.unpack("<Q"), c.unpack("<Q")
            if n_tensors > MAX_COUNT or n_kv > MAX_COUNT:
                raise LorakitError("GGUF header counts are impossible (corrupt file)", path=path)
            kv_start = f.tell()
            self.kv = {}
            for _ in range(n_kv):
                key = c.string()
                if key in self.kv:
                    raise LorakitError(f"GGUF KV '{key}' appears twice", path=path)
                self.kv[key] = c.value(c.unpack("<I"))
            self.kv_raw, self.n_kv = _slice(f, kv_start), n_kv
            infos = []
            for _ in range(n_tensors):
                name, n_dims = c.string(), c.unpack("<I")
                if n_dims > 4:  # GGML_MAX_DIMS
                    raise LorakitError(
                        f"{n_dims} dimensions (GGML tensors have at most 4)", path=path, tensor=name
                    )
                ne = [c.unpack("<Q") for _ in range(n_dims)]
                infos.append((name, ne, c.unpack("<I"), c.unpack("<Q")))
            self.header_end = f.tell()
        alignment = self.kv.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment < 1 or alignment & (alignment - 1):
            raise LorakitError(f"general.alignment is {alignment!r}: a power of two", path=path)
        self.alignment = alignment
        self.data_start = align(self.header_end, alignment)
        self.entries = {}
        for name, ne, type_id, offset in infos:
            if type_id not in GGML_TYPES:
                raise LorakitError(f"unknown GGML type {type_id}", path=path, tensor=name)
            type_name, block, size = GGML_TYPES[type_id]
            if ne and ne[0] % block:
                raise LorakitError(
                    f"{type_name} row of {ne[0]} elements is not whole blocks of {block}",
                    path=path,
                    tensor=name,
                )
            shape = tuple(reversed(ne))
            start = self.data_start + offset
            end = start + tensor_nbytes(type_name, shape)
            if offset % alignment or end > self.file_size:
                raise LorakitError(
                    f"data at offset {offset} ({end - start} bytes) is misaligned or runs past the "
                    "end of the file",
                    path=path,
                    tensor=name,
                )
            if name in self.entries:
                raise LorakitError("tensor named twice", path=path, tensor=name)
            self.entries[name] = Entry(name, type_name, shape, start, end)
        self.metadata = {}  # the safetensors header's field; GGUF KVs are in self.kv

    def split(self):
        """(split number, split count) from the split KVs, (0, 1) for a file that is whole."""
        return int(self.kv.get("split.no", 0)), int(self.kv.get("split.count", 1))


def _slice(f, start):
    end = f.tell()
    f.seek(start)
    raw = f.read(end - start)
    return raw


def align(n, alignment):
    return -(-n // alignment) * alignment


class GGUFFile(TensorFile):
    """One GGUF file's tensors: plain types as torch tensors, packed types as their bytes (uint8)."""

    def __init__(self, path, header=None):
        super().__init__(path, header or GGUFHeader(path))

    def read(self, name, buf=None):
        e = self.header.entries[name]
        if e.dtype in PLAIN:
            return super().read(name, buf)
        import torch

        if not e.nbytes:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(self.read_bytes(name, buf), dtype=torch.uint8, count=e.nbytes)


def split_files(path):
    """The files of a GGUF checkpoint: the file itself, or every split of `<prefix>-00001-of-0000N.gguf`."""
    m = SPLIT.fullmatch(os.path.basename(path))
    if not m:
        return [path]
    prefix, number, count = m[1], int(m[2]), int(m[3])
    if number != 1:
        raise LorakitError(
            f"this is split {number} of {count}: pass the first one ({prefix}-00001-of-{count:05d}.gguf)",
            path=path,
        )
    folder = os.path.dirname(path)
    files = [os.path.join(folder, f"{prefix}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    absent = [f for f in files if not os.path.isfile(f)]
    if absent:
        raise LorakitError(
            f"split GGUF: {len(absent)} of its {count} files are missing, e.g. {absent[0]}", path=path
        )
    return files


class GGUFCheckpoint(Checkpoint):
    """Tensor name -> lazy tensor across a GGUF file or its splits (the Checkpoint interface)."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self.files, self.index = split_files(self.path), None
        self.shards, self.where = {}, {}
        for i, file in enumerate(self.files):
            shard = GGUFFile(file)
            number, count = shard.header.split()
            if len(self.files) > 1 and (count != len(self.files) or number != i):
                raise LorakitError(
                    f"split.no = {number}, split.count = {count}: expected {i} of {len(self.files)}",
                    path=file,
                )
            self.shards[file] = shard
            for name in shard.header.entries:
                if name in self.where:
                    raise LorakitError(f"tensor also stored in {self.where[name]}", path=file, tensor=name)
                self.where[name] = file
        self.kv = self.shards[self.files[0]].header.kv

    def field(self, key):
        """A KV of the first file (None when absent)."""
        return self.kv.get(key)


class GGUFShardWriter:
    """Writes one GGUF file tensor by tensor: the header is the input's (version, KV section byte for byte) with the
    tensor infos of `specs` ((name, GGML type name, torch shape[, nbytes])), then each tensor's data in that order,
    each padded to the alignment as llama.cpp and gguf-py write them."""

    def __init__(self, path, header, specs):
        from .safetensors import DirectFile

        self.specs, self.alignment, self.next = list(specs), header.alignment, 0
        infos, offset = [], 0
        for name, type_name, shape, *_ in self.specs:
            data = name.encode()
            infos.append(
                struct.pack("<Q", len(data))
                + data
                + struct.pack("<I", len(shape))
                + b"".join(struct.pack("<Q", d) for d in reversed(shape))
                + struct.pack("<IQ", TYPE_IDS[type_name], offset)
            )
            offset = align(offset + tensor_nbytes(type_name, shape), self.alignment)
        head = (
            b"GGUF"
            + struct.pack("<IQQ", header.version, len(self.specs), header.n_kv)
            + header.kv_raw
            + b"".join(infos)
        )
        self.file = DirectFile(path)
        self.file.write(head + bytes(align(len(head), self.alignment) - len(head)))

    def _expect(self, name):
        spec = self.specs[self.next]
        assert spec[0] == name, f"tensor {name} written out of order (expected {spec[0]})"
        self.next += 1
        return tensor_nbytes(spec[1], spec[2])

    def _pad(self, n):
        self.file.write(bytes(align(n, self.alignment) - n))

    def write(self, name, tensor):
        from .safetensors import tensor_bytes

        n = self._expect(name)
        data = tensor_bytes(tensor)
        assert len(data) == n, f"tensor {name}: {len(data)} bytes, header says {n}"
        self.file.write(data)
        self._pad(n)

    def copy(self, name, source):
        n = self._expect(name)
        with open(source.path, "rb", buffering=0) as f:
            f.seek(source.header.entries[name].start)
            self.file.readinto_from(f, n)
        self._pad(n)

    def close(self):
        assert self.next == len(self.specs), "file closed before all tensors were written"
        self.file.close()

    @property
    def crc32(self):
        """The CRC-32 of the file's bytes, counted as they were written."""
        return self.file.crc32
