"""Hugging Face Hub ids where a path goes (`Qwen/Qwen3-8B`, `user/adapter@revision`), as PEFT, mergekit and axolotl
take them. An argument that exists on disk is always a path; only one that does not, and reads as `org/name`, is an
id. `huggingface_hub` (the `hub` extra) is imported only then. The local cache comes first (nothing is fetched again),
`HF_HUB_OFFLINE` is honored (read when the command runs), and a download fetches only the files of the role the
argument plays (an adapter's config and weights; a model's configs, tokenizer and weights in one format).
"""

import os
import re

from ..errors import LorakitError

HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?")

# What each role reads: never READMEs, optimizer states, other frameworks' weights or training logs.
ROLE_FILES = {
    "adapter": ["adapter_config.json", "*.safetensors", "*.gguf", "adapter_model.bin", "*.pt"],
    "base": ["*.json", "*.safetensors", "*.gguf", "tokenizer.model", "*.txt"],
    "data": ["*.jsonl", "*.txt", "*.npy", "*.bin", "*.json"],
}
ROLE_SKIPPED = ["*.pth", "original/*", "*.onnx", "*.msgpack", "*.h5", "optimizer*", "training_args*"]


def is_hub_id(text):
    return bool(HUB_ID.fullmatch(text)) and not text.startswith(".")


def offline():
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def local(path, role="adapter", quiet=False, header_only=False):
    """`path` itself when it exists on disk or is no hub id; otherwise the local snapshot folder of the hub repo it
    names (for an adapter, its one safetensors file where it holds no adapter_config.json), fetched where the cache
    lacks it.
    `header_only` (inspect without --spectrum): online, no weights are fetched, only headers and alphas."""
    if path is None or not isinstance(path, (str, os.PathLike)):
        return path
    text = os.fspath(path)
    if os.path.exists(text) or not is_hub_id(text):
        return path
    m = HUB_ID.fullmatch(text)
    hub = _import_hub(text)
    options = dict(
        repo_id=m["repo"],
        revision=m["revision"],
        cache_dir=_cache_dir(hub),
        allow_patterns=ROLE_FILES[role],
        ignore_patterns=ROLE_SKIPPED,
    )
    pick = _single_file if role == "adapter" else (lambda folder: folder)
    try:  # the cache first: no network at all
        return pick(hub.snapshot_download(**options, local_files_only=True))
    except Exception:  # any miss of the cache: fetch (below) or say why not
        if offline():
            raise _error(text, "not in the local cache and HF_HUB_OFFLINE is set") from None
    if header_only:
        try:
            return pick(_headers(hub, m["repo"], m["revision"]))
        except Exception as e:  # every failure becomes one line naming the id
            raise _error(text, _reason(e)) from None
    return pick(_download(hub, text, options, quiet))


def _single_file(folder):
    """A repo of one safetensors adapter (kohya, diffusers, lorakit files) as that file; a PEFT folder as itself."""
    names = os.listdir(folder)
    weights = [n for n in names if n.endswith(".safetensors")]
    if "adapter_config.json" not in names and len(weights) == 1:
        return os.path.join(folder, weights[0])
    return folder


def _headers(hub, repo, revision):
    """A temporary stand-in of the repo's top folder: its JSON files, and each safetensors file as its header and
    its alpha scalars fetched over HTTP ranges, the rest of its size a hole (sparse, never written): what a
    header-only read needs, with no weights over the network."""
    import atexit
    import shutil
    import tempfile

    fs = hub.HfFileSystem()
    root = f"{repo}@{revision}" if revision else repo
    folder = tempfile.mkdtemp(prefix="lorakit-hub-")
    atexit.register(shutil.rmtree, folder, True)
    for entry in fs.ls(root, detail=True):
        name = os.path.basename(entry["name"])
        if entry.get("type") == "file" and name.endswith(".json"):
            with open(os.path.join(folder, name), "wb") as f:
                f.write(fs.cat_file(entry["name"]))
        elif entry.get("type") == "file" and name.endswith(".safetensors"):
            _stand_in(fs, entry["name"], entry["size"], os.path.join(folder, name))
    return folder


def _stand_in(fs, remote, size, path):
    from .jsonio import parse_json

    with fs.open(remote, "rb") as src, open(path, "wb") as dst:
        head = src.read(8)
        n = int.from_bytes(head, "little")
        if len(head) < 8 or n > min(size, 100_000_000):
            raise LorakitError("not a safetensors file (its header length is out of range)", path=remote)
        header = src.read(n)
        dst.write(head + header)
        entries = parse_json(header, remote, "safetensors header")
        for name, info in entries.items():
            if name.endswith(".alpha") and isinstance(info, dict):  # alphas are data: a few bytes each
                start, end = info["data_offsets"]
                src.seek(8 + n + start)
                dst.seek(8 + n + start)
                dst.write(src.read(end - start))
        dst.truncate(size)


def _download(hub, text, options, quiet):
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    if quiet:
        disable_progress_bars()
    try:
        return hub.snapshot_download(**options)
    except Exception as e:  # every failure becomes one line naming the id
        raise _error(text, _reason(e)) from None
    finally:
        if quiet:
            enable_progress_bars()


def _import_hub(text):
    try:
        import huggingface_hub
    except ImportError:
        raise LorakitError(
            "no such file or folder; to read it as a Hugging Face hub id, install huggingface_hub "
            "(pip install 'lorakit[hub]')",
            path=text,
        ) from None
    return huggingface_hub


def _cache_dir(hub):
    """The cache folder as the environment says now (huggingface_hub reads it once, at its import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return hub.constants.HF_HUB_CACHE


def _reason(e):
    name = type(e).__name__
    if name in ("RepositoryNotFoundError", "GatedRepoError"):
        return "no such repository on the Hugging Face hub (or it is private or gated: log in with `hf auth login`)"
    if name == "RevisionNotFoundError":
        return "no such revision in the repository"
    if "Connect" in name or "Timeout" in name or "Offline" in name or "LocalEntryNotFound" in name:
        return "not in the local cache and the Hugging Face hub cannot be reached (no network?)"
    return f"cannot fetch it from the Hugging Face hub ({name}: {str(e).splitlines()[0] if str(e) else ''})"


def _error(text, reason):
    return LorakitError(f"no such file or folder, and as a Hugging Face hub id: {reason}", path=text)
