"""lorakit adapter spec v1 (spec/lorakit-adapter-v1.md): key grammar, metadata keys and the validation rules.

`check_file` returns every problem of a file; the lorakit reader refuses a file with any error, so validation and
loading can never disagree.
"""

import math
import re
from dataclasses import dataclass

from .core.adapter import KINDS, default_kind
from .errors import LorakitError
from .io import read_header
from .io.jsonio import parse_json
from .io.dtypes import FACTOR_DTYPES

SPEC_VERSION = "1.3"
EXPERTS = "experts"  # the module kind of E experts of one projection (since 1.3)
SPEC_MAJOR = 1

# Stable codes. Errors make a file invalid; warnings do not. The spec's table lists exactly these.
CODES = {
    "LK001": ("unreadable", "the path is missing, a directory or cannot be read"),
    "LK101": ("bad-header", "not a safetensors file: truncated, header length out of range, header not JSON"),
    "LK102": (
        "bad-offsets",
        "tensor data offsets past the end, overlapping, with gaps or not matching the shape",
    ),
    "LK103": ("bad-dtype", "a dtype the spec does not allow for this tensor"),
    "LK104": (
        "bad-metadata",
        "a lorakit.* metadata value that is not what the spec says (e.g. invalid JSON)",
    ),
    "LK107": (
        "duplicate-key",
        "a tensor name that appears twice in the header (only the first entry is read)",
    ),
    "LK105": ("missing-version", "no lorakit.spec_version metadata: not a lorakit adapter"),
    "LK106": ("unsupported-version", "a spec major version this reader does not implement"),
    "LK201": ("missing-pair", "lora_A without lora_B or the reverse, or a module tensor without its factors"),
    "LK202": ("missing-alpha", "a module without its alpha tensor"),
    "LK203": ("shape-mismatch", "factor shapes that do not fit the module kind (ndim, kernel, trailing 1s)"),
    "LK204": ("rank-mismatch", "lora_A.shape[0] differs from lora_B.shape[1]"),
    "LK205": ("zero-rank", "a module of rank 0"),
    "LK206": ("bad-alpha", "alpha not finite or not positive"),
    "LK207": ("alpha-not-scalar", "alpha not a 0-d F32 tensor"),
    "LK208": ("non-finite", "NaN or Inf in a tensor"),
    "LK209": ("unknown-key", "a tensor key outside the spec's grammar"),
    "LK210": ("bad-bias", "bias_delta whose shape is not [out]"),
    "LK211": ("bad-dora", "dora_magnitude without a valid dora_axis, or of the wrong length"),
    "LK212": (
        "bad-kind",
        "a module kind the spec does not define, or one that contradicts the factor shapes",
    ),
    "LK213": (
        "replacement-shape",
        "a replacement of a module's weight whose shape is not the module's weight shape",
    ),
    "LK214": (
        "bad-experts",
        "an experts module whose factors, alphas or name do not describe E experts of one projection",
    ),
    "LK401": (
        "peft-type-config",
        "an adapter_config.json value a PEFT adapter type needs is missing or invalid",
    ),
    "LK402": (
        "needs-base",
        "the adapter does not store what its deltas need (a layer shape, W itself): pass --base",
    ),
    "LK403": ("unsupported-type", "a PEFT adapter type (peft_type) lorakit does not read"),
    # serving (lorakit.serving): what an engine would drop, misread or refuse; `validate --for ENGINE`
    "LK501": ("rank-not-served", "a rank the engine does not serve"),
    "LK502": (
        "scales-differ",
        "per-module scales (rank_pattern / alpha_pattern) the engine's single alpha / r drops",
    ),
    "LK503": ("rslora-ignored", "use_rslora, which the engine reads as plain alpha / r"),
    "LK504": ("dora-refused", "DoRA magnitudes, which the engine refuses or ignores"),
    "LK505": ("full-weights-dropped", "modules_to_save / replaced or added full tensors the engine drops"),
    "LK506": ("bias-dropped", "lora_bias, which the engine drops"),
    "LK507": ("module-not-served", "a module the engine does not serve (lm_head)"),
    "LK508": ("not-lora", "a multiplicative adapter (IA3, HRA, OFT, BOFT): no engine serves it as a LoRA"),
    "LK509": ("wrong-format", "a file of a format the engine does not load"),
    "LK510": (
        "experts-missing",
        "a LoRA on some experts of a MoE layer: the engine loads one for every expert",
    ),
    "LK511": ("experts-not-served", "LoRAs on MoE experts, which the engine (at that version) does not load"),
    "LK512": ("pooled-inputs", "QA-LoRA's lora_A on inputs averaged in groups, which no engine does"),
    # landing on a base (`validate --base`, merge, convert --base): where each module goes in that base's tensors
    "LK601": ("lands-nowhere", "a module that matches no tensor of the base (the nearest base name given)"),
    "LK602": ("base-shape-mismatch", "a module whose base tensor has another shape"),
    "LK603": (
        "moved-base",
        "an initialisation that changed the base (PEFT's PiSSA, OLoRA, CorDA, LoRA-GA, LoftQ): needs --initial",
    ),
    "LK301": ("unknown-metadata", "warning: a lorakit.* metadata key this reader does not know (ignored)"),
    "LK302": ("newer-minor-version", "warning: a newer minor version; read as 1.0, unknown metadata ignored"),
    "LK303": (
        "base-copy-dropped",
        "warning (validate --for): PEFT's copy of a base weight beside its LoRA, which the engine drops",
    ),
    "LK304": (
        "reader-warning",
        "warning: what an adapter's own tool would do otherwise than its file says (PEFT not loading some modules)",
    ),
}

