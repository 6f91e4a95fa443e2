"""lorakit's own format: spec/lorakit-adapter-v1.md. One safetensors file; everything for dW inside it."""

import json
import time

from .. import spec
from .._version import __version__
from ..core import Adapter, Module, default_kind, experts
from ..errors import LorakitError
from ..io import TensorFile, atomic_output, write_safetensors
from ..io.safetensors import HeaderTensor
from ..io.dtypes import FACTOR_DTYPES, st_dtype
from ..io.jsonio import parse_json


def detect(probe):
    return probe.header is not None and spec.META_VERSION in probe.header.metadata


def read(path, values=True):
    """values=False reads the header and the alphas only (inspect): the tensors are shape-only stand-ins. The
    structure is always checked here; NaN/Inf and alpha values by load() on what was read."""
    problems, layout = spec.check_file(
        path, values=False
    )  # the values are checked once, in memory, by load()
    spec.raise_first(problems, path)
    tf = TensorFile(path)
    get = tf.get if values else tf.meta
    meta = tf.header.metadata
    adapter = Adapter(
        base_model=meta.get(spec.META_BASE),
        base_fingerprint=meta.get(spec.META_FINGERPRINT),
        base_identity=meta.get(spec.META_IDENTITY),
        provenance=parse_json(
            meta.get(spec.META_PROVENANCE, "{}"), path, f"metadata '{spec.META_PROVENANCE}'"
        ),
        user_metadata={k: v for k, v in meta.items() if not k.startswith("lorakit.")},
        source_format="lorakit",
    )
    for name, keys in layout.modules.items():
        info = layout.module_meta.get(name, {})
        if info.get("kind") == spec.EXPERTS:
            for m in _experts(tf, name, keys, values):
                adapter.add(m)
            continue
        A, B = get(keys["lora_A"]), get(keys["lora_B"])
        adapter.add(
            Module(
                name,
                A,
                B,
                alpha=tf.f32_scalar(keys["alpha"]),
                kind=info.get("kind", default_kind(A.ndim)),
                bias=get(keys["bias_delta"]) if "bias_delta" in keys else None,
                magnitude=get(keys["dora_magnitude"]) if "dora_magnitude" in keys else None,
                dora_axis=info.get("dora_axis"),
                pads_base=bool(info.get("pads_base", False)),
            )
        )
    for name, key in layout.replacements.items():
        adapter.replacements[name] = get(key)
    for name, key in layout.deltas.items():
        adapter.deltas[name] = get(key)
    return adapter


def _experts(tf, name, keys, values):
    """The per-expert Modules of an `experts` module (spec 1.3)."""
    alpha = tf.header.entries[keys["alpha"]]
    E = tf.header.entries[keys["lora_A"]].shape[0]
    alphas = [tf.f32_scalar(keys["alpha"])] * E if alpha.shape == () else tf.get(keys["alpha"]).tolist()
    if values:
        As, Bs = tf.get(keys["lora_A"]).unbind(0), tf.get(keys["lora_B"]).unbind(0)
    else:  # shape-only stand-ins of each expert's factors
        A, B = tf.meta(keys["lora_A"]), tf.meta(keys["lora_B"])
        As, Bs = [HeaderTensor(A.shape[1:], A.st_dtype)] * E, [HeaderTensor(B.shape[1:], B.st_dtype)] * E
    return experts.unpacked(name, As, Bs, alphas)


def to_tensors(adapter):
    """The spec's (tensors, metadata) for an adapter: the single place that knows the key grammar for writing."""
    import torch

    tensors, modules_meta = {}, {}
    groups = experts.packed(adapter.modules)
    for group, p in groups.items():
        tensors[f"{group}.lora_A"], tensors[f"{group}.lora_B"] = p.A, p.B
        one = all(a == p.alphas[0] for a in p.alphas)
        tensors[f"{group}.alpha"] = torch.tensor(p.alphas[0] if one else p.alphas, dtype=torch.float32)
        modules_meta[group] = {"kind": spec.EXPERTS}
    in_groups = {name for p in groups.values() for name in p.names}
    for name, m in adapter.modules.items():
        if name in in_groups:
            continue
        tensors[f"{name}.lora_A"] = m.A
        tensors[f"{name}.lora_B"] = m.B
        tensors[f"{name}.alpha"] = torch.tensor(m.alpha, dtype=torch.float32)
        if m.bias is not None:
            tensors[f"{name}.bias_delta"] = m.bias
        info = {"kind": m.kind, **({"pads_base": True} if m.pads_base else {})}
        if m.magnitude is not None:
            tensors[f"{name}.dora_magnitude"] = m.magnitude
            info["dora_axis"] = m.dora_axis
        modules_meta[name] = info
    for name, t in adapter.replacements.items():
        tensors[f"{name}.{spec.REPLACEMENT}"] = t
    for name, t in adapter.deltas.items():
        tensors[f"{name}.{spec.DELTA}"] = t
    provenance = dict(adapter.provenance)
    provenance.setdefault("tool", f"lorakit {__version__}")
    provenance.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    meta = dict(adapter.user_metadata)
    widens = any(m.pads_base for m in adapter.modules.values())
    # a file stays at the oldest version that can read it: 1.1, 1.2 with deltas or a widened base, 1.3 with experts
    version = "1.3" if groups else "1.2" if adapter.deltas or widens else "1.1"
    meta.update(
        {
            spec.META_VERSION: version,
            spec.META_PROVENANCE: json.dumps(provenance, sort_keys=True),
            spec.META_MODULES: json.dumps(modules_meta, sort_keys=True),
        }
    )
    if adapter.base_model:
        meta[spec.META_BASE] = adapter.base_model
    if adapter.base_fingerprint:
        meta[spec.META_FINGERPRINT] = adapter.base_fingerprint
    if adapter.base_identity:
        meta[spec.META_IDENTITY] = adapter.base_identity
    return tensors, meta


def write(adapter, path, force=False):
    """Write the spec's file; floating-point tensors of other dtypes (F64, F8) as F32, said in a note."""
    tensors, meta = to_tensors(adapter)
    widened = {}
    for key, t in tensors.items():
        if st_dtype(t.dtype) in FACTOR_DTYPES:
            continue
        if not t.is_floating_point():
            raise LorakitError(
                f"dtype {t.dtype} is not allowed by the spec ({', '.join(FACTOR_DTYPES)})",
                path=path,
                tensor=key,
            )
        tensors[key] = t.float()
        widened.setdefault(st_dtype(t.dtype), []).append(key)
    with atomic_output(path, force=force) as tmp:
        write_safetensors(tmp, tensors, meta)
    return [
        f"{len(keys)} {dtype} tensor(s) written as F32, e.g. {keys[0]} (the spec's dtypes: "
        f"{', '.join(FACTOR_DTYPES)}; {'rounded once' if dtype == 'F64' else 'exact'})"
        for dtype, keys in widened.items()
    ]
