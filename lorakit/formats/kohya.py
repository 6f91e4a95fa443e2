"""kohya-ss/sd-scripts LoRA (and LyCORIS LoHa / LoKr / LoCon / Tucker / dora_scale, read only).

Facts (sd-scripts networks/lora.py, lora_flux.py; LyCORIS; formats.md): key `<lora_name>.<tensor>` with
lora_name = (prefix + "." + module path).replace(".", "_"); `.lora_down.weight` [r, in(, k, k)], `.lora_up.weight`
[out, r(, 1, 1)], `.alpha` 0-d (missing or 0 means alpha = r); scale = alpha / r. The mangling is lossy, so names are
resolved against the base's tensor names (`base=`); unresolved names are kept as the kohya names and reported.
Flux split_qkv files store fused down [n r, in] and block-diagonal up [out, n r] with the alpha of one split.
"""

import hashlib

import torch

from ..core import Adapter, Module, require_floating
from ..errors import MALFORMED, LorakitError
from ..io import atomic_output, tensor_bytes, write_safetensors
from ..core.lycoris import lokr_factors, loha_factors, tucker_factors
from .common import most_common, open_safetensors, refuse_deltas, refuse_unknown
from ..naming.fused import fused_aliases
from ..naming.kohya import PREFIXES, kohya_names, mangled_prefix, resolution_table
from ..io.jsonio import parse_json

TENSORS = {
    "lora_down.weight",
    "lora_up.weight",
    "lora_mid.weight",
    "alpha",
    "dora_scale",
    "hada_w1_a",
    "hada_w1_b",
    "hada_w2_a",
    "hada_w2_b",
    "hada_t1",
    "hada_t2",
    "lokr_w1",
    "lokr_w1_a",
    "lokr_w1_b",
    "lokr_w2",
    "lokr_w2_a",
    "lokr_w2_b",
    "lokr_t2",
}
SPLIT_QKV = (("double", "qkv", 3), ("single", "linear1", 4))


def detect(probe):
    keys = list(probe.header.entries) if probe.header else []
    return bool(keys) and all(k.startswith(PREFIXES) for k in keys)


def _metadata_args(meta):
    try:  # training arguments, not the weights: unreadable ones are ignored, as sd-scripts does
        return parse_json(meta.get("ss_network_args") or "{}", None, "ss_network_args", expect=None) or {}
    except LorakitError:
        return {}


def read(path, base=None, allow_unknown=False):
    tf, meta = open_safetensors(path)
    groups, unknown = {}, []
    for key in tf.header.entries:
        name, _, tensor = key.partition(".")
        if tensor in TENSORS and name.startswith(PREFIXES):
            groups.setdefault(name, {})[tensor] = key
        else:
            unknown.append(key)
    notes = []
    refuse_unknown(path, unknown, allow_unknown, notes)
    shapes = base.shapes() if base is not None else None
    table = resolution_table(shapes) if shapes is not None else {}
    split_qkv = str(_metadata_args(meta).get("split_qkv", "")).lower() == "true"
    ad = Adapter(
        source_format="kohya",
        notes=notes,
        provenance={"source_format": "kohya", "source_metadata": dict(meta)},
    )
    unresolved, dotted = [], None
    for lora_name, keys in sorted(groups.items()):
        get = lambda k: tf.get(keys[k]) if k in keys else None  # noqa: E731
        module = table.get(lora_name)
        if (
            module is None and shapes is not None
        ):  # a slice of a fused tensor (SDXL te2 q_proj): its diffusers name
            if dotted is None:
                aliases = fused_aliases(shapes)
                spelled = {v: k for k, v in aliases.items() if "." in k}
                dotted = {k: spelled[v] for k, v in aliases.items() if "." not in k and v in spelled}
            module = dotted.get(lora_name)
        if module is None:
            module = lora_name
            unresolved.append(lora_name)
        weight_shape = tuple(shapes[module + ".weight"]) if shapes and module + ".weight" in shapes else None
        try:
            ad.add(build_module(path, lora_name, module, keys, get, weight_shape, split_qkv, notes))
        except LorakitError as e:
            raise LorakitError(e.message, path=path, tensor=lora_name, code=e.code) from None
        except MALFORMED as e:  # factor shapes that do not fit together
            raise LorakitError(f"factors do not fit together ({e})", path=path, tensor=lora_name) from None
    if unresolved and base is not None:
        ad.elsewhere = _for_other_files(groups, unresolved)
    if unresolved:
        why = "no --base given" if base is None else "not found in the base"
        notes.append(f"{len(unresolved)} kohya name(s) kept unresolved ({why}), e.g. {unresolved[0]}")
    ad.base_model = meta.get("ss_sd_model_name")
    return ad