SUFFIXES = ("lora_A", "lora_B", "alpha", "bias_delta", "dora_magnitude")
REPLACEMENT = "replacement"  # "<base tensor name>.replacement": full-tensor replacement
DELTA = "delta"  # "<base tensor name>.delta": full tensor added to the base tensor (since 1.2)

META_VERSION = "lorakit.spec_version"
META_BASE = "lorakit.base_model"
META_FINGERPRINT = "lorakit.base_fingerprint"
META_IDENTITY = "lorakit.base_identity"  # since 1.1
META_PROVENANCE = "lorakit.provenance"
META_MODULES = "lorakit.modules"
KNOWN_META = (META_VERSION, META_BASE, META_FINGERPRINT, META_IDENTITY, META_PROVENANCE, META_MODULES)


@dataclass
class Problem:
    code: str
    message: str
    tensor: str = None

    @property
    def is_error(self):
        return not self.code.startswith("LK3")

    def as_dict(self):
        return {
            "code": self.code,
            "rule": CODES[self.code][0],
            "tensor": self.tensor,
            "message": self.message,
        }


@dataclass
class Layout:
    """Which keys of a file make up each module (parsed from names alone)."""

    modules: dict  # module name -> {suffix: key}
    replacements: dict  # base tensor name -> key
    deltas: dict  # base tensor name -> key
    unknown: list
    module_meta: dict  # module name -> {"kind": ..., "dora_axis": ...}


def parse_keys(names):
    modules, replacements, deltas, unknown = {}, {}, {}, []
    for key in names:
        stem, _, suffix = key.rpartition(".")
        if suffix in SUFFIXES and stem:
            modules.setdefault(stem, {})[suffix] = key
        elif suffix == REPLACEMENT and stem:
            replacements[stem] = key
        elif suffix == DELTA and stem:
            deltas[stem] = key
        else:
            unknown.append(key)
    return modules, replacements, deltas, unknown


def parse_version(text):
    """(major, minor) of a 'MAJOR.MINOR' string, or None."""
    try:
        major, minor = text.split(".")
        return int(major), int(minor)
    except (AttributeError, ValueError):
        return None


