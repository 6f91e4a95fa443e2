"""ComfyUI's "original names" LoRA dialect: what Wan, HunyuanVideo, Qwen-Image, LTX, HiDream and Z-Image LoRAs from
diffusion-pipe, musubi-tuner, lightx2v and ComfyUI's own trainer look like, plus xlabs Flux and BFL control LoRAs.

Facts (ComfyUI comfy/lora.py `load_lora`, comfy/weight_adapter; formats.md): key `<prefix><module>.<part>`, module the
model's own tensor path without `.weight`; prefix `diffusion_model.` (ComfyUI's key for the model), `transformer.`
(diffusion-pipe) or none (lightx2v, BFL). Parts: `lora_A.weight`/`lora_B.weight` or `lora_down.weight`/
`lora_up.weight` (+ `lora_mid.weight`), LyCORIS `hada_*`/`lokr_*`, `alpha` (scale alpha / rank; missing: 1),
`dora_scale`, `diff` (a full weight delta) and `diff_b` (a bias delta). xlabs Flux: `double_blocks.N.processor.
{qkv,proj}_lora{1,2}.{down,up}.weight` (1 = image stream, 2 = text; scale 1). BFL control LoRAs add full tensors
ending in `.scale` / `.bias` that replace the model's. Module names are kept as in the file; given a base they are
resolved against its tensor names (with or without `model.diffusion_model.`)."""

import re
from dataclasses import replace

import torch

from ..core import Adapter
from ..errors import MALFORMED, LorakitError
from ..io import atomic_output, write_safetensors
from .common import open_safetensors, refuse_unknown
from .kohya import TENSORS, build_module
from ..naming.diffusers import ORIGINAL
from ..naming.kohya import PREFIXES

PARTS = {
    "lora_A.weight": "lora_down.weight",
    "lora_B.weight": "lora_up.weight",
    "lora.down.weight": "lora_down.weight",
    "lora.up.weight": "lora_up.weight",
    "lora_B.bias": "bias",  # BFL control LoRAs: a bias delta, as ComfyUI applies it (no alpha scaling)
    **{t: t for t in TENSORS},
}
LONGEST_FIRST = sorted(PARTS, key=len, reverse=True)  # "lora_down.weight" before a shorter part it ends with
DIFFS = {"diff": ".weight", "diff_b": ".bias"}
RESHAPE = ".reshape_weight"  # ComfyUI: the shape the base weight is zero-padded to before the LoRA is added
XLABS = re.compile(
    r"^(?:diffusion_model\.)?(?P<block>(?P<kind>double|single)_blocks\.\d+)\.processor\."
    r"(?P<layer>qkv|proj)_lora(?P<stream>[12]?)\.(?P<part>down|up)\.weight$"
)
# xlabs single blocks: qkv_lora adds to the first 3 * hidden rows of linear1 (the rest is the MLP's, 4 * hidden in
# Flux), proj_lora is a LoRA on linear2 (its 15360 inputs are linear2's)
XLABS_SINGLE = {"qkv": "linear1", "proj": "linear2"}
FLUX_LINEAR1_ROWS = 7  # in units of hidden / 3 of qkv: 3 (q, k, v) + 4 (MLP)
OWN_PARTS = (
    ".alpha",
    ".diff",
    ".diff_b",
    ".lora_down.weight",
    ".lora.down.weight",
    ".hada_w1_a",
    ".lokr_w1",
    ".lokr_w1_a",
    ".dora_scale",
)
PREFIXES_STRIPPED = ("model.diffusion_model.", "diffusion_model.", "transformer.")


def split_key(key):
    """(stem, canonical part) of a key in this dialect, or None."""
    m = XLABS.match(key)
    if m and (m["kind"] == "single") != bool(m["stream"]):
        part = "lora_down.weight" if m["part"] == "down" else "lora_up.weight"
        if m["kind"] == "single":
            return f"{m['block']}.{XLABS_SINGLE[m['layer']]}", part
        stream = "img_attn" if m["stream"] == "1" else "txt_attn"
        return f"{m['block']}.{stream}.{m['layer']}", part
    for part in LONGEST_FIRST:
        if key.endswith("." + part):
            return key[: -len(part) - 1], PARTS[part]
    stem, _, last = key.rpartition(".")
    if last in DIFFS and stem:
        return stem, last
    return None


