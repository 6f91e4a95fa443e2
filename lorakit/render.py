"""Human-readable text for command reports (compact tables). Pure string building: no torch, no IO."""


def _human_size(n):
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _fmt_num(x):
    return f"{x:g}" if isinstance(x, float) else str(x)


def inspect_text(r):
    lines = []
    echo = lines.append
    echo(f"file        {r['file']} ({_human_size(r['file_size'])})")
    echo(f"format      {r['format']}" + (f" (spec {r['spec_version']})" if r["spec_version"] else ""))
    if r["base_model"] or r["base_fingerprint"]:
        fp = f" (fingerprint {r['base_fingerprint'][:19]}...)" if r["base_fingerprint"] else ""
        echo(f"base model  {r['base_model'] or '?'}{fp}")
    echo(f"modules     {r['module_count']}    params {r['params']:,}    dtypes "
         + ", ".join(f"{k} x{v}" for k, v in r["dtypes"].items()))
    echo("rank/alpha  " + "; ".join(f"r={x['rank']} alpha={_fmt_num(x['alpha'])}: {x['modules']} module(s)"
                                    for x in r["rank_alpha"]))
    echo("targets")
    for t in r["targets"]:
        layers = f" x {t['count']} layers" if "*" in t["pattern"] else ""
        ranks = ",".join(map(str, t["ranks"]))
        echo(f"  {t['kind']:<9} {t['name']}{layers}   r={ranks}   ({t['pattern']})")
    for name, shape in r["replacements"].items():
        echo(f"  replaced  {name} {shape}")
    if r["provenance"]:
        p = r["provenance"]
        echo("provenance  " + ", ".join(f"{k}={p[k]}" for k in ("tool", "operation", "created") if k in p))
        for parent in p.get("parents", []):
            echo(f"  parent    {parent}")
    for k, v in r["metadata"].items():
        echo(f"metadata    {k} = {v if len(v) < 80 else v[:77] + '...'}")
    if "modules" in r:
        spectral = "norm" in r["modules"][0] if r["modules"] else False
        head = f"{'module':<48} {'kind':<9} {'rank':>4} {'alpha':>8} {'shape':<16}"
        if spectral:
            head += f" {'||dW||':>10} {'eff.rank':>8}  top singular values"
            if "relative_norm" in r["modules"][0]:
                head += "   ||dW||/||W||"
        echo(head)
        for m in r["modules"]:
            line = (f"{m['name']:<48} {m['kind']:<9} {m['rank']:>4} {_fmt_num(m['alpha']):>8} "
                    f"{'x'.join(map(str, m['shape'])):<16}")
            if spectral:
                sv = ", ".join(f"{s:.3g}" for s in m["singular_values"][:4])
                line += f" {m['norm']:>10.4g} {m['effective_rank']:>8.2f}  [{sv}{', ...' if m['rank'] > 4 else ''}]"
                if "relative_norm" in m:
                    line += f"   {m['relative_norm']:.3e}"
            echo(line)
    return "\n".join(lines)


def validate_text(r):
    lines = []
    for f in r["files"]:
        status = "valid" if f["valid"] else ("unreadable" if not f["readable"] else "INVALID")
        lines.append(f"{status:<10} {f['file']}")
        for p in f["problems"]:
            where = f" {p['tensor']}:" if p["tensor"] else ""
            lines.append(f"  {p['code']} {p['rule']}{where} {p['message']}")
    return "\n".join(lines)
