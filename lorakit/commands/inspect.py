"""`lorakit inspect`: what an adapter is, from its header; with spectrum=True, the singular values of every dW."""

import math
import os
import re
from collections import Counter, defaultdict

from ..core import experts
from ..errors import LorakitError
from ..formats import detect_format, load, takes
from ..io.dtypes import dtype_name
from ..io.hub import local


def _pattern(name):
    """Layer indices become '*': model.layers.3.mlp.up_proj -> model.layers.*.mlp.up_proj; in kohya's mangled names
    too: lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q -> lora_unet_input_blocks_*_*_transformer_blocks_*_
    attn1_to_q (an SDXL file is then ~20 lines, not 800)."""
    if "." not in name:
        return re.sub(r"(?<=_)\d+(?=_|$)", "*", name)
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name)


def _target(pattern):
    """The layer a pattern ends in: mlp.up_proj -> up_proj; ..._blocks_*_attn1_to_q -> attn1_to_q."""
    if "." in pattern:
        return pattern.rsplit(".", 1)[-1]
    return pattern.rsplit("*_", 1)[-1]


def _size(path):
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    return os.path.getsize(path)


def inspect(adapter, spectrum=False, base=None, verbose=False, quiet=False):
    """Summary of an adapter (any readable format). Returns a JSON-able dict.

    Without `spectrum` only headers and the alpha scalars are read. With `spectrum`, per module: the singular values
    of dW from the factors (QR + small SVD), effective rank and ||dW||_F; with `base`, also ||dW||_F / ||W||_F.
    """
    path = os.fspath(local(adapter, "adapter", quiet, header_only=not spectrum))
    base = local(base, "base", quiet)
    fmt = detect_format(path)
    if base is not None:
        from ..bases import open_base

        base = open_base(base)  # once, for the reader (names, shapes) and the spectrum's ||W||
    # llama.cpp's Q/K row order changes no statistic here
    options = {"values": spectrum, "unpermute_qk": False, "base": base}
    ad = load(path, format=fmt.name, **{k: v for k, v in options.items() if k in takes(fmt.read)})
    modules = [_module_row(m) for m in ad.modules.values()]
    targets = _groups(modules)
    dtypes = Counter(dtype_name(t.dtype) for m in ad.modules.values() for t in (m.A, m.B))
    report = {
        "file": path,
        "format": fmt.name,
        "peft_type": ad.provenance.get("peft_type", "LORA") if fmt.name == "peft" else None,
        "file_size": _size(path),
        "spec_version": _spec_version(path) if fmt.name == "lorakit" else None,
        "base_model": ad.base_model,
        "base_fingerprint": ad.base_fingerprint,
        "module_count": len(modules),
        "params": ad.num_params,
        "ranks": dict(sorted(Counter(m["rank"] for m in modules).items())),
        "rank_alpha": [
            {"rank": r, "alpha": a, "module_count": n}
            for (r, a), n in sorted(Counter((m["rank"], m["alpha"]) for m in modules).items())
        ],
        "dtypes": dict(dtypes),
        "targets": targets,
        "experts": _experts(ad.modules),
        "replacements": {k: list(v.shape) for k, v in ad.replacements.items()},
        "deltas": {k: list(v.shape) for k, v in ad.deltas.items()},
        "transforms": [
            {"module": n, "kind": t.kind, "params": t.num_params, "low_rank": t.kind == "hra"}
            for n, t in sorted(ad.transforms.items())
        ],
        "provenance": ad.provenance,
        "metadata": ad.user_metadata,
        # what reading it found (PEFT would not load some modules, kohya names unresolved ...) and why it does not
        # apply to its base as it is (PiSSA, LoftQ, an Activated LoRA ...)
        "notes": [
            *ad.notes,
            *([f"not a weight change of the base as it is: {ad.moved_base}"] if ad.moved_base else []),
        ],
    }
    report["engines"] = _engine_verdicts(ad, fmt.name)
    if verbose or spectrum:
        report["modules"] = modules
    if spectrum:
        _add_spectrum(ad, modules, base, quiet)
    return report


