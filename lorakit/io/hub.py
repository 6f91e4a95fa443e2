"""Hugging Face Hub ids where a path goes (`Qwen/Qwen3-8B`, `user/adapter@revision`), as PEFT, mergekit and axolotl
take them. An argument that exists on disk is always a path; only one that does not, and reads as `org/name`, is an
id. `huggingface_hub` (the `hub` extra) is imported only then. The local cache comes first (nothing is fetched again),
`HF_HUB_OFFLINE` is honored (read when the command runs), and a download fetches only the files of the role the
argument plays (an adapter's config and weights; a model's configs, tokenizer and weights in one format).
"""

import fnmatch
import os
import re

from ..errors import LorakitError
from .gguf import named_gguf

# org/name, @revision, and for a base :TAG, the GGUF file of a repo of several (org/name-GGUF:Q4_K_M, as llama.cpp's
# -hf takes it)
HUB_ID = re.compile(
    r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?(?::(?P<tag>[A-Za-z][\w.-]*))?"
)
SPLIT = re.compile(r"-\d{5}-of-(\d{5})\.gguf$", re.IGNORECASE)

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
    if m["tag"] and role != "base":
        raise LorakitError(
            f"':{m['tag']}' picks one GGUF file of a model repo: only a base takes it", path=text
        )
    hub = _import_hub(text)
    options = dict(
        repo_id=m["repo"],
        revision=m["revision"],
        cache_dir=_cache_dir(hub),
        allow_patterns=ROLE_FILES[role],
        ignore_patterns=ROLE_SKIPPED,
    )
    pick = {"adapter": _single_file, "base": lambda folder: _base_in(folder, m, text)}.get(role, lambda f: f)
    try:  # the cache first: no network at all
        cached = hub.snapshot_download(**options, local_files_only=True)
    except Exception:  # any miss of the cache: fetch (below) or say why not
        cached = None
    found = pick(cached) if cached is not None else None  # None: the GGUF file :TAG names is not cached
    if found is not None:
        return found
    if offline():
        raise _error(text, "not in the local cache and HF_HUB_OFFLINE is set")
    if header_only:
        try:
            stand_in = _headers(hub, m["repo"], m["revision"])
        except Exception as e:  # every failure becomes one line naming the id
            raise _error(text, _reason(e)) from None
        if stand_in is not None:
            return pick(stand_in)
    if role in ("base", "adapter"):
        options.update(_fetched(role, _repo_files(hub, m, text), m, text))
    return pick(_download(hub, text, options, quiet))


def _fetched(role, names, m, text):
    """snapshot_download's patterns for a role, from the repo's file list: a base's one GGUF model (never every
    quantization) or its weights without Mistral's second copy; an adapter's top-level files (a Trainer's
    checkpoint-N sub-folders are not fetched), refused where only sub-folders hold one."""
    if role == "base":
        files = gguf_files(names, m, text)
        out = {"allow_patterns": files or [p for p in ROLE_FILES["base"] if p != "*.gguf"]}
        if any(n.startswith("model") and n.endswith(".safetensors") for n in names):
            # Mistral's repos hold their weights twice: Hugging Face shards and the original consolidated file
            out["ignore_patterns"] = [*ROLE_SKIPPED, "consolidated*"]
        return out
    top = [
        n
        for n in names
        if "/" not in n
        and any(fnmatch.fnmatch(n, p) for p in ROLE_FILES["adapter"])
        and not any(fnmatch.fnmatch(n, p) for p in ROLE_SKIPPED)
    ]
    if top:
        return {"allow_patterns": top}
    nested = sorted({n.rsplit("/", 1)[0] for n in names if n.endswith("/adapter_config.json")})
    if nested:
        raise LorakitError(
            f"the repo holds adapters only in sub-folders ({', '.join(nested[:4])}{' ...' if len(nested) > 4 else ''})"
            f": fetch one (hf download {m['repo']} --include '{nested[-1]}/*') and pass its folder",
            path=text,
        )
    return {}  # nothing an adapter reads: what the download finds says so


def gguf_files(names, m, text):
    """The files of the one GGUF model a base reads from a repo holding `names`: the one `m`'s :TAG names ('Q4_K_M'
    names 'model-Q4_K_M.gguf' and the splits of 'Q4_K_M/model-Q4_K_M-00001-of-00002.gguf'), or the repo's only
    one; None where no tag is given and the repo holds safetensors weights (those are read). Projector files
    (mmproj) are not a model."""
    models = {}
    for name in sorted(names):
        if named_gguf(name) and "mmproj" not in os.path.basename(name).lower():
            models.setdefault(SPLIT.sub(r"-00001-of-\1.gguf", name), []).append(name)
    tag = m["tag"]
    if not tag and (not models or any(n.endswith(".safetensors") for n in names)):
        return None
    word = re.compile(rf"(^|[-_./]){re.escape(tag or '')}([-.]|$)", re.IGNORECASE)
    chosen = [files for first, files in models.items() if not tag or word.search(SPLIT.sub(".gguf", first))]
    if len(chosen) == 1:
        return chosen[0]
    tags = sorted({_tag(first) for first in models})
    what = f"no GGUF file named for ':{tag}'" if tag and not chosen else f"{len(chosen)} GGUF models"
    raise LorakitError(
        f"the repo holds {what} ({', '.join(tags) or 'none'}): name one as {m['repo']}:TAG, e.g. "
        f"{m['repo']}:{tags[0] if tags else 'Q4_K_M'}",
        path=text,
    )


def _tag(first):
    """'Q4_K_M' of 'model-Q4_K_M.gguf' or 'Model.Q4_K_M.gguf' (or of its first split): the name's last part."""
    return re.split(r"[-.]", os.path.basename(SPLIT.sub(".gguf", first))[: -len(".gguf")])[-1]


def _base_in(folder, m, text):
    """A base's path in a snapshot folder: the folder, or its one GGUF model's (first) file; None where the file :TAG
    names is not there (not cached)."""
    names = [
        os.path.relpath(os.path.join(d, f), folder).replace(os.sep, "/")
        for d, _, files in os.walk(folder)
        for f in files
    ]
    try:
        files = gguf_files(names, m, text)  # None: no tag, and no GGUF model or safetensors weights beside
    except LorakitError:
        if m["tag"]:  # not in what the cache holds: fetch it (the repo's own list decides)
            return None
        raise
    return folder if files is None else os.path.join(folder, files[0])


def _repo_files(hub, m, text):
    try:
        return hub.list_repo_files(m["repo"], revision=m["revision"])
    except Exception as e:  # every failure becomes one line naming the id
        raise _error(text, _reason(e)) from None


def _single_file(folder):
    """A repo of one adapter file (kohya, diffusers, lorakit safetensors; a llama.cpp GGUF LoRA) as that file; a
    PEFT or MLX folder as itself."""
    names = os.listdir(folder)
    weights = [n for n in names if n.endswith((".safetensors", ".gguf"))]
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
    # no safetensors file to stand in for (a GGUF LoRA): None, and the adapter is fetched whole
    return folder if any(n.endswith(".safetensors") for n in os.listdir(folder)) else None


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
