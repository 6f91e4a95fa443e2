"""The Writer for GGUF bases (see lorakit.engine.pipeline): the output mirrors the base file by file (a split base
gives the same splits), each file with the base's version, alignment and KV section byte for byte."""

import os

from ..errors import LorakitError
from ..io import spec_nbytes
from ..io.gguf import SPLIT, GGUFHeader, GGUFShardWriter, tensor_nbytes


def output_files(output, count):
    """The output path of each of a base's `count` files: OUT itself, or `<prefix>-0000i-of-0000N.gguf` with the prefix
    of OUT (OUT may be named like the first split already)."""
    output = os.fspath(output)
    if count == 1:
        return [output]
    if not output.endswith(".gguf"):
        raise LorakitError(
            f"the base is a GGUF split in {count} files, and so is the output: -o names its first "
            "file (<prefix>.gguf or <prefix>-00001-of-...gguf)",
            path=output,
        )
    m = SPLIT.fullmatch(os.path.basename(output))
    prefix = os.path.join(os.path.dirname(output), m[1]) if m else output[: -len(".gguf")]
    return [f"{prefix}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]


class GGUFWriter:
    """`shards` are the output files (paths) with the tensors of the base file each mirrors; `open_shard` takes `tmp`
    as {output path: its temporary path}."""

    folder = False

    def __init__(self, job, outputs):
        self.job, ckpt = job, job.ckpt
        self.headers = dict(zip(outputs, (ckpt.shards[f].header for f in ckpt.files)))
        self.shards = [
            (out, [job.spec_of(n) for n in header.entries]) for out, header in self.headers.items()
        ]
        self.total = sum(spec_nbytes(spec) for _, specs in self.shards for spec in specs)

    def open_shard(self, tmp, file_name, specs):
        return GGUFShardWriter(tmp[file_name], self.headers[file_name], specs)

    def finish(self, tmp, weight_map, total):
        """Each file read back before its rename: a header that parses, every tensor where its info says."""
        for out, specs in self.shards:
            written = GGUFHeader(tmp[out])
            sizes = [tensor_nbytes(e.dtype, e.shape) for e in written.entries.values()]
            if list(written.entries) != [s[0] for s in specs] or sizes != [spec_nbytes(s) for s in specs]:
                raise LorakitError(
                    "the written GGUF does not read back as planned (nothing was published)", path=out
                )
