"""What every base container gives the commands and the merge engine: its tensors as records, its config (read
once), its full-precision view, its names for an adapter's modules, and a writer of the same container kind."""

import os
import re
from dataclasses import dataclass
from functools import cached_property

from ..errors import LorakitError

HUB_SNAPSHOT = re.compile(r"models--(?P<id>[^/]+)/snapshots/[^/]+$")  # the Hugging Face cache's layout


@dataclass(frozen=True)
class TensorRecord:
    """One weight of a base as the engine sees it. A quantized module is one record (`<module>.weight`, its
    full-precision shape, `quant` its format) standing for its packed tensors (`members`)."""

    name: str
    shape: tuple
    dtype: str  # the stored dtype (safetensors or GGML type name); a quantized module: its codes' tensor's
    quant: str  # the quantized format's name, or None
    file: str  # the file holding it (a quantized module: its first member's)
    span: tuple  # (start, end) byte offsets in `file` (a quantized module: its first member's)
    members: tuple = ()  # a quantized module's stored tensors


@dataclass(frozen=True)
class Slice:
    """Rows [start, stop) of a fused base tensor that another tool names as a module of its own (a diffusers
    `to_q` inside a fused `qkv`), `swapped` when the two halves of the rows come in the other order."""

    alias: str
    tensor: str
    start: int
    stop: int
    swapped: bool = False
    transposed: bool = (
        False  # the alias's weight is these rows transposed (an MXFP4 expert: [in, out] in full)
    )