def check_file(path, values=True, bar=None, fail_fast=False):
    """All problems of a file against the spec. Raises LorakitError only when the path cannot be read at all. The
    header checks read no data; the value scan (`values`) streams the data, updating `bar` (a progress bar) with
    the bytes read, and with `fail_fast` stops at the first tensor holding a NaN/Inf."""
    found = []  # every defect of an entry, each with its code; a header that is not one at all raises
    try:
        header = read_header(path, problems=found)
    except LorakitError as e:
        if e.code is None:  # missing path or directory: not a validation result
            raise
        return [Problem(e.code, e.message, e.tensor)], None
    problems = [Problem(*p) for p in found]
    layout = check_header(header, problems)
    if values and layout is not None and not any(p.is_error for p in problems):
        if bar is not None:
            bar.reset(total=value_bytes(header))
        check_values(path, header, problems, bar, fail_fast)
    return problems, layout


def check_header(header, problems):
    """Append the header-level problems of a parsed header to `problems`; return the Layout."""
    meta, entries = header.metadata, header.entries
    add = lambda code, msg, tensor=None: problems.append(Problem(code, msg, tensor))  # noqa: E731
    version = meta.get(META_VERSION)
    if version is None:
        add("LK105", f"no '{META_VERSION}' in __metadata__: not a lorakit adapter")
    else:
        v = parse_version(version)
        if v is None:
            add("LK104", f"'{META_VERSION}' is '{version}', expected MAJOR.MINOR")
        elif v[0] != SPEC_MAJOR:
            add("LK106", f"spec version {version}; this reader implements {SPEC_MAJOR}.x")
            return None
        elif v[1] > int(SPEC_VERSION.split(".")[1]):
            add("LK302", f"spec version {version} is newer than {SPEC_VERSION}; reading it as {SPEC_VERSION}")
    for k in meta:
        if k.startswith("lorakit.") and k not in KNOWN_META:
            add("LK301", f"unknown metadata key '{k}' ignored")
    module_meta = {}
    for k in (META_PROVENANCE, META_MODULES):
        if k in meta:
            try:
                value = parse_json(meta[k], None, f"'{k}'")
            except LorakitError as e:
                add("LK104", f"'{k}' must be a JSON object ({e.message})")
                continue
            if k == META_MODULES:
                module_meta = {n: v for n, v in value.items() if isinstance(v, dict)}
                for name in (n for n, v in value.items() if not isinstance(v, dict)):
                    add(
                        "LK104",
                        f"'{k}' entry '{name}' must be a JSON object, not {type(value[name]).__name__}",
                    )
    for key in (META_FINGERPRINT, META_IDENTITY):
        if key in meta and not re.fullmatch(r"sha256:[0-9a-f]{64}", meta[key]):
            add("LK104", f"'{key}' must be 'sha256:<64 hex>'")

    modules, replacements, deltas, unknown = parse_keys(entries)
    for key in unknown:
        add(
            "LK209",
            "key is not '<module>.(lora_A|lora_B|alpha|bias_delta|dora_magnitude)' or "
            "'<tensor>.(replacement|delta)'",
            key,
        )
    for name, keys in modules.items():
        check_module(name, keys, entries, module_meta.get(name, {}), add)
    check_expert_names(modules, entries, module_meta, add)
    for name in module_meta:
        if name not in modules:
            add("LK201", f"'{META_MODULES}' describes module '{name}' that has no tensors")
    for name, key in replacements.items():
        module = modules.get(name[: -len(".weight")]) if name.endswith(".weight") else None
        if module and "lora_A" in module and "lora_B" in module:
            A, B = entries[module["lora_A"]], entries[module["lora_B"]]
            expected = (B.shape[0], *A.shape[1:])
            if entries[key].shape != expected:
                add(
                    "LK213",
                    f"replacement has shape {list(entries[key].shape)} but the module's factors make a "
                    f"weight of shape {list(expected)}",
                    key,
                )
    for key in (*replacements.values(), *deltas.values()):  # full tensors: factor dtypes
        if entries[key].dtype not in FACTOR_DTYPES:
            add("LK103", f"dtype {entries[key].dtype}, expected one of {', '.join(FACTOR_DTYPES)}", key)
    return Layout(modules, replacements, deltas, unknown, module_meta)


