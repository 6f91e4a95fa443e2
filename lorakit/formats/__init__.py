"""Adapter formats: a registry of readers and writers, detected from file content.

A format is one module of this package with `detect(probe) -> bool`, and `read(path, ...)` and/or
`write(adapter, path, force=False, ...) -> notes`; the keyword parameters a reader or writer declares are the options
it takes, and any other option given to it is an error, never silently dropped. Adding a format: its file here, and
its row in FORMATS (whose order is the detection order).

Torch-free at import: the CLI takes its choices from FORMATS.
"""

import importlib
import inspect
import os
from dataclasses import dataclass
from typing import Callable

from ..errors import MALFORMED, LorakitError, missing, with_path
from .common import refuse_padding, refuse_transforms

# the formats that can say a LoRA widens its base weight (Module.pads_base)
PADDING_FORMATS = ("lorakit", "comfyui", "diffusers")
# the formats written as a folder (a config beside the weights), never as one file
FOLDER_FORMATS = ("peft", "mlx")

# name -> (module in this package, description). Detection asks them in this order: the spec format first, then
# the formats whose keys another could resemble (diffusers' PEFT-style keys under component prefixes before PEFT).
FORMATS = {
    "lorakit": ("lorakit_v1", "lorakit adapter spec v1 (one safetensors file)"),
    "diffusers": ("diffusers", "diffusers LoRA (PEFT keys under unet./text_encoder./transformer.)"),
    "comfyui": (
        "comfyui",
        "ComfyUI / original-names LoRA (diffusion_model.<module>.lora_*, alpha, diff; Wan, "
        "HunyuanVideo, Qwen-Image, xlabs Flux ...)",
    ),
    "peft": ("peft", "PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) or bare file"),
    "mlx": ("mlx", "MLX LM adapter folder (adapter_config.json + adapters.safetensors, mlx_lm.lora's)"),
    "kohya": ("kohya", "kohya-ss/sd-scripts LoRA (and LyCORIS, read)"),
    "loralib": ("loralib", "microsoft/LoRA loralib .pt state dict (read only; needs --alpha)"),
    "gguf": ("gguf_lora", "llama.cpp GGUF LoRA adapter (Llama family; needs the gguf package)"),
}
ALIASES = {
    "original": "comfyui",
    "lycoris": "kohya",
    "sd-scripts": "kohya",
    "llama.cpp": "gguf",
    "microsoft-lora": "loralib",
    "mlx-lm": "mlx",
}


@dataclass
class Format:
    name: str
    detect: Callable
    read: Callable = None
    write: Callable = None
    description: str = ""


def get_format(name):
    name = ALIASES.get(name, name)
    if name not in FORMATS:
        raise LorakitError(f"unknown format '{name}' (known: {', '.join(FORMATS)})")
    module_name, description = FORMATS[name]
    module = importlib.import_module(f"{__name__}.{module_name}")
    return Format(
        name, module.detect, getattr(module, "read", None), getattr(module, "write", None), description
    )


class Probe:
    """What detectors look at, read once for all of them: the path, and the safetensors header when it is one."""

    def __init__(self, path, header=None):
        self.path = path
        self.is_dir = os.path.isdir(path)
        self.is_file = os.path.isfile(path)
        self._header = False if header is None else header  # a header parsed already (an opened base's)

    @property
    def header(self):
        """The parsed safetensors header, or None when the path is not a valid safetensors file."""
        if self._header is False:
            from ..io import read_header

            try:
                self._header = read_header(self.path) if self.is_file else None
            except LorakitError:
                self._header = None
        return self._header

    def magic(self, n):
        if not self.is_file:
            return b""
        with open(self.path, "rb") as f:
            return f.read(n)


