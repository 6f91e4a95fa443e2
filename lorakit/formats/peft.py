"""PEFT LoRA adapters: a folder (adapter_config.json + adapter_model.safetensors) or a bare safetensors file.

Facts (huggingface/peft tuners/lora, utils/save_and_load.py): keys `base_model.model.<module>.lora_A.weight` [r, in],
`.lora_B.weight` [out, r], `.lora_B.bias` (lora_bias), `.lora_embedding_A` [r, num] / `.lora_embedding_B` [dim, r],
`.lora_magnitude_vector` (DoRA; [out], conv [1, out, 1, 1]); modules_to_save as full tensors at the module path;
scaling = lora_alpha / r, or / sqrt(r) with use_rslora; rank_pattern / alpha_pattern resolved by the first key with
re.match(rf"(.*\\.)?({key})$", module). The lora_B bias is scaled like the product.
"""

import json
import math
import os
import re

import torch

from ..core import Adapter, Module, default_kind, experts
from ..errors import LorakitError, opt
from ..io import atomic_output, write_safetensors
from ..io import read_config
from . import peft_experts
from .peft_config import (
    CONFIG,
    base_change,
    check_config,
    initialisation_note,
    pattern_value,
    untargeted_note,
)
from ..serving import qalora_group
from .common import check_rank, most_common, open_safetensors, refuse_deltas, refuse_unknown, t_contig

WEIGHTS, WEIGHTS_BIN = "adapter_model.safetensors", "adapter_model.bin"
PREFIX = "base_model.model."
# PEFT's EMBEDDING_LAYER_NAMES: save_embedding_layers ("auto": when the vocabulary was resized) saves their weights
SAVED_EMBEDDINGS = ("embed_tokens.weight", "lm_head.weight")
KEY = re.compile(
    r"^(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.(?!weight$|bias$)(?P<adapter>[^.]+))?(?:\.(?P<param>weight|bias))?$"
)