def _for_other_files(lora_names, unresolved):
    """The unresolved names of the kohya prefixes (lora_unet, lora_te1, ...) of which the base has nothing while it
    has another prefix's modules: those are for another file of the model (Flux's transformer, CLIP-L and T5 files
    are apart)."""
    unresolved_set = set(unresolved)
    found = {mangled_prefix(n) for n in lora_names if n not in unresolved_set}
    if not found:
        return []
    return [n for n in unresolved if mangled_prefix(n) not in found]


def _alpha(get, rank):
    """kohya: alpha missing, None or 0 means alpha = rank (scale 1)."""
    a = get("alpha")
    if a is not None and a.numel() != 1:
        raise LorakitError(f"alpha has shape {list(a.shape)}, expected a scalar", tensor="alpha")
    value = float(a.float()) if a is not None else 0.0
    return value if value else float(rank)


def _require(keys, needed, what):
    missing = [k for k in needed if k not in keys]
    if missing:
        raise LorakitError(f"{what} without {', '.join(missing)}")


def build_module(path, lora_name, module, keys, get, weight_shape, split_qkv, notes):
    """One module from its kohya / LyCORIS tensors (`get(key)`): LoRA (Tucker too), LoHa or LoKr, exact."""
    if not any(k.startswith(("lora_down", "lora_up", "hada_", "lokr_")) for k in keys):
        raise LorakitError(f"has only {', '.join(sorted(keys))}: no factors")
    # checked before the factors are cast to one dtype (alpha may be an integer)
    for k in keys:
        if k != "alpha":
            require_floating(k, get(k), lora_name, path)
    dtype = next(get(k).dtype for k in keys if k not in ("alpha", "dora_scale"))
    if "lora_down.weight" in keys or "lora_up.weight" in keys:
        A, B, scale = _lora_factors(path, lora_name, keys, get, split_qkv, notes, dtype)
    elif "hada_w1_a" in keys:
        A, B, scale = _loha_factors(keys, get, weight_shape)
    elif "lokr_w1" in keys or "lokr_w1_a" in keys:
        A, B, scale = _lokr_factors(keys, get, weight_shape)
    else:
        raise LorakitError(f"has only {', '.join(sorted(keys))}: no factors", path=path, tensor=lora_name)
    k = A.shape[0]
    out = Module(
        module,
        A.to(dtype).contiguous(),
        B.to(dtype).reshape(B.shape[0], k, *[1] * (A.ndim - 2)),
        alpha=scale * k,
    )
    if "dora_scale" in keys:
        d = get("dora_scale")
        axis = 0 if d.shape[0] == out.shape[0] and d.flatten().numel() == out.shape[0] else 1
        out.magnitude, out.dora_axis = d.flatten().contiguous(), axis
    return out