def detect_format(path, header=None):
    """The registered format whose detector accepts the content at `path` (`header`: its safetensors header, when
    parsed already)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise missing(path)
    probe = Probe(path, header)
    for name in FORMATS:
        fmt = get_format(name)
        if fmt.detect(probe):
            return fmt
    if probe.is_file and probe.header is None:
        from ..io import read_header

        if named_other_container(path):  # yet no GGUF detector took it: say so, not safetensors' defects
            raise LorakitError(
                f"not a GGUF file: it starts with {probe.magic(4)!r}, not b'GGUF' (empty, truncated or another "
                "kind of file)",
                path=path,
            )
        read_header(path)  # a broken safetensors file: raise its precise defect rather than "not recognized"
    if _is_model(probe):
        raise LorakitError(
            "this is a model checkpoint, not an adapter: a model goes where a command takes BASE "
            "(lorakit merge BASE ADAPTER -o OUT; --base BASE for inspect, validate, convert, train)",
            path=path,
        )
    if probe.is_dir:
        refuse_incomplete_folder(path)
    raise LorakitError(f"not a recognized adapter (known formats: {', '.join(FORMATS)})", path=path)


def refuse_incomplete_folder(path):
    """A folder no format took: empty, or a PEFT folder whose weights file is missing (a partial download)."""
    from .peft_config import CONFIG

    names = os.listdir(path)
    if not names:
        raise LorakitError("is an empty folder: no adapter in it", path=path)
    if CONFIG in names and not any(n.startswith("adapter_model.") for n in names):
        raise LorakitError(
            "holds adapter_config.json but no adapter_model.safetensors (or .bin): the PEFT adapter's weights are "
            "missing (an interrupted download?)",
            path=path,
        )
    from ..naming import natural_key

    named = sorted((n for n in names if os.path.isfile(os.path.join(path, n, CONFIG))), key=natural_key)
    if named:  # PEFT saves an adapter not named "default" under its name (and a Trainer under checkpoint-N)
        raise LorakitError(
            f"holds no adapter itself, but its sub-folder(s) {', '.join(n + '/' for n in named[:4])}"
            f"{' ...' if len(named) > 4 else ''} hold PEFT adapters: pass one, e.g. the last, "
            f"{os.path.join(os.fspath(path), named[-1])}",
            path=path,
        )


def named_other_container(path):
    """Whether a file is named for a container other than safetensors (GGUF), so that safetensors' checks say
    nothing useful when it is broken."""
    from ..io.gguf import named_gguf

    return named_gguf(path)


def refuse_misnamed(format, path):
    """An output named for GGUF in a safetensors format, or .safetensors in the GGUF one, refused (every reader would
    take it for a broken file of the other kind): by every writer, and by commands that write only after long work
    (train) before it."""
    name = ALIASES.get(format, format)
    gguf = name == "gguf"
    if named_other_container(path) and not gguf:
        raise LorakitError(
            f"the name says GGUF, but the {format} format is safetensors: name it otherwise, or write a GGUF "
            "adapter (--to gguf, --for llama.cpp)",
            path=path,
        )
    if gguf and os.fspath(path).lower().endswith(".safetensors"):
        raise LorakitError(
            "the name says safetensors, but a llama.cpp adapter is a GGUF file: name it .gguf", path=path
        )
    if name in FOLDER_FORMATS and os.fspath(path).lower().endswith((".safetensors", ".bin", ".pt")):
        raise LorakitError(
            f"the name says one file, but {a_format(name)} adapter is a folder (its config beside its weights): "
            "name it without the suffix",
            path=path,
        )


def a_format(name):
    """'a peft', 'an mlx': a format's name with its article, for messages."""
    return f"{'an' if name == 'mlx' else 'a'} {name}"


def is_model(path):
    """Whether `path` is a model checkpoint (a base), not an adapter."""
    return _is_model(Probe(os.fspath(path)))


def _is_model(probe):
    """A Hugging Face model folder (config.json beside weights or an index) or a safetensors file of weights."""
    if probe.is_dir:
        names = os.listdir(probe.path)
        weights = any(
            n.endswith((".safetensors", ".bin", ".gguf")) or n.endswith(".index.json") for n in names
        )
        return "config.json" in names and weights or "model_index.json" in names
    header = probe.header
    names = [n for n in header.entries if n != "__metadata__"] if header is not None else []
    return bool(names) and all(
        n.endswith((".weight", ".bias", "_scale", ".scales", ".qweight")) for n in names
    )