def check_module(name, keys, entries, info, add):
    a, b = keys.get("lora_A"), keys.get("lora_B")
    if a is None or b is None:
        have = ", ".join(sorted(keys))
        add(
            "LK201",
            f"module '{name}' has {have} but no {'lora_A' if a is None else 'lora_B'}",
            keys.get("lora_A") or keys.get("lora_B") or next(iter(keys.values())),
        )
        return
    A, B = entries[a], entries[b]
    for e in (A, B):
        if e.dtype not in FACTOR_DTYPES:
            add("LK103", f"dtype {e.dtype}, expected one of {', '.join(FACTOR_DTYPES)}", e.name)
    if info.get("kind") == EXPERTS:
        check_experts(name, keys, entries, add)
        return
    if "alpha" not in keys:
        add("LK202", f"module '{name}' has no '{name}.alpha'", a)
    else:
        al = entries[keys["alpha"]]
        if al.dtype != "F32" or al.shape != ():
            add("LK207", f"alpha is {al.dtype} of shape {list(al.shape)}, expected F32 of shape []", al.name)
    for e in (entries.get(keys.get("bias_delta")), entries.get(keys.get("dora_magnitude"))):
        if e is not None and e.dtype not in FACTOR_DTYPES:
            add("LK103", f"dtype {e.dtype}, expected one of {', '.join(FACTOR_DTYPES)}", e.name)
    shape = lambda part: tuple(entries[keys[part]].shape) if part in keys else None  # noqa: E731
    check_factors(
        shape("lora_A"),
        shape("lora_B"),
        info.get("kind"),
        shape("bias_delta"),
        shape("dora_magnitude"),
        info.get("dora_axis"),
        add,
        lambda part: keys.get(part, a),
    )


def check_factors(A, B, kind, bias, magnitude, dora_axis, add, tensor):
    """The shape rules of one module (LK203-LK205, LK210-LK212), from shapes alone: the one place both the file
    checks and the in-memory checks use. `tensor(part)` names the tensor a problem is reported on."""
    if len(A) < 2 or len(B) != len(A):
        add(
            "LK203",
            f"lora_A has shape {list(A)} and lora_B {list(B)}: both need the same ndim >= 2",
            tensor("lora_A"),
        )
        return
    if any(d != 1 for d in B[2:]):
        add("LK203", f"lora_B of a conv module must be [out, r, 1, ...], got {list(B)}", tensor("lora_B"))
    if A[0] != B[1]:
        add("LK204", f"lora_A has rank {A[0]} but lora_B has rank {B[1]}", tensor("lora_B"))
    if A[0] == 0:
        add("LK205", "rank 0", tensor("lora_A"))
    kind = kind or default_kind(len(A))
    if kind not in KINDS:
        add("LK212", f"kind '{kind}' is not one of {', '.join((*KINDS, EXPERTS))}", tensor("lora_A"))
    elif (kind == "conv") != (len(A) > 2):
        add("LK212", f"kind '{kind}' does not fit factors of ndim {len(A)}", tensor("lora_A"))
    weight = (B[0], *A[1:])
    if bias is not None and bias != (B[0],):
        add("LK210", f"bias_delta has shape {list(bias)}, expected [{B[0]}]", tensor("bias_delta"))
    if magnitude is not None:
        if isinstance(dora_axis, bool) or not isinstance(dora_axis, int) or not 0 <= dora_axis < len(weight):
            add(
                "LK211",
                f"dora_magnitude needs an integer 'dora_axis' in {META_MODULES} (0..{len(weight) - 1})",
                tensor("dora_magnitude"),
            )
        elif magnitude != (weight[dora_axis],):
            add(
                "LK211",
                f"dora_magnitude has shape {list(magnitude)}, expected [{weight[dora_axis]}] (axis "
                f"{dora_axis} of the weight {list(weight)})",
                tensor("dora_magnitude"),
            )