def _files(path):
    """(weights file, config dict or None) for a PEFT folder or a bare file (config read from beside it)."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    weights = path
    if os.path.isdir(path):
        weights = os.path.join(path, WEIGHTS)
        if not os.path.isfile(weights):
            weights = os.path.join(path, WEIGHTS_BIN)
        if not os.path.isfile(weights):
            raise LorakitError(f"folder has no {WEIGHTS}", path=path)
    return weights, read_config(folder, CONFIG)


def _tensors(weights):
    if weights.endswith(".bin"):
        from .loralib import load_state_dict

        return load_state_dict(weights), {}
    tf, meta = open_safetensors(weights)
    return {k: tf.get(k) for k in tf.header.entries}, meta


def detect(probe):
    path = probe.path
    if probe.is_dir:
        return os.path.isfile(os.path.join(path, CONFIG)) and (
            os.path.isfile(os.path.join(path, WEIGHTS)) or os.path.isfile(os.path.join(path, WEIGHTS_BIN))
        )
    keys = list(probe.header.entries) if probe.header else []
    return bool(keys) and any(KEY.match(k.removeprefix(PREFIX)) for k in keys)


def read(path, alpha=None, base=None, allow_unknown=False):
    weights, config = _files(path)
    tensors, _ = _tensors(weights)
    if isinstance(config, dict) and config.get("peft_type", "LORA") != "LORA":
        from . import peft_types

        return peft_types.read(tensors, config, path, base=base, allow_unknown=allow_unknown)
    return from_state_dict(tensors, config, path, alpha=alpha, base=base, allow_unknown=allow_unknown)


def from_state_dict(tensors, config, path, alpha=None, base=None, allow_unknown=False, source_format="peft"):
    """An Adapter from PEFT-named tensors (prefix `base_model.model.` optional) and an adapter_config dict."""
    if config is None:
        if alpha is None:
            raise LorakitError(
                f"no adapter_config.json beside the weights, so lora_alpha is unknown: pass {opt('alpha')}",
                path=path,
            )
        config = {"r": None, "lora_alpha": alpha}
    check_config(config, path)
    if config.get("peft_type", "LORA") != "LORA":
        raise LorakitError(f"peft_type {config.get('peft_type')} is not LoRA", path=path)
    notes = []
    parts, replacements, unknown, originals = _sorted_keys(tensors, config)
    refuse_unknown(path, unknown, allow_unknown, notes)
    if originals:
        notes.append(
            f"{len(originals)} starting copies of modules_to_save (original_module) not needed: skipped"
        )
    wrapped = peft_experts.split_wrappers(parts, config)  # target_parameters on MoE experts
    shapes = base.shapes() if base is not None else None
    ad = Adapter(
        base_model=config.get("base_model_name_or_path"),
        source_format=source_format,
        notes=notes,
        provenance={"source_format": source_format, "source_config": config},
        moved_base=base_change(config),
    )
    notes += [n for n in [initialisation_note(config), untargeted_note(config, parts)] if n]
    if base is not None and base.model_type:
        # what writing fused-expert LoRAs back as PEFT needs (their orientation), kept in the adapter's provenance
        ad.provenance["base_model_type"] = base.model_type
    for module, p in sorted(parts.items()):
        ad.add(_module(module, p, config, shapes, notes, path))
    for (parent, param), p in sorted(wrapped.items()):
        try:
            model_type = base.model_type if base is not None else None
            named = {**base.alias_shapes(), **shapes} if base is not None else None  # a GGUF's experts too
            for mod in peft_experts.expert_modules(parent, param, p, config, named, notes, model_type):
                ad.add(mod)
        except LorakitError as e:
            raise LorakitError(e.message, path=path, tensor=e.tensor, code=e.code) from None
    ad.replacements = replacements
    return ad


def _sorted_keys(tensors, config):
    """({module: {(part, param): tensor}}, {replaced tensor: tensor}, [unknown keys], [starting copies])."""
    parts, replacements, unknown, originals = {}, {}, [], []
    to_save = config.get("modules_to_save") or []
    for key, t in tensors.items():
        name = key.removeprefix(PREFIX)
        m = KEY.match(name)
        if m:
            parts.setdefault(m["module"], {})[(m["part"], m["param"])] = t
        elif name.endswith(".base_layer.weight"):  # save_embedding_layers: the (possibly resized) base weight
            replacements[name[: -len(".base_layer.weight")] + ".weight"] = t
        elif ".modules_to_save." in name:  # <module>.modules_to_save[.<adapter>].<param>
            module, _, rest = name.partition(".modules_to_save.")
            param = rest if rest in ("weight", "bias") else rest.split(".", 1)[-1]
            _replace(replacements, f"{module}.{param}", t, key)
        elif ".original_module." in name:  # PEFT 0.21 saves the starting copy too: the base (resized) has it
            originals.append(key)
        elif name.rsplit(".", 1)[0].rsplit(".", 1)[-1] in to_save or name.rsplit(".", 1)[0] in to_save:
            _replace(replacements, name, t, key)
        elif name.endswith(SAVED_EMBEDDINGS):  # save_embedding_layers: a resized vocabulary's own tensors
            _replace(replacements, name, t, key)
        else:
            unknown.append(key)
    return parts, replacements, unknown, originals


def _replace(replacements, name, t, key):
    """A modules_to_save tensor; PEFT 0.21 writes it twice (`<module>.weight` and `<module>.modules_to_save.weight`):
    the copies must agree."""
    if name in replacements and not torch.equal(replacements[name], t):
        raise LorakitError(f"two different trained copies of {name}", tensor=key)
    replacements[name] = t


def _module(module, p, config, shapes, notes, path):
    """One LoRA module from its PEFT tensors `p`, at PEFT's scale (rank / alpha patterns, rsLoRA)."""
    embedding = ("lora_embedding_A", None) in p or ("lora_embedding_B", None) in p
    a_key = ("lora_embedding_A", None) if embedding else ("lora_A", "weight")
    b_key = ("lora_embedding_B", None) if embedding else ("lora_B", "weight")
    if a_key not in p or b_key not in p:
        have = " and ".join(k[0] for k in p)
        raise LorakitError(
            f"module has {have} but no {(a_key if a_key not in p else b_key)[0]} (wrong pairing)",
            path=path,
            tensor=module,
        )
    A, B = p[a_key], p[b_key]
    check_rank(path, module, A, B)
    if embedding:  # PEFT: delta = (B @ A)^T with A [r, num], B [dim, r]
        spec_A, spec_B, kind = t_contig(B), t_contig(A), "embedding"
    else:
        transposed = A.ndim == 2 and _is_transposed(module, A, B, bool(config.get("fan_in_fan_out")), shapes)
        kind = "linear_t" if transposed else default_kind(A.ndim)
        spec_A, spec_B = (t_contig(B), t_contig(A)) if kind == "linear_t" else (A, B)
    r = A.shape[0]
    stated = pattern_value(config.get("rank_pattern"), module, config.get("r"))
    # PEFT builds the layer at the stated rank and cannot load these factors
    if stated is not None and stated != r:
        raise LorakitError(
            f"lora_A has rank {r} but adapter_config.json gives this module r = {stated!r} (r / rank_pattern): "
            "PEFT cannot load the file, and alpha / r is ambiguous",
            path=path,
            tensor=module,
            code="LK401",
        )
    lora_alpha = pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha"))
    if lora_alpha is None:
        raise LorakitError("adapter_config.json has no lora_alpha", path=path)
    scale = lora_alpha / math.sqrt(r) if config.get("use_rslora") else lora_alpha / r
    bias_scale = scale
    if config.get("use_qalora") and kind == "linear":
        spec_A, pooling = _qalora(module, spec_A, config, shapes, notes)
        scale *= pooling
    mod = Module(module, spec_A, spec_B, alpha=scale * r, kind=kind)
    if abs(mod.scale - scale) > 0:
        notes.append(f"{module}: scale {scale!r} stored as alpha {mod.alpha!r} / {r} (fp32 rounding)")
    if ("lora_B", "bias") in p:
        mod.bias = (p[("lora_B", "bias")].float() * bias_scale).to(p[("lora_B", "bias")].dtype)
    mag = p.get(("lora_magnitude_vector", None), p.get(("lora_magnitude_vector", "weight")))
    # PEFT would start the magnitude from the base's norms: not this file's delta
    if mag is None and config.get("use_dora"):
        raise LorakitError(
            "adapter_config.json has use_dora but the file has no lora_magnitude_vector for this module",
            path=path,
            tensor=module,
        )
    if mag is not None:
        if kind == "embedding":
            raise LorakitError("DoRA on an embedding is not supported", path=path, tensor=module)
        mod.magnitude = mag.reshape(-1)
        mod.dora_axis = 1 if kind == "linear_t" else 0
    return mod


