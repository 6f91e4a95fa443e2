"""`combine`, `resize` and `diff`: IO around lorakit.algebra (the math lives there)."""

import os

import torch

from ..core import Adapter, algebra
from ..errors import LorakitError, opt
from ..io.dtypes import user_dtype
from ..naming import natural_key
from ..methods import USES_DENSITY, USES_SEED, get_method
from ..progress import progress
from ..io import check_output
from ..options import CombineOptions, ResizeOptions, seed_in_range, takes_options
from .args import (
    as_adapter,
    factors_only,
    in_range,
    load_inputs,
    local,
    one_rule,
    paths,
    rank_rule,
    same_base,
    spelled_alike,
    weight_notes,
    weighted_inputs,
)

WIDTH = {torch.float32: 3, torch.bfloat16: 2, torch.float16: 1}


def _unread(method, **given):
    """Notes for the options given that `method` does not read (said, not refused: a script may pass them to every
    method it tries)."""
    readers = {"density": USES_DENSITY, "seed": USES_SEED}
    return [
        f"{opt(name, bare=True)} was not used: {method} does not read it ({', '.join(readers[name])} do)"
        for name, value in given.items()
        if value is not None and method not in readers[name]
    ]


def _parent(path, adapter, **extra):
    return {"file": os.path.basename(path), "format": adapter.source_format, **extra}


@takes_options(CombineOptions, unpack=True)
def combine(adapters, output, *, method, rank, energy, density, seed, dtype, force, quiet):
    """Combine adapters (`path` or `path:weight`) in delta space. Returns the report; writes `output`.

    cat/linear are exact (rank = sum of ranks), or optimally truncated with rank/energy; svd truncates to `rank`
    (default: the largest input rank); ties, dare_linear, dare_ties, magnitude_prune act on the dense deltas.
    """
    combine_method = get_method(method, rank, energy)
    rank_rule(rank=rank, energy=energy)
    in_range("density", density, 0, 1, low_open=True)
    seed_in_range(seed)
    unread = _unread(method, density=density, seed=seed)
    density, seed = 0.5 if density is None else density, 0 if seed is None else seed
    inputs = weighted_inputs(adapters)
    if len(inputs) < 1:
        raise LorakitError("give at least one adapter")
    check_output(output, paths(inputs), force, directory=False)
    loaded = factors_only(load_inputs(inputs), "combine")
    loaded, spelled = _one_spelling(loaded, "combined")
    same_base(loaded)
    out_dtype = _combined_dtype(loaded, dtype)
    names = sorted({n for _, ad, _ in loaded for n in ad.modules}, key=natural_key)
    first = loaded[0][1]
    result = Adapter(
        base_model=first.base_model,
        base_fingerprint=first.base_fingerprint,
        base_identity=first.base_identity,
    )
    kw = dict(rank=rank, energy=energy, density=density, seed=seed)
    rows = _combine_modules(
        loaded, names, combine_method, out_dtype, result, kw, f"combine ({method})", quiet
    )
    _combine_full_tensors(loaded, result, out_dtype)
    result.provenance = {
        "operation": "combine",
        "parents": [_parent(p, ad, weight=w) for p, ad, w in loaded],
        "params": {
            "method": method,
            "rank": rank,
            "energy": energy,
            "density": density if method in USES_DENSITY else None,
            "seed": seed if method in USES_SEED else None,
        },
    }
    notes = unread + spelled + weight_notes(loaded) + result.save(output, force=force)
    return {
        "output": os.fspath(output),
        "adapters": [{"file": p, "weight": w} for p, _, w in loaded],
        "method": method,
        "module_count": len(rows),
        "modules": rows,
        "notes": notes,
        "rank": sum(r["rank"] for r in rows),
        "min_energy_kept": min((r["energy_kept"] for r in rows), default=1.0),
    }


def _one_spelling(loaded, verb):
    """(the inputs with every module under one name where they spell it otherwise, the notes saying so, `verb`
    what is done with them): each later input's modules renamed onto the first's names, and the first's onto each
    later one's (kohya's mangled names give way to dotted ones whichever comes first)."""
    (path, first, weight), rest, notes = loaded[0], [], []
    for p, ad, w in loaded[1:]:
        ad, said = spelled_alike(
            ad, first, f"{os.path.basename(p)}'s modules {verb} under the first input's names"
        )
        first, more = spelled_alike(
            first, ad, f"the first input's modules {verb} under {os.path.basename(p)}'s names"
        )
        rest.append((p, ad, w))
        notes += said + more
    return [(path, first, weight)] + rest, notes


def _combine_modules(loaded, names, combine_method, out_dtype, result, kw, desc, quiet):
    """Each module's combination added to `result`; returns the report rows."""
    rows = []
    for name in progress(names, quiet=quiet, desc=desc, unit="module"):
        entries = [(ad.modules.get(name), w) for _, ad, w in loaded]
        try:
            module, stats = algebra.combine_module(name, entries, combine_method, out_dtype, **kw)
        except LorakitError as e:
            raise LorakitError(str(e), path=", ".join(p for p, _, _ in loaded)) from None
        result.add(module)
        rows.append(stats)
    return rows


def _combined_dtype(loaded, dtype):
    """--dtype, or with keep the widest dtype of the inputs' factors."""
    if dtype != "keep":
        return user_dtype(dtype)
    factors = (m.A.dtype for _, ad, _ in loaded for m in ad.modules.values())
    return max(factors, key=lambda d: WIDTH.get(d, 0), default=torch.float32)


