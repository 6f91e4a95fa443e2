"""Human-readable text for command reports (compact tables). Pure string building: no torch, no IO."""

import re

from .naming import natural_key
from .quant import score

LISTED = 8  # modules a report lists by default (-v: every one)


def human_size(n):
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _fmt_num(x):
    return f"{x:g}" if isinstance(x, float) else str(x)


def _relative_size(m):
    """A spectrum row's size: ||dW|| / ||W|| where the base gave it, else ||dW||."""
    return m.get("relative_norm", m.get("norm", 0.0))


def inspect_text(r, verbose=True):
    lines = []
    echo = lines.append
    echo(f"file        {r['file']} ({human_size(r['file_size'])})")
    echo(f"format      {r['format']}" + (f" (spec {r['spec_version']})" if r["spec_version"] else ""))
    if r.get("peft_type") not in (None, "LORA"):
        echo(f"peft type   {r['peft_type']}")
    if r["base_model"] or r["base_fingerprint"]:
        fp = f" (fingerprint {r['base_fingerprint'][:19]}...)" if r["base_fingerprint"] else ""
        echo(f"base model  {r['base_model'] or '?'}{fp}")
    echo(
        f"modules     {r['module_count']}    params {r['params']:,}    dtypes "
        + ", ".join(f"{k} x{v}" for k, v in r["dtypes"].items())
    )
    echo(
        "rank/alpha  "
        + "; ".join(
            f"r={x['rank']} alpha={_fmt_num(x['alpha'])}: {x['module_count']} module(s)"
            for x in r["rank_alpha"]
        )
    )
    echo("targets")
    targets = [(t, _target_label(t)) for t in r["targets"]]
    width = max((len(label) for _, label in targets), default=0)
    for t, label in targets:
        echo(f"  {t['kind']:<9} {label:<{width}}   r={','.join(map(str, t['ranks']))}   ({t['pattern']})")
    if r.get("experts"):
        echo("experts")
    for x in r.get("experts", []):
        ranks = ",".join(map(str, x["ranks"]))
        echo(f"  {x['layer']}: {x['experts']} experts, r={ranks}, {' '.join(x['projections'])}")
    for name, shape in r["replacements"].items():
        echo(f"  replaced  {name} {shape}")
    for name, shape in r.get("deltas", {}).items():
        echo(f"  delta     {name} {shape}")
    for t in r.get("transforms", []):
        what = "rank-r change, exact as a LoRA with --base" if t["low_rank"] else "full-rank change of W"
        echo(f"  {t['kind']:<9} {t['module']}   W' = f(W): {what}")
    p = r["provenance"] or {}
    said = [f"{k} {p[k]}" for k in ("operation", "source_format", "tool", "created") if p.get(k)]
    if said:
        echo("provenance  " + ", ".join(said))
    for parent in p.get("parents", []):
        if isinstance(parent, dict):
            extra = ", ".join(f"{k} {v}" for k, v in parent.items() if k != "file")
            echo(f"  from      {parent.get('file', '?')}" + (f" ({extra})" if extra else ""))
    for k, v in r["metadata"].items():
        echo(f"metadata    {k} = {v if len(v) < 80 else v[:77] + '...'}")
    if "modules" in r:
        lines += _inspect_modules(r["modules"], verbose)
    notes = r.get("notes", [])
    lines += [f"note: {n}" for n in (notes if verbose else summarized_notes(notes))]
    return "\n".join(line.rstrip() for line in lines)


def _inspect_modules(modules, verbose):
    """inspect's module table: every module in natural order, or with a spectrum the LISTED largest (-v: all)."""
    lines = []
    spectral = "norm" in modules[0] if modules else False
    head = f"{'module':<48} {'kind':<9} {'rank':>4} {'alpha':>8} {'shape':<16}"
    if spectral:
        head += f" {'||dW||':>10} {'eff.rank':>8}  top singular values"
        if "relative_norm" in modules[0]:
            head += "   ||dW||/||W||"
    shown, said = shown_modules(modules, _relative_size, verbose or not spectral, "largest")
    lines += [*said, head]
    for m in shown:
        line = (
            f"{m['module']:<48} {m['kind']:<9} {m['rank']:>4} {_fmt_num(m['alpha']):>8} "
            f"{'x'.join(map(str, m['shape'])):<16}"
        )
        if spectral:
            sv = ", ".join(f"{s:.3g}" for s in m["singular_values"][:4])
            line += (
                f" {m['norm']:>10.4g} {m['effective_rank']:>8.2f}  [{sv}{', ...' if m['rank'] > 4 else ''}]"
            )
            if "relative_norm" in m:
                line += f"   {m['relative_norm']:.3e}"
        lines.append(line)
    return lines