def check_experts(name, keys, entries, add):
    """An `experts` module (1.3): lora_A [E, r, in], lora_B [E, out, r], alpha [] or [E], a name with one '*' (where
    expert e's index goes), nothing else."""
    A, B = tuple(entries[keys["lora_A"]].shape), tuple(entries[keys["lora_B"]].shape)
    if name.count("*") != 1:
        add(
            "LK214",
            f"an experts module's name needs one '*' (where the expert index goes): '{name}'",
            keys["lora_A"],
        )
    if len(A) != 3 or len(B) != 3 or A[0] != B[0] or A[0] < 1:
        add(
            "LK214",
            f"lora_A {list(A)} and lora_B {list(B)} are not [E, r, in] and [E, out, r]",
            keys["lora_A"],
        )
        return
    if A[1] != B[2]:
        add("LK204", f"lora_A has rank {A[1]} but lora_B has rank {B[2]}", keys["lora_B"])
    if A[1] == 0:
        add("LK205", "rank 0", keys["lora_A"])
    if "alpha" not in keys:
        add("LK202", f"module '{name}' has no '{name}.alpha'", keys["lora_A"])
    elif entries[keys["alpha"]].dtype != "F32" or tuple(entries[keys["alpha"]].shape) not in ((), (A[0],)):
        al = entries[keys["alpha"]]
        add(
            "LK207",
            f"alpha is {al.dtype} of shape {list(al.shape)}, expected F32 of shape [] or [{A[0]}]",
            al.name,
        )
    for part in ("bias_delta", "dora_magnitude"):
        if part in keys:
            add("LK214", f"an experts module has no {part} (write its experts as linear modules)", keys[part])


def check_expert_names(modules, entries, meta, add):
    """The experts' module names of every `experts` module: none may be another module's name."""
    owner = {n: n for n, m in meta.items() if m.get("kind") != EXPERTS}
    owner.update({n: n for n in modules if meta.get(n, {}).get("kind") != EXPERTS})
    for name, info in meta.items():
        keys = modules.get(name, {})
        if info.get("kind") != EXPERTS or "lora_A" not in keys or name.count("*") != 1:
            continue
        for e in range(entries[keys["lora_A"]].shape[0] if entries[keys["lora_A"]].shape else 0):
            expert = name.replace("*", str(e))
            if expert in owner:
                add("LK214", f"expert {e} of '{name}' is also the module '{owner[expert]}'", keys["lora_A"])
                return
            owner[expert] = name


def value_bytes(header):
    """The bytes check_values reads: the floating tensors' data."""
    return sum(e.nbytes for e in header.entries.values() if e.dtype in ("F64", "F32", "F16", "BF16"))


def check_values(path, header, problems, bar=None, fail_fast=False):
    """NaN/Inf in any tensor, alpha finite and positive: needs the data, so it runs after the header checks. With
    numpy, chunk by chunk (no torch, bounded memory); bf16 by its bits (exponent all ones: Inf or NaN)."""
    import numpy as np

    chunk = 1 << 24
    # the alphas first: four bytes each, and with fail_fast a bad one ends the scan before the factors are read
    order = sorted(
        header.entries.items(), key=lambda kv: not (kv[0].endswith(".alpha") and len(kv[1].shape) <= 1)
    )
    with open(path, "rb") as f:
        for name, e in order:
            if e.dtype not in ("F64", "F32", "F16", "BF16"):
                continue
            np_dtype = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}[e.dtype]
            size = np.dtype(np_dtype).itemsize
            bad, first, low = 0, None, math.inf
            for start in range(0, e.numel, chunk):
                count = min(chunk, e.numel - start)
                f.seek(e.start + start * size)
                values = np.frombuffer(f.read(count * size), dtype=np_dtype)
                if bar is not None:
                    bar.update(count * size)
                if e.dtype == "BF16":
                    bad += int(((values & 0x7F80) == 0x7F80).sum())
                    values = (values.astype("<u4") << 16).view("<f4")
                else:
                    bad += int((~np.isfinite(values)).sum())
                first = float(values[0]) if first is None and len(values) else first
                low = min(low, float(values.min())) if len(values) else low
            if name.endswith(".alpha") and len(e.shape) <= 1:  # an experts module's alphas are [E]
                shown = first if e.shape == () else f"{low} at its lowest"
                if bad or first is None or not low > 0:
                    problems.append(Problem("LK206", f"alpha is {shown}, must be finite and > 0", name))
            elif bad:
                problems.append(Problem("LK208", f"{bad} NaN/Inf value(s)", name))
            if fail_fast and problems and problems[-1].is_error:
                return