def _qalora(module, A, config, shapes, notes):
    """(A over every input, the factor for the scale) of a QA-LoRA module (use_qalora, PEFT's GPTQ layers): its
    lora_A [r, in / g] acts on the inputs averaged in groups of g, times in / g (QALoraLinearVariant.forward), which
    is the LoRA whose A repeats each column over its group of g inputs, at in / g / g times the scale: exact. A
    module whose A already spans the base's inputs (a layer PEFT left unpooled) stays as it is."""
    g = qalora_group(config)
    width = A.shape[1]
    stored = shapes.get(f"{module}.weight") if shapes else None
    if stored is not None and tuple(stored)[-1] == width:
        return A, 1.0
    if not any(n.startswith("QA-LoRA") for n in notes):
        notes.append(
            f"QA-LoRA (use_qalora, qalora_group_size {g}): lora_A acts on the inputs averaged in groups of {g}; "
            f"read as the same change of W, lora_A repeated over each group (scale times in / {g} / {g})"
        )
    return A.repeat_interleave(g, dim=1), width / g


def _is_transposed(module, A, B, fan_in_fan_out, base_shapes):
    """GPT-2 Conv1D stores W as [in, out]: decided by the base's shape where it tells, else by fan_in_fan_out."""
    if base_shapes is not None and f"{module}.weight" in base_shapes:
        shape = tuple(base_shapes[f"{module}.weight"])
        if shape == (A.shape[1], B.shape[0]) and shape != (B.shape[0], A.shape[1]):
            return True
        if shape == (B.shape[0], A.shape[1]) and shape != (A.shape[1], B.shape[0]):
            return False
    return fan_in_fan_out