def adapter_format(base):
    """The adapter format of an opened base (what was given as BASE), or None: a model, or something the base will
    say is broken. The base's own parsed header is looked at (never parsed twice). A GGUF is left to the base, which
    reads general.type with the rest of its header."""
    try:
        fmt = detect_format(base.path, getattr(base, "single_file_header", None))
    except LorakitError:
        return None
    return None if fmt.name == "gguf" else fmt


def foreign_container(path):
    """For a file in a container other than safetensors: (spec code, message) saying what it is (LK105 with no
    message: another tool's adapter, to convert; LK101: a model, no adapter at all), or None."""
    from ..io.gguf import GGUFHeader, is_gguf

    if not is_gguf(path):
        return None
    try:
        kind = GGUFHeader(path).kv.get("general.type")
    except LorakitError as e:  # truncated or corrupt: its defect, not a guess at what it is
        return "LK101", (f"tensor '{e.tensor}': " if e.tensor else "") + e.message
    if kind == "adapter":
        return "LK105", None
    return "LK101", "this is a GGUF model (llama.cpp), not an adapter file"


def takes(function):
    """The keyword options a reader or writer declares."""
    return {
        p.name
        for p in inspect.signature(function).parameters.values()
        if p.kind == p.POSITIONAL_OR_KEYWORD and p.default is not p.empty
    }


def given(options):
    """Options that were actually set (None and False are 'not given')."""
    return {k: v for k, v in options.items() if v is not None and v is not False}


def check_options(fmt, role, function, options, path=None):
    extra = sorted(set(given(options)) - takes(function))
    if extra:
        shown = ", ".join("--" + k.replace("_", "-") for k in extra)
        raise LorakitError(f"the {fmt.name} {role} does not use {shown}", path=path)


def _opened_base(options):
    """Readers and writers get `base` as an opened Base (lorakit.bases): a path is opened here, once."""
    if options.get("base") is not None:
        from ..bases import open_base

        options = {**options, "base": open_base(options["base"])}
    return options


def load(path, format=None, **options):
    """Read an adapter in any registered format (auto-detected from content unless `format` is given)."""
    path = os.fspath(path)
    fmt = get_format(format) if format else detect_format(path)
    if fmt.read is None:
        raise LorakitError(f"format '{fmt.name}' cannot be read", path=path)
    check_options(fmt, "reader", fmt.read, options, path)
    options = _opened_base({k: v for k, v in options.items() if k in takes(fmt.read)})
    try:
        adapter = fmt.read(path, **options)
    except LorakitError as e:
        raise with_path(e, path) from None
    except MALFORMED as e:  # a layout no check above foresaw: still one line naming the file
        raise LorakitError(f"malformed {fmt.name} adapter ({type(e).__name__}: {e})", path=path) from None
    from ..spec import check_adapter, raise_first

    raise_first(check_adapter(adapter, values=options.get("values", True)), path)
    return adapter


def save(adapter, path, format="lorakit", force=False, **options):
    """Write `adapter` in `format`. Returns the writer's notes (what it had to change to fit the format)."""
    fmt = get_format(format)
    if fmt.write is None:
        writable = ", ".join(n for n in FORMATS if get_format(n).write)
        raise LorakitError(f"format '{fmt.name}' cannot be written (writable: {writable})")
    refuse_misnamed(fmt.name, path)
    check_options(fmt, "writer", fmt.write, options, path)
    options = _opened_base(options)
    from ..spec import check_adapter, raise_first

    raise_first(
        check_adapter(adapter), path
    )  # nothing that fails the spec's checks is written, in any format
    refuse_transforms(adapter, path)
    if fmt.name not in PADDING_FORMATS:
        refuse_padding(adapter, fmt.name, path)
    try:
        return (
            fmt.write(
                adapter,
                os.fspath(path),
                force=force,
                **{k: v for k, v in options.items() if k in takes(fmt.write)},
            )
            or []
        )
    except OSError as e:
        raise LorakitError(f"cannot write the output: {e.strerror or e}", path=path) from None
    except (
        LorakitError
    ) as e:  # what the adapter holds that the format cannot: named by the file it was going to
        raise with_path(e, path) from None
