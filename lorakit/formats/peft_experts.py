"""PEFT `target_parameters` (ParamWrapper) on Mixture-of-Experts weights, read as exact per-expert LoRA modules under
the names the checkpoint stores on disk.

Facts (peft tuners/lora/layer.py ParamWrapper; transformers 5 conversion_mapping; checked against PEFT's
merge_and_unload + save_pretrained in the tests):
- the wrapped parameter is the in-memory fused tensor [E, out, in]: `mlp.experts.gate_up_proj [E, 2I, H]` (gate rows
  first, then up), `mlp.experts.down_proj [E, H, I]`; on disk transformers writes it back per expert:
  `experts.N.{gate,up,down}_proj` (qwen2_moe family) or `block_sparse_moe.experts.N.{w1,w3,w2}` (Mixtral);
- `lora_A [r E, in]`, `lora_B [out, r E]`; expert e: A.reshape(E, r, in)[e], and B's column r_i E + e
  (B.reshape(out, r, E)[:, :, e]) from PEFT 0.19.1 on, B.reshape(out, E, r)[:, e, :] before;
- a targeted 2-D `weight` (PEFT 0.21's all-linear targets a MoE router's `gate.weight` so) is a plain LoRA on it:
  Linear.get_delta_weight, B @ A;
- two targeted parameters of one module nest: the inner wrapper (`experts.base_layer.lora_*`) is the first registered,
  the outer (`experts.lora_*`) the second; the saved `target_parameters` list need not keep that order (seen here:
  it varies between runs), so gate_up_proj and down_proj are told apart by their shapes, which admit one assignment.
"""

import math
import re

from ..core import Module, experts
from ..errors import LorakitError
from .peft_config import pattern_value

# fused parameter -> the per-expert tensors it is cut into, row order: (qwen2_moe family name, Mixtral name)
FUSED = {"gate_up_proj": (("gate_proj", "w1"), ("up_proj", "w3")), "down_proj": (("down_proj", "w2"),)}


def split_wrappers(parts, config):
    """Pop the ParamWrapper entries out of `parts` ({module: {(part, param): tensor}}): {(parent, parameter): its
    parts}, each assigned to its target parameter by the nesting depth."""
    targets = [t for t in config.get("target_parameters") or [] if isinstance(t, str)]
    if not targets:
        return {}
    out = {}
    for module in sorted(parts):
        parent, depth = module, 0
        while parent.endswith(".base_layer"):
            parent, depth = parent[: -len(".base_layer")], depth + 1
        names = [t.rsplit(".", 1)[-1] for t in targets if _targets(parent, t)]
        if not names or (
            names == ["weight"] and depth == 0
        ):  # a 2-D weight (a MoE router): a plain LoRA on it
            continue
        if depth >= len(names):
            raise LorakitError(
                f"{depth + 1} nested ParamWrappers but {len(names)} target_parameters", tensor=module
            )
        out[(parent, names[len(names) - 1 - depth])] = parts.pop(module)
    return _by_shapes(out)


def _targets(parent, target):
    """Whether a target_parameters entry names a parameter of module `parent`: PEFT matches `<module>.<param>` by its
    suffix, so a bare parameter name matches every module that has one (here: the experts' fused tensors)."""
    module, _, param = target.rpartition(".")
    return parent.endswith("." + module) if module else param in FUSED and parent.endswith(".experts")


def _fits(gate_up, down):
    """Whether two wrappers' (lora_A, lora_B) are gate_up_proj and down_proj of one MLP: dW [2I, H] and [H, I], or
    in a stored [E, in, out] layout PEFT keeps (Llama 4) [H, 2I] and [I, H]."""
    (gu_A, gu_B), (d_A, d_B) = gate_up, down
    out_in = gu_A.shape[1] == d_B.shape[0] and gu_B.shape[0] == 2 * d_A.shape[1]
    in_out = gu_B.shape[0] == d_A.shape[1] and gu_A.shape[1] == 2 * d_B.shape[0]
    return out_in or in_out