def _target_label(t):
    """'q_proj x 30 layers' (a MoE's: 'w1 x 8 experts x 4 layers'), or the module's name alone."""
    if t.get("experts"):  # Mixture-of-Experts: E experts in each of the layers
        return f"{t['target']} x {t['experts']} experts x {t['count'] // t['experts']} layers"
    return f"{t['target']} x {t['count']} layers" if "*" in t["pattern"] else t["target"]


def validate_text(r):
    lines = []
    for f in r["files"]:
        status = "valid" if f["valid"] else ("unreadable" if not f["readable"] else "INVALID")
        if r.get("for") and f["readable"]:
            status = f"served exactly by {r['for']}:" if f["valid"] else f"NOT served exactly by {r['for']}:"
        scope = " (header only: no tensor data read)" if f.get("checked") == "header" and f["valid"] else ""
        if f.get("format") and f["valid"] and not r.get("for"):
            scope = f" ({f['note']})"
        lines.append(f"{status:<10} {f['file']}{scope}")
        if f.get("landing"):
            lines.append("  " + landing_line(f["landing"]))
        shown = {}
        for p in f["problems"]:
            shown[p["code"]] = shown.get(p["code"], 0) + 1
            if shown[p["code"]] <= PROBLEMS_SHOWN:
                where = f" {p['tensor']}:" if p["tensor"] else ""
                lines.append(f"  {p['code']} {p['rule']}{where} {p['message']}")
        hidden = {code: n - PROBLEMS_SHOWN for code, n in shown.items() if n > PROBLEMS_SHOWN}
        if hidden:
            more = ", ".join(f"{n} more {code}" for code, n in hidden.items())
            lines.append(f"  ... and {more} (--json lists every one)")
    return "\n".join(lines)


PROBLEMS_SHOWN = 8  # of each code, in the text report


def landing_line(landing):
    """'lands: 208 of 210 modules; 2 (3.1% of ||dW||) land nowhere; 12 renamed onto the base's names'"""
    line = f"lands: {landing['lands']} of {landing['modules']} modules"
    if landing["nowhere"]:
        line += f"; {landing['nowhere']} ({_pct(landing['nowhere_share'])} of ||dW||) land nowhere"
    if landing["renamed"]:
        line += f"; {len(landing['renamed'])} renamed onto the base's names"
    return line


def _pct(x):
    return f"{100 * x:.2f}%"


def shown_modules(rows, badness, verbose, worst):
    """(the rows a report lists, the line saying so when it is shortened): every one in natural order with -v or
    when they are few, else the LISTED worst by `badness` (largest first); `worst` says what they are worst at."""
    if verbose or len(rows) <= LISTED:
        return sorted(rows, key=lambda m: natural_key(m["module"])), []
    shown = sorted(rows, key=badness, reverse=True)[:LISTED]
    return shown, [f"  the {LISTED} {worst} of {len(rows)} modules (-v: every one):"]


def _energy_lost(m):
    return 1.0 - m["energy_kept"]


def combine_text(r, verbose=False):
    lines = [
        f"wrote {r['output']}: method {r['method']}, {len(r['modules'])} modules, total rank {r['rank']}, "
        f"min energy kept {_pct(r['min_energy_kept'])}"
    ]
    shown, said = shown_modules(r["modules"], _energy_lost, verbose, "that keep the least energy")
    lines += said
    for m in shown:
        lines.append(
            f"  {m['module']:<48} inputs {m['inputs']}  rank {m['rank_in']:>4} -> {m['rank']:<4} "
            f"kept {_pct(m['energy_kept'])}"
        )
    return "\n".join(lines + [f"note: {n}" for n in r["notes"]])


def resize_text(r, verbose=False):
    rows = r["modules"]
    ranks_in, ranks = sorted({m["rank_in"] for m in rows}), sorted({m["rank"] for m in rows})
    lines = [
        f"wrote {r['output']}: params {r['params_in']:,} -> {r['params']:,}, {len(rows)} modules, rank "
        f"{_span(ranks_in)} -> {_span(ranks)}, min energy kept {_pct(min((m['energy_kept'] for m in rows), default=1.0))}"
    ]
    shown, said = shown_modules(rows, _energy_lost, verbose, "that keep the least energy")
    lines += said + [f"  {'module':<48} {'rank':>11}  {'kept ||dW||^2':>13}  {'rel. error':>10}"]
    for m in shown:
        lines.append(
            f"  {m['module']:<48} {m['rank_in']:>4} -> {m['rank']:<4}  {_pct(m['energy_kept']):>13}  "
            f"{m['relative_error']:>10.3e}"
        )
    return "\n".join(lines + [f"note: {n}" for n in r["notes"]])


