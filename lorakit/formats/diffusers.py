"""diffusers LoRA files: PEFT-style keys under component prefixes (unet., text_encoder., text_encoder_2.,
transformer.), with each component's LoraConfig as JSON in the `lora_adapter_metadata` header entry; also the older
`.lora.up/.lora.down` (attention processors) and `.lora_linear_layer.up/.down` naming. Module names keep the
component prefix (`unet.down_blocks.0...`), as the tensors of a diffusers pipeline folder are named by lorakit."""

import json
import re
from dataclasses import replace

from ..core import Adapter
from ..errors import LorakitError
from ..io import atomic_output, write_safetensors
from . import peft as peft_format
from .common import open_safetensors, refuse_unknown
from ..naming.diffusers import COMPONENTS, ORIGINAL, component as _component, diffusers_names
from ..naming.kohya import mangled_prefix
from ..naming.dit import dit_norm_diffusers
from ..naming.ldm import ldm_unet_family
from ..naming.unmangle import unmangle
from ..io.jsonio import parse_json

META = "lora_adapter_metadata"
OLD = re.compile(
    r"^(?P<module>.+?)(?:\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)(?:\.0)?_lora\.(?P<part>up|down)"
    r"\.weight$"
)
OLD_LINEAR = re.compile(r"^(?P<module>.+?)\.(?:lora_linear_layer|lora)\.(?P<part>up|down)\.weight$")


def detect(probe):
    keys = list(probe.header.entries) if probe.header else []
    return bool(keys) and (
        META in probe.header.metadata
        or (all(_component(k) for k in keys) and not any(ORIGINAL.search(k) for k in keys))
    )


def _to_peft_names(key):
    """Older diffusers names -> PEFT names (lora_A = down, lora_B = up)."""
    m = OLD.match(key)
    if m:
        proj = "to_out.0" if m["proj"] == "to_out" else m["proj"]
        return f"{m['module']}.{proj}.lora_{'A' if m['part'] == 'down' else 'B'}.weight"
    m = OLD_LINEAR.match(key)
    if m:
        return f"{m['module']}.lora_{'A' if m['part'] == 'down' else 'B'}.weight"
    return key


def read(path, allow_unknown=False):
    tf, meta = open_safetensors(path)
    packed = parse_json(meta[META], path, f"metadata '{META}'") if META in meta else {}
    groups, unknown = {}, []
    for key in tf.header.entries:
        component = _component(key)
        if component is None:
            unknown.append(key)
            continue
        groups.setdefault(component, {})[_to_peft_names(key)[len(component) + 1 :]] = tf.get(key)
    ad = Adapter(
        source_format="diffusers", provenance={"source_format": "diffusers", "source_metadata": packed}
    )
    if unknown:
        refuse_unknown(path, unknown, allow_unknown, ad.notes)
    for component, tensors in sorted(groups.items()):
        config = {
            k[len(component) + 1 :]: v for k, v in packed.items() if k.startswith(component + ".")
        } or None
        alphas = {name: t for name, t in tensors.items() if name.endswith(".alpha")}
        for name in alphas:
            del tensors[name]
        if config is None:  # no LoraConfig stored: diffusers then uses lora_alpha = r (scale 1) unless given
            config = {"r": None, "lora_alpha": None}
        part = peft_format.from_state_dict(
            tensors,
            _with_default_alpha(config, tensors, alphas),
            path,
            allow_unknown=allow_unknown,
            source_format="diffusers",
        )
        for module in part.modules.values():
            module.name = f"{component}.{module.name}"
            ad.add(module)
        ad.replacements.update({f"{component}.{k}": v for k, v in part.replacements.items()})
        ad.notes += part.notes
    return ad


def _with_default_alpha(config, tensors, alphas):
    """Fill alpha_pattern for files without a LoraConfig: an `.alpha` tensor per module, else alpha = rank."""
    if config.get("lora_alpha") is not None:
        return config
    pattern = {}
    for name, t in tensors.items():
        if name.endswith(".lora_A.weight"):
            module = name[: -len(".lora_A.weight")]
            a = alphas.get(f"{module}.alpha")
            pattern[re.escape(module)] = float(a) if a is not None else t.shape[0]
    return {**config, "lora_alpha": 1.0, "alpha_pattern": pattern}