def detect(probe):
    keys = list(probe.header.entries) if probe.header else []
    if not keys or all(k.startswith(PREFIXES) for k in keys):
        return False
    parsed = [split_key(k) for k in keys]
    if not any(
        p is not None and p[1] in ("lora_down.weight", "diff", "hada_w1_a", "lokr_w1", "lokr_w1_a")
        for p in parsed
    ):
        return False
    # PEFT's own files (lora_A / lora_B only) are PEFT's, unless the names or parts say otherwise
    return any(
        k.startswith("diffusion_model.") or XLABS.match(k) or ORIGINAL.search(k) or k.endswith(OWN_PARTS)
        for k in keys
    )


def resolve(stem, shapes, suffix=".weight"):
    """The base tensor path (without suffix) a stem names, or None: as written, or with its model prefix changed."""
    rest = next((stem[len(p) :] for p in PREFIXES_STRIPPED if stem.startswith(p)), stem)
    for name in (stem, rest, "model.diffusion_model." + rest, "diffusion_model." + rest):
        if name + suffix in shapes:
            return name
    return None


def read(path, base=None, allow_unknown=False):
    tf, meta = open_safetensors(path)
    shapes = base.shapes() if base is not None else None
    groups, full, unknown, reshapes = {}, [], [], widened_inputs(tf.header.entries)
    for key in tf.header.entries:
        parsed = split_key(key)
        if key.endswith(RESHAPE):
            reshapes[key[: -len(RESHAPE)]] = key
        elif parsed is not None:
            groups.setdefault(parsed[0], {})[parsed[1]] = key
        elif key.endswith((".scale", ".bias", ".weight")):  # BFL control LoRAs: tensors replacing the model's
            full.append(key)
        else:
            unknown.append(key)
    ad = Adapter(
        source_format="comfyui", provenance={"source_format": "comfyui", "source_metadata": dict(meta)}
    )
    unknown += [key for stem, key in reshapes.items() if key and stem not in groups]  # widening no LoRA
    refuse_unknown(path, unknown, allow_unknown, ad.notes)
    unresolved = []

    def name_of(stem, suffix=".weight"):
        if shapes is None:
            return stem
        found = resolve(stem, shapes, suffix)
        if found is None:
            unresolved.append(stem)
            return stem
        return found

    for stem, keys in sorted(groups.items()):
        get = lambda k: tf.get(keys[k]) if k in keys else None  # noqa: E731
        for part, suffix in DIFFS.items():
            if part in keys:
                ad.deltas[name_of(stem, suffix) + suffix] = get(part)
        factors = {k: v for k, v in keys.items() if k not in DIFFS and k != "bias"}
        if not factors:
            if "bias" in keys:
                raise LorakitError("lora_B.bias without lora_A / lora_B", path=path, tensor=keys["bias"])
            continue
        module = name_of(stem)
        weight_shape = tuple(shapes[module + ".weight"]) if shapes and module + ".weight" in shapes else None
        try:
            built = build_module(path, stem, module, factors, get, weight_shape, False, ad.notes)
            built = _with_bias(_xlabs_rows(built, keys, weight_shape), get("bias"))
            if stem in reshapes and tuple(built.shape) != weight_shape:
                built = _widening(built, tf.get(reshapes[stem]) if reshapes[stem] else None, weight_shape)
            ad.add(built)
        except LorakitError as e:
            raise LorakitError(e.message, path=path, tensor=stem, code=e.code) from None
        except MALFORMED as e:
            raise LorakitError(f"factors do not fit together ({e})", path=path, tensor=stem) from None
    for key in full:
        stem, _, suffix = key.rpartition(".")
        ad.replacements[name_of(stem, "." + suffix) + "." + suffix] = tf.get(key)
    if unresolved:
        ad.notes.append(
            f"{len(unresolved)} name(s) not found in the base, kept as written, e.g. {unresolved[0]}"
        )
    return ad


