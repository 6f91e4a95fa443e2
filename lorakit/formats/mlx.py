"""MLX LM adapters (Apple's mlx-lm: `mlx_lm.lora` writes them, `mlx_lm.generate --adapter-path` and
`mlx_lm.fuse` read them): a folder of adapter_config.json + adapters.safetensors.

Facts (ml-explore/mlx-lm, mlx_lm/tuner/lora.py, tuner/utils.py, tuner/dora.py): the weights are the model's
trainable parameters by their MLX paths (`model.layers.0.self_attn.q_proj.lora_a`, the Hugging Face names for the
Llama family). LoRALinear: lora_a [in, r], lora_b [r, out], dW = scale * lora_b^T lora_a^T; LoRAEmbedding: lora_a
[num, r], lora_b [r, dim], dW = scale * lora_a lora_b; DoRA (fine_tune_type "dora"): `m` [out], W' = m * (W + dW) /
||W + dW|| per output row. One `scale` for every module (an absolute factor, not alpha / r) and one `rank`, in
config.lora_parameters; `keys` (paths inside a layer, or a model-level module's name) and `num_layers` (the last N
of model.layers; -1 all of them) say which layers get a LoRA, the others keep lora_b at zero when loaded.
"""

import json
import os
import re

import torch

from ..core import Adapter, Module
from ..errors import LorakitError
from ..io import atomic_output, read_config, write_safetensors
from ..naming.embeddings import HEAD, is_embedding
from ..serving import folded
from .common import check_rank, most_common, open_safetensors, refuse_deltas, refuse_unknown, t_contig

WEIGHTS, CONFIG = "adapters.safetensors", "adapter_config.json"
LEAVES = ("lora_a", "lora_b", "m")
LAYER = re.compile(r"(?:.*\.)?layers\.\d+\.(?P<key>.+)")  # a module inside a layer, by its path there


def detect(probe):
    path = probe.path
    if not probe.is_dir or not os.path.isfile(os.path.join(path, WEIGHTS)):
        return False
    config = read_config(path, CONFIG)
    return isinstance(config, dict) and "lora_parameters" in config


def read(path, allow_unknown=False, base=None):
    config = read_config(path, CONFIG)
    fine_tune = config.get("fine_tune_type", "lora")
    if fine_tune not in ("lora", "dora"):
        raise LorakitError(f"fine_tune_type '{fine_tune}' holds no adapter (full weights)", path=path)
    scale, rank = _parameters(config, path)
    tf, _ = open_safetensors(os.path.join(path, WEIGHTS))
    parts, unknown = {}, []
    for key in tf.header.entries:
        module, _, leaf = key.rpartition(".")
        if leaf in LEAVES and module:
            parts.setdefault(module, {})[leaf] = key
        else:
            unknown.append(key)
    notes = []
    refuse_unknown(path, unknown, allow_unknown, notes)
    ad = Adapter(
        source_format="mlx", notes=notes, provenance={"source_format": "mlx", "source_config": config}
    )
    for module, keys in sorted(parts.items()):
        ad.add(_module(path, module, {leaf: tf.get(k) for leaf, k in keys.items()}, scale, rank, fine_tune))
    _tied_head(ad, base, notes)
    return ad


def _tied_head(ad, base, notes):
    """mlx-lm computes a tied model's output head as its embedding (`embed_tokens.as_linear`), LoRA included: on a
    base that ties them, an embedding LoRA is the same LoRA on lm_head too (then the merge changes the one tensor
    once and it stays tied); without a base, a note says so."""
    head = HEAD.removesuffix(".weight")
    embeddings = [m for m in ad.modules.values() if m.kind == "embedding"]
    if not embeddings or head in ad.modules:
        return
    if base is None:
        notes.append(_tied_note(embeddings[0].name, "read with --base (merge passes it) to keep that"))
    elif base.tied_embeddings:
        m = embeddings[0]
        ad.add(Module(head, m.A, m.B, alpha=m.alpha, kind="linear"))
        notes.append(
            f"{m.name}: the base ties its embeddings, and mlx-lm applies this LoRA to lm_head too: so read"
        )


def _parameters(config, path):
    """(scale, rank) of config.lora_parameters, checked."""
    params = config.get("lora_parameters")
    if not isinstance(params, dict) or "scale" not in params:
        raise LorakitError("adapter_config.json's lora_parameters has no 'scale'", path=path)
    scale, rank = params["scale"], params.get("rank")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale != scale:
        raise LorakitError(f"lora_parameters 'scale' must be a number, got {scale!r}", path=path)
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise LorakitError(f"lora_parameters 'rank' must be a positive integer, got {rank!r}", path=path)
    return float(scale), rank