IDENTITY_SAMPLE = 64


def identity(checkpoint):
    """Base identity (spec 1.1): sha256 over every stored tensor of a Checkpoint, sorted by name: the line
    'name<TAB>dtype<TAB>d0,d1,...<LF>', then the stored bytes at [0, 64), [n//2, n//2 + 64) and [n - 64, n), each cut
    to the tensor's n bytes. Unlike the fingerprint it sees the values (a fine-tune of the base differs) and the dtype
    (so does a bf16 copy of an fp32 base): a mismatch is a warning, not a refusal."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(checkpoint.where):
        file = checkpoint.shards[checkpoint.where[name]]
        e = file.header.entries[name]
        h.update(f"{name}\t{e.dtype}\t{','.join(str(d) for d in e.shape)}\n".encode())
        n = e.nbytes
        with open(file.path, "rb") as f:
            for start in (0, n // 2, max(0, n - IDENTITY_SAMPLE)):
                f.seek(e.start + start)
                h.update(f.read(min(IDENTITY_SAMPLE, n - start)))
    return "sha256:" + h.hexdigest()


def fingerprint(shapes):
    """Fingerprint of a base checkpoint: sha256 over its sorted 'name<TAB>d0,d1,...<LF>' lines (dtype-free)."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(shapes):
        h.update(f"{name}\t{','.join(str(d) for d in shapes[name])}\n".encode())
    return "sha256:" + h.hexdigest()


def check_adapter(adapter, values=True):
    """The spec's rules on an Adapter in memory (the same codes as check_file): what every reader must produce and
    every writer may write. values=False skips the NaN/Inf scan (header-only reads hold no values)."""
    problems = []
    add = lambda code, msg, tensor: problems.append(Problem(code, msg, tensor))  # noqa: E731
    if values:
        from .core.linalg import count_non_finite  # torch: only where there are values to scan
    for name, m in adapter.modules.items():
        A, B = m.A, m.B
        shape = lambda t: tuple(t.shape) if t is not None else None  # noqa: E731
        check_factors(
            shape(A), shape(B), m.kind, shape(m.bias), shape(m.magnitude), m.dora_axis, add, lambda part: name
        )
        if not math.isfinite(m.alpha) or m.alpha <= 0:
            add("LK206", f"alpha is {m.alpha}, must be finite and > 0", name)
        if values:  # named by the spec's keys, whatever the format read
            for part, t in (
                ("lora_A", A),
                ("lora_B", B),
                ("bias_delta", m.bias),
                ("dora_magnitude", m.magnitude),
            ):
                bad = count_non_finite(t) if t is not None else 0
                if bad:
                    add("LK208", f"{bad} NaN/Inf value(s)", f"{name}.{part}")
    for name, t in getattr(adapter, "transforms", {}).items():  # multiplicative modules (PEFT IA3, HRA, OFT)
        for part, tensor in t.tensors.items():
            bad = count_non_finite(tensor) if values else 0
            if bad:
                add("LK208", f"{bad} NaN/Inf value(s)", f"{name}.{part}")
    for suffix, tensors in ((REPLACEMENT, adapter.replacements), (DELTA, adapter.deltas)):
        for name, t in tensors.items():
            bad = count_non_finite(t) if values else 0
            if bad:
                add("LK208", f"{bad} NaN/Inf value(s)", f"{name}.{suffix}")
    return problems


def raise_first(problems, path):
    """Raise the first error of `problems` as a one-line LorakitError naming `path`."""
    errors = [p for p in problems if p.is_error]
    if errors:
        first = errors[0]
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise LorakitError(first.message + more, path=path, tensor=first.tensor, code=first.code)