def write(adapter, path, force=False):
    """Each module's scale is folded into lora_B (alpha = rank): diffusers reads alpha from `lora_adapter_metadata`,
    ComfyUI and older diffusers ignore it (scale 1), so only a scale of 1 reaches every consumer at the same strength.
    Text encoder names in the metadata lose `text_model.`: transformers 5 flattened CLIPTextModel and diffusers strips
    it from the keys, while PEFT's suffix match still finds `text_model.<name>` in older transformers."""
    notes = []
    adapter = _from_kohya_names(adapter, notes, path)
    adapter = _bias_deltas_into_modules(adapter, notes, path)
    adapter = _from_original_names(adapter, notes)
    by_component, outside = split_components(adapter)
    if outside:
        raise LorakitError(
            f"diffusers files need names under a component ({', '.join(COMPONENTS[:5])}): '{outside[0]}'",
            path=path,
        )
    folded = 0
    for sub in by_component.values():
        for name, m in sub.modules.items():
            if m.scale != 1.0:  # one rounding, in the factor's dtype
                sub.modules[name] = replace(m, B=(m.B.double() * m.scale).to(m.B.dtype), alpha=float(m.rank))
                folded += 1
    tensors, packed = {}, {}
    for component, sub in sorted(by_component.items()):
        part, config = peft_format.to_state_dict(sub, path)
        if component.startswith("text_encoder"):
            config = _flattened_clip_names(config)
        if component == "unet":
            part = _unet_legacy_names(part, notes)
        if component == "transformer" and config.get("modules_to_save"):
            # diffusers loads a control LoRA's norm scales by name, not as PEFT modules_to_save
            kept = [n for n in config["modules_to_save"] if not re.search(r"\.norm_(added_)?[qk]$", n)]
            config = {**config, "modules_to_save": kept or None}
        tensors.update({f"{component}.{k}": v for k, v in part.items()})
        packed.update(
            {f"{component}.{k}": v for k, v in config.items() if k not in ("task_type", "revision")}
        )
    with atomic_output(path, force=force) as tmp:
        write_safetensors(tmp, tensors, {"format": "pt", META: json.dumps(packed, sort_keys=True)})
    if folded:
        notes.append(
            f"{folded} module scale(s) folded into lora_B (alpha = rank), so diffusers, ComfyUI and every "
            "other reader apply the same strength"
        )
    return notes


def _from_kohya_names(adapter, notes, path):
    """kohya names read with no base (lora_unet_double_blocks_0_img_attn_qkv) -> the family's dotted names, from
    the families' name tables (naming.unmangle), as diffusers' converters resolve them without a model."""
    mangled = [n for n in adapter.modules if mangled_prefix(n)]
    if not mangled:
        return adapter
    found = unmangle(mangled)
    if found.unknown:
        why = (
            f"it fits the {' and '.join(found.ambiguous)} names alike"
            if found.ambiguous
            else "no model family's name table has it"
        )
        raise LorakitError(
            f"kohya name '{found.unknown[0]}' has no diffusers name without the model ({why}): pass --base",
            path=path,
        )
    out = replace(adapter, modules={})
    for name, m in adapter.modules.items():
        out.add(replace(m, name=found.names.get(name, name)))
    family = found.family.replace("_", "-") if found.family else "text encoder"
    notes.append(f"{len(mangled)} kohya name(s) resolved from the {family} name tables (no --base given)")
    return out


def _bias_deltas_into_modules(adapter, notes, path):
    """Bias deltas (ComfyUI .diff_b) become the lora_B.bias of the LoRA on the same layer, as diffusers reads them;
    all-zero deltas (trainers save untouched norms) are dropped; any other full delta has no diffusers form."""
    if not adapter.deltas:
        return adapter
    out, zeros, folded = replace(adapter, deltas={}, modules=dict(adapter.modules)), 0, 0
    for name, delta in adapter.deltas.items():
        stem = name[: -len(".bias")] if name.endswith(".bias") else None
        module = out.modules.get(stem)
        if module is not None and delta.shape == (module.shape[0],) and module.magnitude is None:
            bias = delta if module.bias is None else (module.bias.double() + delta.double()).to(delta.dtype)
            out.modules[stem] = replace(module, bias=bias)
            folded += 1
        elif not bool(delta.any()):
            zeros += 1
        else:
            out.deltas[name] = delta
    if out.deltas:
        name = next(iter(out.deltas))
        raise LorakitError(
            "diffusers holds a bias delta only as the lora_B.bias of a LoRA on the same layer, and no other full "
            "delta: convert to lorakit or comfyui to keep it",
            path=path,
            tensor=name,
        )
    if folded:
        notes.append(f"{folded} bias delta(s) (.diff_b) written as lora_B.bias of their layer's LoRA")
    if zeros:
        notes.append(f"{zeros} all-zero full delta(s) dropped (they change nothing)")
    return out