def to_state_dict(adapter, path, base=None):
    """(tensors with PEFT names, without the base_model.model. prefix, and the LoraConfig fields). Expert LoRAs on
    rows of fused expert tensors become ParamWrappers (target_parameters), oriented by the base's model type."""
    modules = dict(adapter.modules)
    model_type = _fused_experts_model_type(modules, base, adapter.provenance, path)
    wrapped, target_parameters, wrapper_ranks = peft_experts.wrapped_tensors(modules, model_type, path)
    mods = list(modules.values())
    refuse_deltas(adapter, "PEFT / diffusers", path)
    if not mods and not adapter.replacements and not wrapped:
        raise LorakitError("the adapter is empty", path=path)
    dora = {m.magnitude is not None for m in mods}
    if len(dora) > 1:
        raise LorakitError(
            "PEFT's use_dora applies to every module, but only some modules here are DoRA", path=path
        )
    kinds_t = {m.kind == "linear_t" for m in mods if m.kind in ("linear", "linear_t")}
    tensors = dict(wrapped)
    for m in mods:
        if m.kind == "embedding":
            tensors[f"{m.name}.lora_embedding_A"] = t_contig(m.B)
            tensors[f"{m.name}.lora_embedding_B"] = t_contig(m.A)
        elif m.kind == "linear_t":
            tensors[f"{m.name}.lora_A.weight"] = t_contig(m.B)
            tensors[f"{m.name}.lora_B.weight"] = t_contig(m.A)
        else:
            tensors[f"{m.name}.lora_A.weight"] = m.A
            tensors[f"{m.name}.lora_B.weight"] = m.B
        if m.bias is not None:
            if m.magnitude is not None:
                raise LorakitError("PEFT does not allow lora_bias with DoRA", path=path, tensor=m.name)
            tensors[f"{m.name}.lora_B.bias"] = (m.bias.float() / m.scale).to(m.bias.dtype)
        if m.magnitude is not None:
            want = 1 if m.kind == "linear_t" else 0
            if m.dora_axis != want or m.kind == "embedding":
                raise LorakitError(
                    f"DoRA magnitude along axis {m.dora_axis} cannot be written as PEFT's (axis {want})",
                    path=path,
                    tensor=m.name,
                )
            mag = m.magnitude.reshape(1, -1, *[1] * (len(m.shape) - 2)) if m.kind == "conv" else m.magnitude
            tensors[f"{m.name}.lora_magnitude_vector"] = mag.contiguous()
    for name, t in adapter.replacements.items():
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        tensors[f"{module}.base_layer.weight" if module in adapter.modules else name] = t
    ranks = {m.name: m.rank for m in mods}
    alphas = {
        m.name: m.alpha for m in mods
    }  # PEFT's scale lora_alpha / r is then the spec's alpha / r exactly
    ranks.update({parent: r for parent, (r, _) in wrapper_ranks.items()})
    alphas.update({parent: a for parent, (_, a) in wrapper_ranks.items()})
    r = most_common(ranks.values()) if ranks else 8
    alpha = most_common(alphas.values()) if alphas else 8
    source = adapter.provenance.get("source_config") or {}
    config = {
        "peft_type": "LORA",
        "task_type": source.get("task_type"),
        "base_model_name_or_path": adapter.base_model,
        "revision": source.get("revision"),
        "r": r,
        "lora_alpha": alpha,
        "target_modules": target_modules(mods),
        "rank_pattern": {n: v for n, v in ranks.items() if v != r},
        "alpha_pattern": {n: v for n, v in alphas.items() if v != alpha},
        "use_rslora": False,
        "use_dora": dora == {True},
        "fan_in_fan_out": kinds_t == {True},
        "bias": "none",
        "lora_dropout": 0.0,
        "modules_to_save": sorted(
            {n.rsplit(".", 1)[0] for n in adapter.replacements if n.rsplit(".", 1)[0] not in adapter.modules}
        )
        or None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    if any(m.bias is not None for m in mods):
        config["lora_bias"] = True
    if target_parameters:
        config["target_parameters"] = target_parameters
    return tensors, config


def target_modules(mods):
    """LoraConfig.target_modules: each module by its full name, per-expert ones (`...experts.3.gate_proj`) by their
    projection's (`gate_proj`). PEFT on transformers 5 converts per-expert targets onto the fused experts' parameters
    at load: 0.21 by the projection's name, 0.22 by the whole target with the projection renamed, which keeps the
    expert index (and Mixtral's v4 `block_sparse_moe`) and so matches nothing: the experts then load as nothing,
    with a warning. The projection's name loads exactly in both (same logits, tested); on a model with per-expert
    Linear layers it targets every module of that name, those without weights here at zero."""
    names = {m.name for m in mods}
    per_expert = {n for n in names if experts.PER_EXPERT.fullmatch(n)}
    return sorted(names - per_expert) + sorted({n.rsplit(".", 1)[1] for n in per_expert})


def _fused_experts_model_type(modules, base, provenance, path):
    """The base's model type where the adapter has LoRAs on rows of fused expert tensors (it says whether a tensor
    is stored [E, out, in] or [E, in, out]), else None: from --base, else as the adapter recorded it when it was read
    with its base (provenance base_model_type)."""
    fused = [g for g in experts.expert_groups(modules) if g.endswith(f".{experts.WILDCARD}")]
    if not fused:
        return None
    model_type = (base.model_type if base is not None else None) or provenance.get("base_model_type")
    if model_type is None:
        raise LorakitError(
            "LoRAs on rows of a fused expert tensor: PEFT's target_parameters layout depends on the model type, "
            "pass --base (its config.json)",
            path=path,
            tensor=fused[0],
        )
    return model_type


def write(adapter, path, force=False, base=None):
    tensors, config = to_state_dict(adapter, path, base)

    with atomic_output(path, force=force, directory=True) as tmp:
        write_safetensors(
            os.path.join(tmp, WEIGHTS), {PREFIX + k: v for k, v in tensors.items()}, {"format": "pt"}
        )
        with open(os.path.join(tmp, CONFIG), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