def widened_inputs(keys):
    """{stem: None} of the layers a BFL control LoRA widens (Flux Canny / Depth: img_in takes the control image's
    channels too; ComfyUI tells them by these two keys and pads img_in to the LoRA's shape)."""
    keys = set(keys)
    return {"img_in": None} if {"img_in.lora_A.weight", "single_blocks.0.norm.key_norm.scale"} <= keys else {}


def _widening(module, reshape, weight_shape):
    """The module marked as widening its base weight (zero-padded to the module's shape), checked against ComfyUI's
    `reshape_weight` (the padded shape) and the base."""
    if reshape is not None and [int(x) for x in reshape.flatten().tolist()] != list(module.shape):
        raise LorakitError(f"reshape_weight {reshape.tolist()} is not the LoRA's shape {list(module.shape)}")
    if weight_shape and not module.widens(weight_shape):
        raise LorakitError(
            f"the LoRA's shape {list(module.shape)} cannot widen the base's {list(weight_shape)}"
        )
    return replace(module, pads_base=True)


def _xlabs_rows(module, keys, weight_shape):
    """An xlabs single block's qkv_lora on the first rows of linear1, B padded with zero rows (exact)."""
    if XLABS.match(keys.get("lora_up.weight", "")) and module.name.endswith(".linear1"):
        if module.shape[0] % 3:
            raise LorakitError(f"qkv_lora has {module.shape[0]} rows: not q, k and v of one width")
        rows = weight_shape[0] if weight_shape else module.shape[0] // 3 * FLUX_LINEAR1_ROWS
        if rows < module.shape[0]:
            raise LorakitError(f"qkv_lora has {module.shape[0]} rows, more than linear1's {rows}")
        B = torch.cat([module.B, module.B.new_zeros((rows - module.shape[0], *module.B.shape[1:]))])
        module = replace(module, B=B)
    return module


def _with_bias(module, bias):
    """The module with lora_B.bias as its bias delta (BFL control LoRAs), checked against its rows."""
    if bias is None:
        return module
    if tuple(bias.shape) != (module.shape[0],):
        raise LorakitError(f"lora_B.bias has shape {list(bias.shape)}, the layer has {module.shape[0]} rows")
    return replace(module, bias=bias.contiguous())


def comfy_name(name):
    """A module or tensor path as ComfyUI keys it: the model's tensors under `diffusion_model.`."""
    return (
        "diffusion_model." + name[len("model.diffusion_model.") :]
        if name.startswith("model.diffusion_model.")
        else name
    )


def write(adapter, path, force=False):
    tensors = {}
    for m in adapter.modules.values():
        name = comfy_name(m.name)
        tensors[f"{name}.lora_down.weight"] = m.A
        tensors[f"{name}.lora_up.weight"] = m.B
        tensors[f"{name}.alpha"] = torch.tensor(m.alpha, dtype=torch.float32)
        if m.bias is not None:
            tensors[f"{name}.diff_b"] = m.bias
        if m.pads_base:
            tensors[f"{name}{RESHAPE}"] = torch.tensor(list(m.shape))
        if m.magnitude is not None:
            shape = [1] * len(m.shape)
            shape[m.dora_axis] = -1
            tensors[f"{name}.dora_scale"] = m.magnitude.reshape(shape).contiguous()
    for name, t in adapter.deltas.items():
        stem, suffix = name.rsplit(".", 1) if "." in name else (name, "")
        part = {"weight": "diff", "bias": "diff_b"}.get(suffix)
        if part is None:
            raise LorakitError(
                "ComfyUI holds full deltas of .weight and .bias tensors only", path=path, tensor=name
            )
        key = f"{comfy_name(stem)}.{part}"
        if key in tensors:
            raise LorakitError(
                "a bias delta and a full bias delta for the same tensor", path=path, tensor=name
            )
        tensors[key] = t
    for name, t in adapter.replacements.items():
        tensors[comfy_name(name)] = t
    with atomic_output(path, force=force) as tmp:
        write_safetensors(tmp, tensors, {"format": "pt"})