class Base:
    """A base checkpoint opened once: every command and the merge engine use this one object. Subclasses (one per
    container kind, registered in lorakit.bases.KINDS) set `path`, `ckpt` (stored tensors), `view` (WeightView) and
    `config`, and override what differs: names, output files, writer, notes."""

    kind = None
    components = None  # {name: Base} for a container of several models (a diffusers pipeline)
    kv = None  # a GGUF's key-value metadata
    experts = None  # the names of 3-D Mixture-of-Experts tensors [E, rows, cols] (a compiled regex), or None

    def __fspath__(self):
        return self.path  # an opened base stands where its path would

    @property
    def quantized(self):
        return bool(self.view.quantized)

    @cached_property
    def records(self):
        """{name: TensorRecord}: the full-precision weights and the stored tensors no quantized module hides."""
        view, out = self.view, {}
        for name in view.names:
            members = (
                tuple(view.handler.members(view.ckpt, view.quantized[name])) if name in view.quantized else ()
            )
            entry = self.ckpt.entry(members[0] if members else name)
            out[name] = TensorRecord(
                name,
                view.shape(name),
                entry.dtype,
                view.handler.name if members else None,
                self.ckpt.where[entry.name],
                (entry.start, entry.end),
                members,
            )
        return out

    @cached_property
    def _shapes(self):
        return self.view.shapes()

    def shapes(self):
        """{tensor name: full-precision shape}: what adapters are resolved and fingerprinted against."""
        return self._shapes

    def __contains__(self, name):
        return name in self.view

    def shape(self, name):
        """A tensor's full-precision shape; a 3-D expert tensor's as its E x rows rows (its quantized blocks, if any,
        run along the last axis, so each expert's rows follow each other): an expert's LoRA is a slice of them."""
        stored = self._expert_shape(name)
        return (stored[0] * stored[1], stored[2]) if stored else self.view.shape(name)

    def _expert_shape(self, name):
        """The stored [E, rows, cols] of a 3-D expert tensor (a quantized one: as its codes lie), else None."""
        if self.experts is None or not self.experts.fullmatch(name):
            return None
        if name in self.view.quantized:
            stored = self.view.handler.experts_shape(self.ckpt, self.view.quantized[name])
            if stored is not None:
                return tuple(stored)
        stored = tuple(self.ckpt.entry(name).shape) if name in self.ckpt else ()
        return stored if len(stored) == 3 else None

    def expert_module(self, name, e):
        """The module an adapter names expert e of the 3-D expert tensor `name` by (its slice `name[e]` as the
        full-precision tensor lies), or None when `name` is no expert tensor."""
        return f"{name}.{e}" if self._expert_shape(name) is not None else None

    def expert_slices(self, aliases):
        """{alias: Slice} for every expert e of every expert tensor: `aliases(tensor, e)` gives expert e's names."""
        out = {}
        for name in self.view.names:
            stored = self._expert_shape(name)
            transposed = name in self.view.quantized and self.view.handler.transposed_experts
            for e in range(stored[0] if stored else 0):
                for alias in aliases(name, e):
                    out[alias] = Slice(alias, name, e * stored[1], (e + 1) * stored[1], transposed=transposed)
        return out

    def get(self, name):
        """A full-precision tensor (quantized modules dequantized)."""
        return self.view.get(name)

    @cached_property
    def fused_slices(self):
        """{alias: Slice}: other tools' names for rows of this base's fused tensors (diffusers names on an
        original single file's qkv)."""
        from ..naming.fused import fused_aliases

        return {a: Slice(a, *spec) for a, spec in fused_aliases(self.shapes()).items()}

    @property
    def model_type(self):
        """The Hugging Face model type (config.json's `model_type`), or None where the base does not say."""
        return (self.config or {}).get("model_type")

    def alias_shapes(self):
        """{'<alias>.weight': shape}: the modules other tools name inside this base's fused tensors (fused_slices:
        a GGUF's per-expert Hugging Face modules), as their rows lie."""
        out = {}
        for alias, piece in self.fused_slices.items():
            rows, cols = piece.stop - piece.start, self.shape(piece.tensor)[1]
            out[f"{alias}.weight"] = (cols, rows) if piece.transposed else (rows, cols)
        return out

    @cached_property
    def split_slices(self):
        """{original name: [Slice]}: an original fused module's rows as the tensors a diffusers-layout base cuts it
        into."""
        from ..naming.fused import split_aliases

        return {a: [Slice(a, *s) for s in spec] for a, spec in split_aliases(self.shapes()).items()}

    @cached_property
    def identity(self):
        from ..spec import identity

        return identity(self.ckpt)

    @property
    def name(self):
        """The name an adapter records for this base: config.json's _name_or_path, else the hub id of a Hugging Face
        cache snapshot (.../models--org--name/snapshots/REV: org/name), else the file or folder's."""
        given = (self.config or {}).get("_name_or_path")
        if given:
            return given
        path = os.path.normpath(os.path.abspath(self.path))
        snapshot = HUB_SNAPSHOT.search(path if os.path.isdir(path) else os.path.dirname(path))
        return snapshot["id"].replace("--", "/", 1) if snapshot else os.path.basename(path)

    @property
    def tied_embeddings(self):
        return bool(self.config and self.config.get("tie_word_embeddings"))

    def to_base_names(self, adapter):
        """The adapter with its modules under this base's tensor names (and row order)."""
        return adapter

    # A model run on this base (training, calibration) asks for its weights by Hugging Face names:
    def hf_config(self):
        """The model's config.json (refused where the base has none)."""
        if self.config is None:
            raise LorakitError("no config.json: the base must be a Hugging Face model folder", path=self.path)
        return self.config

    def config_path(self):
        """Where the config comes from (for messages)."""
        return os.path.join(self.path, "config.json")

    def stored_name(self, hf_name):
        """The tensor a Hugging Face weight name is stored as ("" where this base has none)."""
        return hf_name

    def hf_row_order(self, hf_name, rows):
        """The permutation taking the stored rows to Hugging Face's order, or None where they agree."""
        return None

    def codes_readable(self, key):
        """Whether a quantized module's stored codes are read as they are (else it is dequantized)."""
        return True

    def from_base_names(self, adapter):
        """The inverse of to_base_names: an adapter on this base's names under Hugging Face's."""
        return adapter

    def full_precision(self, path):
        """The checkpoint `--full-precision-base` names, which must name its tensors as this base does."""
        raise LorakitError("this base has no full-precision counterpart", path=path)

    def uncodec_modules(self, plans, target_dtype):
        """Quantized modules the adapter touches that no codec writes back (written in --dtype instead)."""
        return None

    def output_files(self, output):
        """The output path of each output file, after checking OUT names the right kind of output."""
        return [os.fspath(output)]

    def writer(self, job, outputs, untie_embed, shard_size):
        raise NotImplementedError

    def notes(self, plans, job, options):
        """What this container kind had to decide during a merge."""
        return []

    def report(self, writer):
        """Container-specific entries of the merge report."""
        return {}