def _span(values):
    return "-" if not values else str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"


def _difference(m):
    """How different a module is in the two adapters: present in one only is the most."""
    return float("inf") if m["present"] != "both" else m["relative_diff"]


def diff_text(r, verbose=False):
    s = r["summary"]
    if not s["both"]:
        return "\n".join(
            [
                f"no module in common: {s['only_a']} only in A ({r['a']}), {s['only_b']} only in B ({r['b']}); "
                "nothing to compare"
            ]
            + [f"note: {n}" for n in r.get("notes", [])]
        )
    shown, said = shown_modules(r["modules"], _difference, verbose, "that differ most")
    lines = [
        f"{s['both']} modules in both, {s['only_a']} only in A, {s['only_b']} only in B; "
        f"max ||dA-dB||/||dA|| {s['max_relative_diff']:.3e}; mean cosine {s['mean_cosine']:.4f}"
        + ("; identical deltas" if s["identical_deltas"] else ""),
        *said,
        f"  {'module':<48} {'ranks':>9} {'||dA||':>10} {'||dB||':>10} {'rel.diff':>10} {'cosine':>7} "
        f"{'col.ovl':>7} {'row.ovl':>7}",
    ]
    for m in shown:
        if m["present"] != "both":
            lines.append(f"  {m['module']:<48} only in {m['present'].upper()}")
            continue
        lines.append(
            f"  {m['module']:<48} {m['rank_a']:>4}/{m['rank_b']:<4} {m['norm_a']:>10.4g} {m['norm_b']:>10.4g} "
            f"{m['relative_diff']:>10.3e} {m['cosine']:>7.4f} {m['column_overlap']:>7.4f} "
            f"{m['row_overlap']:>7.4f}"
        )
    return "\n".join(lines + [f"note: {n}" for n in r.get("notes", [])])


def extract_text(r, verbose=False):
    lines = [
        f"wrote {r['output']}: {len(r['modules'])} modules, mean energy kept {_pct(r['mean_energy_kept'])}; "
        f"{r['unchanged']} tensors unchanged"
    ]
    shown, said = shown_modules(r["modules"], _energy_lost, verbose, "that keep the least energy")
    lines += said
    for m in shown:
        lines.append(
            f"  {m['module']:<48} rank {m['rank']:<4} kept {_pct(m['energy_kept'])}  "
            f"rel. error {m['relative_error']:.3e}"
        )
    for key, label in (
        ("replaced", "stored whole (changed, not a matrix)"),
        ("not_targeted", "changed, not targeted"),
        ("only_in_tuned", "only in the tuned checkpoint"),
        ("only_in_base", "only in the base"),
        ("shape_changed", "shape changed, skipped"),
        ("not_float", "changed, not floating point"),
    ):
        if r[key]:
            lines.append(
                f"  {label}: {', '.join(r[key][:8])}"
                + (f" (+{len(r[key]) - 8} more)" if len(r[key]) > 8 else "")
            )
    return "\n".join(lines)


def merge_text(r, verbose=False):
    adapters = ", ".join(
        f"{a['file']}" + (f" x{a['weight']:g}" if a["weight"] != 1 else "") for a in r["adapters"]
    )
    head = (
        f"subtracted {adapters} from {r['base']}" if r["unmerge"] else f"merged {adapters} into {r['base']}"
    )
    where = r["output"] if r.get("published", True) else f"{r['output']} (not yet: see the part below)"
    lines = [
        f"{head}: {r['merged_count']} of {r['tensor_count']} tensors changed, "
        f"{r['bytes'] / 1e9:.2f} GB in {r['shard_count']} file(s) -> {where}"
    ]
    if r.get("files_resumed"):
        lines.append(
            f"resumed: {r['files_resumed']} file(s) done before kept, {r['files_written']} written now"
        )
    if not r.get("published", True):
        lines.append(
            f"part {r['part']}: {r['files_written']} file(s) written; the output appears when every part is done"
        )
    q = r.get("quantization")
    if q and q.get("kl") is not None:  # what users feel first: the merged model against the adapted one
        lines.append(
            f"model: KL(adapted || merged) {q['kl']:.3e} per token on {q['kl_tokens']} held-out calibration tokens "
            f"(no adapter {q['kl_no_adapter']:.3e}, the adapter at run time 0)"
        )
    if q and q["modules"]:
        lines += survival_lines(q, verbose)
    lines += [f"note: {n}" for n in r["notes"]]
    if "seconds" in r:  # last: the figures above are what the merge is about
        lines.append(
            f"written in {r['seconds']:.2f} s, {r['cpu_seconds']:.2f} CPU s, {r['workers']} worker(s)"
        )
    return "\n".join(lines)