def _by_shapes(wrapped):
    """gate_up_proj and down_proj of one parent, told apart by their shapes: PEFT saves target_parameters in an
    order that need not be the nesting's (it can come from a set), and the shapes admit one assignment only."""
    out = dict(wrapped)
    for parent in {p for p, _ in wrapped}:
        pair = [wrapped.get((parent, "gate_up_proj")), wrapped.get((parent, "down_proj"))]
        if None in pair or any(("lora_A", "weight") not in p or ("lora_B", "weight") not in p for p in pair):
            continue
        first, second = ((p[("lora_A", "weight")], p[("lora_B", "weight")]) for p in pair)
        if not _fits(first, second) and _fits(second, first):
            out[(parent, "gate_up_proj")], out[(parent, "down_proj")] = pair[1], pair[0]
        elif not _fits(first, second):
            raise LorakitError(
                "the two ParamWrappers fit neither gate_up_proj [2I, H] + down_proj [H, I] assignment",
                tensor=parent,
            )
    return out


def _new_order(config):
    """PEFT >= 0.19.1 orders B's columns rank-major (r_i E + e); older releases expert-major."""
    version = re.match(r"(\d+)\.(\d+)\.?(\d*)", str(config.get("peft_version") or "0.19.1"))
    return tuple(int(v or 0) for v in version.groups()) >= (0, 19, 1) if version else True