def _combine_full_tensors(loaded, result, out_dtype):
    """Replacements are taken as they are (one input each); full-tensor deltas add exactly, in fp32, rounded once."""
    for path, ad, w in loaded:
        for key, t in ad.replacements.items():
            if key in result.replacements:
                raise LorakitError(
                    "more than one input replaces this tensor: cannot combine full replacements",
                    path=path,
                    tensor=key,
                )
            result.replacements[key] = t
    sums = {}
    for _, ad, w in loaded:
        for key, t in ad.deltas.items():
            sums[key] = sums.get(key, 0) + t.float() * w
    result.deltas = {key: t.to(out_dtype) for key, t in sums.items()}


@takes_options(ResizeOptions, unpack=True)
def resize(
    adapter, output, *, rank, energy, sv_ratio, sv_fro, sv_cumulative, minimal, max_rank, dtype, force, quiet
):
    """Optimal per-module truncation (Eckart-Young), alpha rescaled to keep each module's scale. The sv_* rules keep
    the ranks sd-scripts' resize_lora keeps (one above the smallest rank meeting the rule); `minimal` keeps that
    smallest rank."""
    rule = one_rule(rank=rank, energy=energy, sv_ratio=sv_ratio, sv_fro=sv_fro, sv_cumulative=sv_cumulative)
    if not rule:
        raise LorakitError("give one of --rank, --energy, --sv-ratio, --sv-fro, --sv-cumulative")
    if minimal and not {"sv_ratio", "sv_fro", "sv_cumulative"} & set(rule):
        raise LorakitError("--minimal applies to --sv-ratio, --sv-fro and --sv-cumulative")
    rank_rule(rank=rank, energy=energy, max_rank=max_rank)
    in_range("sv_ratio", sv_ratio, 1)
    in_range("sv_fro", sv_fro, 0, 1, low_open=True)
    in_range("sv_cumulative", sv_cumulative, 0, 1, low_open=True)
    adapter = local(adapter, "adapter", quiet)
    check_output(output, paths([(adapter, 1)]), force, directory=False)
    adapter, ad = as_adapter(adapter)
    factors_only([(adapter, ad)], "resize")
    out_dtype = None if dtype == "keep" else user_dtype(dtype)
    result = Adapter(
        replacements=dict(ad.replacements),
        deltas=dict(ad.deltas),
        base_model=ad.base_model,
        base_fingerprint=ad.base_fingerprint,
        base_identity=ad.base_identity,
        user_metadata=dict(ad.user_metadata),
    )
    rows = []
    modules = sorted(ad.modules.values(), key=lambda m: natural_key(m.name))
    for m in progress(modules, quiet=quiet, desc="resize", unit="module"):
        module, stats = algebra.resize_module(m, dtype=out_dtype, max_rank=max_rank, minimal=minimal, **rule)
        result.add(module)
        rows.append(stats)
    result.provenance = {
        "operation": "resize",
        "parents": [_parent(adapter, ad)],
        "params": {**rule, "max_rank": max_rank, **({"minimal": True} if minimal else {})},
    }
    notes = result.save(output, force=force)
    if rows and all(r["rank"] == r["rank_in"] for r in rows):
        notes.append(
            "no module's rank changed: every one already meets the rule (the same deltas, refactored)"
        )
    return {
        "output": os.fspath(output),
        "modules": rows,
        "params_in": ad.num_params,
        "params": result.num_params,
        "input": os.fspath(adapter),
        "module_count": len(rows),
        "notes": notes,
    }


def diff(a, b, quiet=False):
    """Compare two adapters in delta space, module by module, from the factors."""
    a, b = local(a, "adapter", quiet), local(b, "adapter", quiet)
    (a, ad_a), (b, ad_b) = factors_only([as_adapter(a), as_adapter(b)], "diff")
    [(_, ad_a, _), (_, ad_b, _)], notes = _one_spelling([(a, ad_a, 1.0), (b, ad_b, 1.0)], "compared")
    rows = []
    for name in progress(
        sorted(set(ad_a.modules) | set(ad_b.modules), key=natural_key),
        quiet=quiet,
        desc="diff",
        unit="module",
    ):
        ma, mb = ad_a.modules.get(name), ad_b.modules.get(name)
        if ma is None or mb is None:
            rows.append(
                {
                    "module": name,
                    "present": "a" if ma else "b",
                    "rank_a": ma.rank if ma else None,
                    "rank_b": mb.rank if mb else None,
                    "norm_a": _norm(ma),
                    "norm_b": _norm(mb),
                }
            )
            continue
        if ma.shape != mb.shape:
            raise LorakitError(
                f"module has shape {list(ma.shape)} in {a} and {list(mb.shape)} in {b}", tensor=name
            )
        rows.append({"module": name, "present": "both", **algebra.compare_modules(ma, mb)})
    both = [r for r in rows if r["present"] == "both"]
    summary = {
        "both": len(both),
        "only_a": sum(r["present"] == "a" for r in rows),
        "only_b": sum(r["present"] == "b" for r in rows),
        "max_relative_diff": max((r["relative_diff"] for r in both), default=0.0),
        "mean_cosine": sum(r["cosine"] for r in both) / len(both) if both else 0.0,
        "identical_deltas": all(r["relative_diff"] < 1e-6 for r in both) and len(both) == len(rows),
    }
    return {
        "a": os.fspath(a),
        "b": os.fspath(b),
        "summary": summary,
        "module_count": len(rows),
        "modules": rows,
        "notes": notes,
    }


def _norm(m):
    if m is None:
        return None
    from ..core.linalg import frobenius_norm

    return frobenius_norm(*m.factors(torch.float64))