def _engine_verdicts(ad, fmt):
    """{engine: {"served_exactly", "problems": [codes]}}: what `validate --for ENGINE` says, for a CI to gate on."""
    from .. import serving

    verdicts = {}
    for name, engine in serving.ENGINES.items():
        codes = sorted({p[0] for p in serving.problems(ad, engine, fmt)})
        verdicts[name] = {"served_exactly": not codes, "problems": codes}
    return verdicts


def _module_row(m):
    return {
        "module": m.name,
        "kind": m.kind,
        "rank": m.rank,
        "alpha": m.alpha,
        "scale": m.scale,
        "shape": list(m.shape),
        "dtype": dtype_name(m.A.dtype),
        "params": m.num_params,
        "bias_delta": m.bias is not None,
        "dora": m.magnitude is not None,
    }


def _groups(modules):
    """Modules grouped by kind and name pattern (q_proj x 32 layers), with their ranks and alphas."""
    groups = defaultdict(list)
    for m in modules:
        groups[(m["kind"], _pattern(m["module"]))].append(m)
    return [
        {
            "kind": kind,
            "pattern": pat,
            "target": _target(pat),
            "count": len(ms),
            "experts": len({found[1] for m in ms if (found := experts.expert_of(m["module"]))}) or None,
            "ranks": sorted({m["rank"] for m in ms}),
            "alphas": sorted({m["alpha"] for m in ms}),
        }
        for (kind, pat), ms in sorted(groups.items())
    ]


def _experts(modules):
    """One row per Mixture-of-Experts layer: its expert count, ranks and projections (shared experts and routers are
    ordinary modules)."""
    layers = {}
    for group, names in experts.expert_groups(modules).items():
        layer, projection = experts.layer_of(group)
        row = layers.setdefault(layer, {"layer": layer, "experts": set(), "ranks": set(), "projections": []})
        row["experts"] |= set(names)
        row["ranks"] |= {modules[n].rank for n in names.values()}
        row["projections"].append(projection)
    return [
        {
            **row,
            "experts": len(row["experts"]),
            "ranks": sorted(row["ranks"]),
            "projections": sorted(row["projections"]),
        }
        for _, row in sorted(layers.items())
    ]


def _spec_version(path):
    from ..io import read_header
    from ..spec import META_VERSION

    return read_header(path).metadata.get(META_VERSION)


def _add_spectrum(ad, modules, base, quiet):
    import torch
    from ..progress import progress
    from ..core.linalg import singular_values

    ckpt, on_base = None, ad.modules
    if base is not None:
        from ..bases import open_base

        ckpt = open_base(base)
        on_base = dict(zip(ad.modules, ckpt.to_base_names(ad).modules.values()))  # the base's tensor names
    for row in progress(modules, quiet=quiet, desc="spectrum", unit="module"):
        m = ad.modules[row["module"]]
        S = singular_values(*m.factors(torch.float64))
        norm = float(S.square().sum().sqrt())
        p = S / S.sum() if S.sum() > 0 else S
        entropy = -float((p[p > 0] * p[p > 0].log()).sum())
        row.update(
            singular_values=[float(s) for s in S],
            norm=norm,
            effective_rank=math.exp(entropy) if norm else 0.0,
            numerical_rank=int((S > S[0] * 1e-6).sum()) if norm else 0,
        )
        if ckpt is not None:
            key = f"{on_base[m.name].name}.weight"
            if key not in ckpt:
                raise LorakitError("base has no tensor for this module", path=base, tensor=key)
            if ckpt.shape(key) != tuple(m.shape):
                raise LorakitError(
                    f"base shape {list(ckpt.shape(key))} does not fit the adapter's {list(m.shape)}",
                    path=base,
                    tensor=key,
                )
            W = ckpt.get(key)
            row["base_norm"] = float(W.double().norm())
            row["relative_norm"] = norm / row["base_norm"] if row["base_norm"] else math.inf