def _module(path, name, t, scale, rank, fine_tune):
    """One module from its lora_a / lora_b (and DoRA's m)."""
    if "lora_a" not in t or "lora_b" not in t:
        raise LorakitError(
            f"has {' and '.join(sorted(t))} but no lora_{'b' if 'lora_a' in t else 'a'}",
            path=path,
            tensor=name,
        )
    a, b = t["lora_a"], t["lora_b"]
    if a.ndim != 2 or b.ndim != 2:
        raise LorakitError(
            f"lora_a {list(a.shape)} / lora_b {list(b.shape)}: only 2-D factors are read (MoE SwitchLinear "
            "experts and quantized adapters are not)",
            path=path,
            tensor=name,
        )
    if is_embedding(f"{name}.weight"):  # dW [num, dim] = scale * lora_a @ lora_b
        A, B, kind = b, a, "embedding"
    else:  # dW [out, in] = scale * lora_b^T @ lora_a^T
        A, B, kind = t_contig(a), t_contig(b), "linear"
    check_rank(path, name, A, B)
    if rank is not None and A.shape[0] != rank:
        raise LorakitError(
            f"rank {A.shape[0]} but adapter_config.json's lora_parameters gives rank {rank}",
            path=path,
            tensor=name,
        )
    module = Module(name, A, B, alpha=scale * A.shape[0], kind=kind)
    if "m" in t:
        if fine_tune != "dora" or kind != "linear":
            raise LorakitError("a DoRA magnitude 'm' outside a DoRA linear layer", path=path, tensor=name)
        module.magnitude, module.dora_axis = t["m"].reshape(-1), 0
    elif fine_tune == "dora" and kind == "linear":
        raise LorakitError(
            "fine_tune_type is dora but the module has no magnitude 'm'", path=path, tensor=name
        )
    return module


def _tied_note(name, way):
    return (
        f"{name}: on a model that ties its embeddings mlx-lm applies this LoRA to the output head too; {way}"
    )


def _writable(adapter, path):
    """The modules of an adapter mlx-lm's LoRA layers can hold (linear and embedding LoRAs); anything else refused
    by name, never dropped."""
    refuse_deltas(adapter, "MLX", path)
    if adapter.replacements:
        raise LorakitError(
            f"MLX adapters hold no full tensors ({next(iter(adapter.replacements))}): merge them instead",
            path=path,
        )
    mods = list(adapter.modules.values())
    if not mods:
        raise LorakitError("the adapter is empty", path=path)
    for m in mods:
        if m.magnitude is not None:
            what = "DoRA"
        elif m.bias is not None:
            what = "a bias delta"
        elif m.kind not in ("linear", "embedding"):
            what = f"a {m.kind} LoRA"
        else:
            continue
        raise LorakitError(
            f"{what}: mlx-lm's LoRA layers take only linear and embedding LoRAs", path=path, tensor=m.name
        )
    return mods


def _untied(mods, base, path, notes):
    """The modules mlx-lm holds: on a base that ties its embeddings its one embedding LoRA serves the head too, so an
    lm_head LoRA equal to it (PEFT's ensure_weight_tying) is dropped, and one alone, or an embedding LoRA alone, is
    refused (mlx-lm would change both, or could not hold it: a tied model has no lm_head module)."""
    head = next((m for m in mods if m.name == HEAD.removesuffix(".weight")), None)
    embedding = next((m for m in mods if m.kind == "embedding"), None)
    if base is None or not base.tied_embeddings:
        if embedding is not None and base is None:
            notes.append(_tied_note(embedding.name, "give --base to check it"))
        return mods
    if head is None and embedding is None:
        return mods
    if (
        head is not None
        and embedding is not None
        and torch.equal(embedding.A, head.A)
        and torch.equal(embedding.B, head.B)
        and embedding.scale == head.scale
    ):
        return [m for m in mods if m is not head]
    raise LorakitError(
        "the base ties its embeddings, and mlx-lm applies an embedding LoRA to the output head too: this adapter "
        "changes them otherwise, which mlx-lm cannot hold",
        path=path,
        tensor=(embedding if embedding is not None else head).name,
    )


def write(adapter, path, force=False, base=None):
    """A folder mlx-lm loads: one rank and one scale (each module's scale folded into its B, shorter ranks padded
    with zeros: the same dW), `keys` naming every module (inside a layer by its path there, with num_layers -1: every
    layer; a layer without a module here keeps lora_b at zero when mlx-lm loads it)."""
    notes = []
    mods = _untied(_writable(adapter, path), base, path, notes)
    rank, scale = max(m.rank for m in mods), most_common([m.scale for m in mods])
    tensors, keys = {}, set()
    for m in mods:
        f = folded(m, rank, scale)
        if m.kind == "embedding":
            tensors[f"{m.name}.lora_a"], tensors[f"{m.name}.lora_b"] = f.B.contiguous(), f.A.contiguous()
        else:
            tensors[f"{m.name}.lora_a"], tensors[f"{m.name}.lora_b"] = t_contig(f.A), t_contig(f.B)
        match = LAYER.fullmatch(m.name)
        keys.add(match["key"] if match else m.name)
    config = {
        "fine_tune_type": "lora",
        "num_layers": -1,
        "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.0, "keys": sorted(keys)},
    }
    with atomic_output(path, force=force, directory=True) as tmp:
        write_safetensors(os.path.join(tmp, WEIGHTS), tensors, {"format": "mlx"})
        with open(os.path.join(tmp, CONFIG), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
    if len({m.scale for m in mods}) > 1:
        notes.append(f"every module at scale {scale:g} (the others' folded into B)")
    return notes