def survival_lines(q, verbose):
    """The verdict first, the means, then the worst modules (all of them with -v, in natural order)."""
    v = q["verdict"]
    lines = [
        f"quantized merge ({q['format']}, strategy {q['strategy']}): the merged modules keep "
        f"{100 * v['effect_kept']:.0f}% of the adapter's effect (output error on probes {v['output_error']:.3f} "
        f"of ||dW x||; no adapter 1.000, the adapter at run time 0.000)",
        f"  means: output error {q['mean_probe_error_random']:.3f} (random inputs) / "
        f"{q['mean_probe_error_aligned']:.3f} (the adapter's inputs); retention {100 * q['mean_retention']:.1f}%, "
        f"noise {q['mean_noise']:.3f}, codes changed {100 * q['mean_codes_changed']:.2f}%",
    ]
    coherence = q.get("coherence")
    if coherence and coherence["bias_weight"] != 1:
        lines.append(
            f"  the adapter's modules share output directions across layers ({coherence['z']:.0f} standard errors "
            f"over chance: trained), so dropping it errs in step: auto weighed that {coherence['bias_weight']:g}x "
            "against unbiased rounding noise"
        )
    modules, said = shown_modules(q["modules"], score, verbose, "furthest from W + dW")
    lines += said
    lines.append(
        f"  {'module':<40} {'strategy':<10} {'||dW||/||W||':>12} {'retained':>9} {'noise':>8} {'changed':>8} "
        f"{'err rand':>9} {'err algn':>9}"
    )
    for m in modules:
        lines.append(
            f"  {m['module']:<40} {m['strategy']:<10} {m['relative_delta']:>12.2e} {100 * m['retention']:>8.1f}% "
            f"{m['noise']:>8.3f} {100 * m['codes_changed']:>7.2f}% {m['probe_error_random']:>9.3f} "
            f"{m['probe_error_aligned']:>9.3f}"
        )
    return lines


def convert_text(r, verbose=False):
    lines = [
        f"converted {r['input']} ({r['from']}) -> {r['output']} ({r['to']}): {r['module_count']} modules"
        + (f", {r['replacement_count']} full tensors" if r["replacement_count"] else "")
    ]
    lines += [f"note: {n}" for n in (r["notes"] if verbose else summarized_notes(r["notes"]))]
    return "\n".join(lines)


_PER_MODULE_NOTE = re.compile(r"([\w.*\[\]-]+): (.+)")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def summarized_notes(notes):
    """Per-module notes that say the same thing but for their numbers ('M: scale 0.1 stored as ...') become one line
    with their count and an example; -v / --json keep every one."""
    groups = {}
    for n in notes:
        m = _PER_MODULE_NOTE.fullmatch(n)
        key = _NUMBER.sub("#", m[2]) if m and "." in m[1] else n
        groups.setdefault(key, []).append(n)
    out = []
    for same in groups.values():
        if len(same) == 1:
            out.append(same[0])
        else:
            out.append(f"{len(same)} modules, e.g. {same[0]} (-v lists every one)")
    return out


def train_text(r):
    return (
        f"trained {r['module_count']} LoRA modules for {r['steps']} steps on {r['device']} ({r['processes']} "
        f"process(es), {r['compute_dtype']}): loss {r['first_loss']:.4f} -> {r['final_loss']:.4f}, held-out "
        f"{r['eval_loss_before']:.4f} -> {r['eval_loss']:.4f}, "
        f"{r['tokens_per_s']:.0f} tokens/s, peak {human_size(r['peak_memory'])}"
        + (f", base kept as {r['base_codes']['format']} codes" if r.get("base_codes") else "")
        + f" -> {r['output']}"
        + "".join(f"\nnote: {n}" for n in r.get("notes", []))
    )