def _lora_factors(path, lora_name, keys, get, split_qkv, notes, dtype):
    down, up = get("lora_down.weight"), get("lora_up.weight")
    if down is None or up is None:
        raise LorakitError(
            f"has {'lora_down' if up is None else 'lora_up'} but no "
            f"{'lora_up' if up is None else 'lora_down'} (wrong pairing)",
            path=path,
            tensor=lora_name,
        )
    rank = down.shape[0]
    if rank == 0 or down.ndim < 2:
        raise LorakitError(
            f"lora_down has shape {list(down.shape)}: "
            + ("rank 0" if down.ndim >= 2 else "a factor needs ndim >= 2"),
            code="LK205" if down.ndim >= 2 else "LK203",
        )
    if up.flatten(1).shape[1] != rank:
        raise LorakitError(
            f"lora_down has rank {rank} but lora_up {list(up.shape)} (shape mismatch)",
            path=path,
            tensor=lora_name,
        )
    scale = _alpha(get, rank) / rank
    n = _split_qkv_count(lora_name, up, rank, split_qkv)
    if n > 1:  # sd-scripts #2204: fused rank n r, alpha of one split
        scale *= n
        notes.append(
            f"{lora_name}: Flux split_qkv (fused rank {rank} = {n} x {rank // n}): scale alpha / {rank // n}"
        )
    if "lora_mid.weight" in keys:
        B, A = tucker_factors(up, get("lora_mid.weight"), down)
        return A.to(dtype), B.to(dtype), scale
    return down, up.reshape(up.shape[0], rank, *[1] * (down.ndim - 2)), scale


def _loha_factors(keys, get, weight_shape):
    _require(keys, ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), "LoHa")
    if "hada_t1" in keys or "hada_t2" in keys:  # Tucker: w = einsum(t, w_a, w_b), w_a stored [rank, out]
        _require(keys, ("hada_t1", "hada_t2"), "LoHa Tucker")
        B1, A1 = tucker_factors(get("hada_w1_a").T, get("hada_t1"), get("hada_w1_b"))
        B2, A2 = tucker_factors(get("hada_w2_a").T, get("hada_t2"), get("hada_w2_b"))
        B, A = loha_factors(B1, A1, B2, A2)
        A = A.reshape(A.shape[0], *A1.shape[1:])
    else:
        B, A = loha_factors(get("hada_w1_a"), get("hada_w1_b"), get("hada_w2_a"), get("hada_w2_b"))
    scale = _alpha(get, get("hada_w1_b").shape[0]) / get("hada_w1_b").shape[0]
    A, B = _shape_factors(A, B, weight_shape)
    return A, B, scale


def _lokr_factors(keys, get, weight_shape):
    _require(keys, ("lokr_w1",) if "lokr_w1" in keys else ("lokr_w1_a", "lokr_w1_b"), "LoKr")
    if "lokr_w2" not in keys:
        _require(keys, ("lokr_w2_a", "lokr_w2_b"), "LoKr (no lokr_w2)")
    w1 = get("lokr_w1") if "lokr_w1" in keys else (get("lokr_w1_a"), get("lokr_w1_b"))
    w2 = get("lokr_w2") if "lokr_w2" in keys else (get("lokr_w2_a"), get("lokr_w2_b"))
    if "lokr_t2" in keys:  # Tucker: w2 = einsum(t2, w2_a, w2_b), w2_a stored [rank, out2]
        _require(keys, ("lokr_w2_a", "lokr_w2_b"), "LoKr Tucker")
        w2 = tucker_factors(get("lokr_w2_a").T, get("lokr_t2"), get("lokr_w2_b"))
        w2 = (w2[0], w2[1].flatten(1))
    decomposed = [w[1].shape[0] for w in (w2, w1) if isinstance(w, tuple)]
    scale = _alpha(get, decomposed[0]) / decomposed[0] if decomposed else 1.0
    B, A = lokr_factors(w1, w2)
    if not isinstance(w2, tuple) and w2.ndim > 2:
        A = A.reshape(A.shape[0], -1, *w2.shape[2:])
    elif "lokr_t2" in keys:
        A = A.reshape(A.shape[0], -1, *get("lokr_t2").shape[2:])
    A, B = _shape_factors(A, B, weight_shape)
    return A, B, scale