def _from_original_names(adapter, notes):
    """Modules under a single file's original names renamed to diffusers' (naming.diffusers.diffusers_names); a LoRA on a fused
    tensor (Flux qkv, linear1) becomes one LoRA per slice: the same A, B's rows of the slice (exact)."""
    shapes = {n: tuple(m.shape[:2]) for n, m in adapter.modules.items() if m.kind in ("linear", "conv")}
    maps = diffusers_names(shapes, ldm_unet_family(adapter.modules, adapter.user_metadata))
    replacements = {dit_norm_diffusers(n) or n: t for n, t in adapter.replacements.items()}
    if not maps and replacements.keys() == adapter.replacements.keys():
        return adapter
    out, split = replace(adapter, modules={}, replacements=replacements), 0
    for name, m in adapter.modules.items():
        if name not in maps:
            out.add(m)
            continue
        if len(maps[name]) > 1 and m.magnitude is not None:
            raise LorakitError(
                "DoRA on a fused tensor has no diffusers equivalent (one norm over the fused rows)",
                tensor=name,
            )
        split += len(maps[name]) > 1
        for target, start, stop, swap in maps[name]:
            piece = m.rows(start, stop, swap, target)
            # a slice the LoRA leaves at zero (xlabs' qkv_lora: not the MLP's rows) is not written
            if len(maps[name]) == 1 or piece.B.any() or (piece.bias is not None and piece.bias.any()):
                out.add(piece)
    notes.append(
        f"{len(maps)} module(s) renamed from the single file's names to diffusers'"
        + (f"; {split} fused one(s) (qkv, linear1) split into one LoRA per slice, exactly" if split else "")
    )
    return out


def split_components(adapter):
    """({component: Adapter of what lies under it, names without the component prefix}, [names under none]): a
    pipeline's LoRA as one adapter per component (modules listed as `<module>.weight`)."""
    parts, outside = {}, []
    for tensors, key in (
        (adapter.modules, "modules"),
        (adapter.replacements, "replacements"),
        (adapter.deltas, "deltas"),
    ):
        for name, value in tensors.items():
            c = _component(name)
            if c is None:
                outside.append(f"{name}.weight" if key == "modules" else name)
                continue
            rest = name[len(c) + 1 :]
            getattr(parts.setdefault(c, Adapter()), key)[rest] = (
                replace(value, name=rest) if key == "modules" else value
            )
    return parts, outside


def _unet_legacy_names(part, notes):
    """A UNet's keys in the older diffusers naming (`attn1.processor.to_q_lora.down.weight`, `proj_in.lora.down.
    weight`): ComfyUI maps a UNet's attention projections only under these names (its key map has `.processor.to_*`,
    not `.to_*`), and diffusers converts them on load (all of a component's keys must be old-style: it looks at the
    first). Kept as PEFT names when a module has more than lora_A / lora_B (bias, DoRA)."""
    if not all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in part):
        notes.append(
            "unet keys kept in PEFT naming (lora bias or DoRA): ComfyUI misses its attention projections"
        )
        return part
    out = {}
    for key, t in part.items():
        module, factor = key[: -len(".lora_A.weight")], "down" if key.endswith(".lora_A.weight") else "up"
        m = re.fullmatch(r"(.+\.attn\d)\.(to_q|to_k|to_v|to_out)(?:\.0)?", module)
        out[f"{m[1]}.processor.{m[2]}_lora.{factor}.weight" if m else f"{module}.lora.{factor}.weight"] = t
    return out


def _flattened_clip_names(config):
    strip = lambda n: n[len("text_model.") :] if n.startswith("text_model.") else n  # noqa: E731
    out = dict(config)
    out["target_modules"] = sorted(strip(n) for n in config["target_modules"])
    for key in ("rank_pattern", "alpha_pattern"):
        out[key] = {strip(n): v for n, v in config[key].items()}
    return out