def expert_modules(parent, param, p, config, shapes, notes, model_type=None):
    """The per-expert Modules of one wrapped parameter, named as the checkpoint stores its experts: per expert, or
    `<fused tensor>.<e>` where the base keeps them fused on disk (gpt-oss, Llama 4)."""
    if param not in FUSED:
        raise LorakitError(
            f"target_parameters '{param}': a layout lorakit does not know (it reads {', '.join(FUSED)} as "
            "transformers 5 holds them, [E, out, in])",
            tensor=parent,
        )
    A, B = p.get(("lora_A", "weight")), p.get(("lora_B", "weight"))
    if A is None or B is None or A.ndim != 2 or B.ndim != 2 or B.shape[1] != A.shape[0]:
        raise LorakitError("ParamWrapper without a lora_A [r E, in] / lora_B [out, r E] pair", tensor=parent)
    # PEFT 0.21's all-linear gives gate_up_proj (two projections) twice the rank and alpha by a pattern
    r = pattern_value(config.get("rank_pattern"), f"{parent}.{param}", config.get("r"))
    if not isinstance(r, int) or r < 1 or A.shape[0] % r:
        raise LorakitError(f"lora_A has {A.shape[0]} rows: not r x E experts for r = {r!r}", tensor=parent)
    E, out, pieces = A.shape[0] // r, B.shape[0], FUSED[param]
    alpha = pattern_value(config.get("alpha_pattern"), f"{parent}.{param}", config.get("lora_alpha")) or r
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    A3 = A.reshape(E, r, A.shape[1])
    B3 = (
        B.reshape(out, r, E).permute(2, 0, 1) if _new_order(config) else B.reshape(out, E, r).permute(1, 0, 2)
    )
    fused = f"{parent}.{param}"
    if shapes is not None and fused in shapes and len(shapes[fused]) == 3:
        return _fused_on_disk(fused, A3, B3, scale * r, shapes[fused], model_type)
    if out % len(pieces):
        raise LorakitError(f"lora_B has {out} rows: not {len(pieces)} equal parts ({param})", tensor=parent)
    names = _expert_names(parent, param, E, out // len(pieces), A.shape[1], shapes, notes)
    modules, rows = [], out // len(pieces)
    for e in range(E):
        for i, name in enumerate(names[e]):
            # gate, up, gate, up, ... where the model interleaves them (transformers' gpt-oss: gate_up[..., ::2])
            if model_type in INTERLEAVED:
                B_e = B3[e, i :: len(pieces)].contiguous()
            else:
                B_e = B3[e, i * rows : (i + 1) * rows].contiguous()
            modules.append(Module(name, A3[e].contiguous(), B_e, alpha=scale * r))
    return modules


# model types whose fused gate_up_proj interleaves gate's and up's rows (transformers GptOssExperts; llama.cpp's
# converter splits it so), where every other model stacks gate's rows, then up's
INTERLEAVED = ("gpt_oss",)


# model types for which PEFT (transformers_weight_conversion) converts per-expert adapters onto transformers 5's fused
# experts at load: those whose conversion pattern (transformers conversion_mapping) is mixtral or qwen2_moe. Any
# other MoE type loads a per-expert adapter's expert keys as nothing, silently: it needs target_parameters.
PER_EXPERT_LOADED = (
    *("mixtral", "minimax", "minimax_m2", "qwen2_moe", "qwen3_moe", "qwen3_next", "qwen3_omni_moe"),
    *("qwen3_omni_moe_thinker", "qwen3_omni_moe_text", "deepseek_v2", "deepseek_v3", "deepseek_v32", "dots1"),
    *("afmoe", "ernie4_5_moe", "glm4_moe", "glm4_moe_lite", "glm_moe_dsa", "glm4v_moe", "longcat_flash"),
    *("solar_open", "mellum", "beam", "hunyuan_v1_moe", "flex_olmo", "olmoe", "sarvam_mla", "exaone_moe"),
    "cohere2_moe",
)


def wants_target_parameters(model_type, engine=None):
    """Whether per-expert LoRAs go out as PEFT's target_parameters for a base of `model_type`: for an engine, where
    it loads them so (vLLM's 3-D models); for PEFT itself, where it cannot load them per expert."""
    if model_type is None:
        return False
    return model_type in engine.experts_3d if engine is not None else model_type not in PER_EXPERT_LOADED


# model types whose experts transformers marks is_transposed (stored [E, in, out]: gpt-oss and a few others): PEFT's
# ParamWrapper then keeps in / out as the tensor's, so its dW = B A is the transpose of each expert's slice; for every
# other fused tensor (Llama 4's [E, H, 2I] too) B A has the slice's own layout (peft ParamWrapper.update_layer)
PEFT_TRANSPOSED = ("gpt_oss", "aria", "ergo", "openai_privacy_filter")


def _fused_on_disk(tensor, A3, B3, alpha, stored, model_type):
    """One Module per expert on the rows of a fused tensor the base stores 3-D: [E, out, in] as the LoRA is, or
    [E, in, out] against it (gpt-oss: PEFT_TRANSPOSED), where expert e's rows take dW_e^T = A_e^T B_e^T (exact: the factors swap)."""
    E, inn, out = A3.shape[0], A3.shape[2], B3.shape[1]
    if stored[0] != E:
        raise LorakitError(f"the adapter has {E} experts, the base {stored[0]}", tensor=tensor)
    as_is, transposed = tuple(stored[1:]) == (out, inn), tuple(stored[1:]) == (inn, out)
    if as_is and transposed:  # square: the orientation is the model's
        as_is = model_type not in PEFT_TRANSPOSED
    if not (as_is or transposed):
        raise LorakitError(
            f"base {list(stored)} is neither [E, out, in] = [{E}, {out}, {inn}] nor [E, in, out] = [{E}, {inn}, {out}]",
            tensor=tensor,
        )
    modules = [Module(f"{tensor}.{e}", A3[e].contiguous(), B3[e].contiguous(), alpha=alpha) for e in range(E)]
    return modules if as_is else [m.transposed() for m in modules]


def _expert_names(parent, param, E, rows, cols, shapes, notes):
    """[[module name of each row piece] per expert], checked against the base's per-expert tensors when given."""
    layouts = {
        "qwen2_moe": lambda e: [f"{parent}.{e}.{q}" for q, _ in FUSED[param]],
        "mixtral": lambda e: [
            f"{parent.replace('.mlp.experts', '.block_sparse_moe.experts')}.{e}.{m}" for _, m in FUSED[param]
        ],
    }
    if shapes is None:
        notes.append(
            f"{parent}.{param}: {E} experts named as the qwen2_moe family stores them (pass --base to check)"
        )
        return [layouts["qwen2_moe"](e) for e in range(E)]
    for layout in layouts.values():
        names = [layout(e) for e in range(E)]
        if all(f"{n}.weight" in shapes for per in names for n in per):
            bad = [n for per in names for n in per if tuple(shapes[f"{n}.weight"]) != (rows, cols)]
            if bad:
                shape = list(shapes[f"{bad[0]}.weight"])
                raise LorakitError(
                    f"base {shape}, adapter expert slice [{rows}, {cols}] ({param})", tensor=bad[0]
                )
            if f"{layout(E)[0]}.weight" in shapes:
                raise LorakitError(
                    f"the adapter has {E} experts, the base more ({layout(E)[0]})", tensor=parent
                )
            return names
    tried = " or ".join(f"{layout(0)[0]}.weight" for layout in layouts.values())
    raise LorakitError(f"{E} experts of {param}: the base has neither layout ({tried})", tensor=parent)


def fused_in_memory(adapter):
    """The adapter with its per-expert modules (`<parent>.<e>.{gate,up,down}_proj`, the qwen2_moe family's names) as
    rows of transformers 5's fused in-memory tensors: `<parent>.gate_up_proj.<e>` [2I, H], gate's rows then up's (A
    stacked, B block-diagonal: exact at the sum of their ranks; a missing half is zero rows), and
    `<parent>.down_proj.<e>`. What PEFT's ParamWrapper layout is written from (vLLM's 3-D MoE models)."""
    import dataclasses

    import torch

    modules, fused = dict(adapter.modules), {}
    for group, names in experts.expert_groups(adapter.modules).items():
        parent, proj = experts.layer_of(group)
        if f".experts.{experts.WILDCARD}." not in group or proj not in ("gate_proj", "up_proj", "down_proj"):
            continue
        param = "down_proj" if proj == "down_proj" else "gate_up_proj"
        for e, name in names.items():
            fused.setdefault((parent, param, e), {})[proj] = modules.pop(name)
    for (parent, param, e), parts in sorted(fused.items()):
        name = f"{parent}.{param}.{e}"
        if param == "down_proj":
            modules[name] = dataclasses.replace(parts["down_proj"], name=name)
            continue
        half, pieces = next(iter(parts.values())), [parts.get(p) for p in ("gate_proj", "up_proj")]
        if (
            None not in pieces
            and pieces[0].scale == pieces[1].scale
            and torch.equal(pieces[0].A, pieces[1].A)
        ):
            # one A for both halves, as a ParamWrapper on gate_up_proj trains it: rank r, not 2r
            B = torch.cat([pieces[0].B, pieces[1].B])
            modules[name] = dataclasses.replace(pieces[0], name=name, B=B)
            continue
        B2s = [m.factors()[0] if m else torch.zeros(half.shape[0], 0) for m in pieces]
        A2s = [m.factors()[1] if m else torch.zeros(0, half.shape[1]) for m in pieces]
        A, B = torch.cat(A2s), torch.block_diag(*B2s)  # scales folded: alpha = rank
        modules[name] = Module(name, A, B, alpha=float(A.shape[0]))
    return dataclasses.replace(adapter, modules=modules)


def wrapped_tensors(modules, model_type, path):
    """(PEFT ParamWrapper tensors {key: tensor}, target_parameters, {parent module: (r, alpha)}) for the fused-row
    expert modules among `modules` ({name: Module}, popped): per layer gate_up_proj is the inner wrapper
    (`<parent>.base_layer.lora_*`) and down_proj the outer (`<parent>.lora_*`), as PEFT registers them; every expert
    of a tensor at one rank (zero-padded: exact) and one scale (folded into B where they differ)."""
    import torch

    from ..serving import folded

    by_parent = {}
    for group, names in experts.expert_groups(modules).items():
        parent, param = experts.layer_of(group)
        if not group.endswith(f".{experts.WILDCARD}") or param not in FUSED:
            continue
        if sorted(names) != list(range(len(names))):
            raise LorakitError(
                f"PEFT's target_parameters holds every expert of {param}; the adapter has {len(names)} of them "
                "(convert with --base to give the others zero LoRAs)",
                path=path,
                tensor=group,
            )
        members = [modules.pop(names[e]) for e in range(len(names))]
        by_parent.setdefault(parent, {})[param] = [
            m.transposed() if model_type in PEFT_TRANSPOSED else m for m in members
        ]
    tensors, targets, patterns = {}, set(), {}
    for parent, params in sorted(by_parent.items()):
        every = [m for ms in params.values() for m in ms]
        rank = max(m.rank for m in every)
        alpha = every[0].alpha if len({(m.rank, m.alpha) for m in every}) == 1 else float(rank)
        patterns[parent] = (rank, alpha)
        for param, ms in params.items():
            inner = "base_layer." if param == "gate_up_proj" and len(params) == 2 else ""
            ms = [folded(m, rank, alpha / rank) for m in ms]
            tensors[f"{parent}.{inner}lora_A.weight"] = torch.cat([m.A for m in ms]).contiguous()
            tensors[f"{parent}.{inner}lora_B.weight"] = (
                torch.stack([m.B for m in ms], -1).flatten(1).contiguous()
            )
            targets.add(".".join(parent.split(".")[-2:] + [param]))
    order = sorted(targets, key=lambda t: (t.rsplit(".", 1)[1] != "gate_up_proj", t))  # the inner one first
    return tensors, order, patterns