def _shape_factors(A, B, weight_shape):
    """LyCORIS stores conv factors flattened: give A the base's kernel shape when the base says what it is."""
    if (
        weight_shape is not None
        and len(weight_shape) > 2
        and A.shape[1] == torch.Size(weight_shape[1:]).numel()
    ):
        A = A.reshape(A.shape[0], *weight_shape[1:])
    return A, B


def _split_qkv_count(lora_name, up, rank, split_qkv):
    for block, layer, n in SPLIT_QKV:
        if block in lora_name and layer in lora_name and rank % n == 0 and split_qkv:
            r = rank // n
            U = up.flatten(1)
            rows = U.shape[0]
            sizes = [3072] * 3 + ([rows - 9216] if n == 4 else [])
            if sum(sizes) != rows:
                return 1
            start, off = 0, torch.zeros_like(U, dtype=torch.bool)
            for j, size in enumerate(sizes):
                off[start : start + size] = True
                off[start : start + size, j * r : (j + 1) * r] = False
                start += size
            if not U[off].any():
                return n
    return 1


def write(adapter, path, force=False):
    mods = list(adapter.modules.values())
    if adapter.replacements or any(m.bias is not None for m in mods):
        raise LorakitError(
            "kohya files hold no bias deltas or full-tensor replacements: convert to lorakit or peft "
            "to keep them",
            path=path,
        )
    refuse_deltas(adapter, "kohya", path)
    components = {m.name.split(".", 1)[0] for m in mods}
    source_meta = adapter.provenance.get("source_metadata") or {}
    split_qkv = str(_metadata_args(source_meta).get("split_qkv", "")).lower() == "true"
    names = kohya_names([m.name for m in mods], source_meta)
    tensors = {}
    for m in mods:
        name = names[m.name]
        if f"{name}.lora_down.weight" in tensors:
            raise LorakitError(f"two modules map to the kohya name {name}", path=path, tensor=m.name)
        tensors[f"{name}.lora_down.weight"] = m.A
        tensors[f"{name}.lora_up.weight"] = m.B
        # a Flux split_qkv module stores the alpha of one split (what the reader multiplied by n), as sd-scripts does
        n = _split_qkv_count(name, m.B, m.rank, split_qkv)
        tensors[f"{name}.alpha"] = torch.tensor(
            m.alpha / n, dtype=torch.float32
        )  # exact, whatever the factor dtype
        if m.magnitude is not None:
            shape = [1] * len(m.shape)
            shape[m.dora_axis] = -1
            tensors[f"{name}.dora_scale"] = m.magnitude.reshape(shape).contiguous()
    meta = {k: v for k, v in source_meta.items() if k.startswith("ss_")}
    ranks, alphas = {m.rank for m in mods}, {m.alpha for m in mods}
    meta.update(
        {
            "ss_v2": meta.get("ss_v2", "False"),
            "ss_base_model_version": meta.get("ss_base_model_version", _base_version(components, tensors)),
            "ss_network_module": meta.get("ss_network_module", "networks.lora"),
            "ss_network_dim": str(most_common([m.rank for m in mods])) if len(ranks) == 1 else "Dynamic",
            "ss_network_alpha": _num(most_common([m.alpha for m in mods])) if len(alphas) == 1 else "Dynamic",
            "ss_network_args": meta.get("ss_network_args", "{}"),
        }
    )
    digest = hashlib.sha256()
    for _, t in sorted(tensors.items()):  # the bytes after the header, in file order and final dtype (#1722)
        digest.update(tensor_bytes(t))
    meta["sshs_model_hash"] = digest.hexdigest()
    with atomic_output(path, force=force) as tmp:
        write_safetensors(tmp, tensors, meta)


def _num(x):
    return str(int(x)) if float(x).is_integer() else repr(x)


def _base_version(components, tensors):
    names = " ".join(tensors)
    if "lora_te2_" in names or "lora_unet_input_blocks" in names:
        return "sdxl_base_v1-0"
    if "double_blocks" in names or "single_blocks" in names:
        return "flux1"
    if "lora_unet_down_blocks" in names or "lora_te_" in names:
        return "sd_v1"
    return "unknown"
