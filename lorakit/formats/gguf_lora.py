"""llama.cpp GGUF LoRA adapters (Llama family), through the `gguf` package (optional extra: pip install gguf).

Facts (llama.cpp convert_lora_to_gguf.py, src/llama-adapter.cpp): KVs general.type = "adapter",
general.architecture = the base's, adapter.type = "lora", adapter.lora.alpha (f32, one for the file); tensors
`<gguf base tensor name>.lora_a` (numpy shape [r, in]) and `.lora_b` ([out, r]); scale = alpha / r. token_embd is
flipped: lora_a [n_vocab, r], lora_b [n_embd, r]. Llama's Q and K rows are permuted for rotary embeddings in GGUF
(convert_hf_to_gguf's permute), so lora_b of attn_q / attn_k is permuted the same way.
"""

import numbers
import numpy as np
import torch

from ..core import Adapter, Module
from ..errors import LorakitError, opt
from ..io import atomic_output
from .common import checked_base_copies, fold_note, most_common, refuse_deltas, refuse_unknown
from ..naming.llama_cpp import (
    HEADS_KEY,
    KV_HEADS_KEY,
    expert_module,
    expert_of,
    from_gguf_name,
    gguf_base_fields,
    permute,
    to_gguf_name,
    unpermute,
)


def _gguf():
    try:
        import gguf
    except ImportError:
        raise LorakitError("GGUF needs the gguf package: pip install gguf (or lorakit[interop])") from None
    return gguf


def _base_config(base, recorded=None):
    """The base's config.json (`base`: an opened base, or None), else that of the folder the adapter records as its
    base_model (as llama.cpp's converter does), or None."""
    from ..io import read_config

    if base is not None and base.config is not None:
        return base.config
    return read_config(recorded) if recorded else None


def _heads(config, arch_fields=None, base_fields=None):
    """(n_head, n_head_kv) from the file's own KVs, else from a GGUF base's (gguf_base_fields), else from the base's
    config.json."""
    if arch_fields and arch_fields[0]:
        return arch_fields
    if base_fields is not None and base_fields[1]:
        return base_fields[1:]
    if config is not None:
        return config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    return None, None


def _arch(config):
    """llama.cpp's architecture: Mistral converts as llama; Qwen2 as qwen2 (whose Q/K rows are not permuted)."""
    return "qwen2" if config and config.get("model_type") == "qwen2" else "llama"


def detect(probe):
    return probe.magic(4) == b"GGUF"


def _field(reader, key):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def read(path, base=None, allow_unknown=False, unpermute_qk=True):
    """`unpermute_qk=False` keeps Q/K rows in llama.cpp's order (no head counts needed): for statistics a row order
    does not change (inspect: ranks, shapes, singular values, norms)."""
    from ..io.gguf import GGUFHeader

    GGUFHeader(path)  # lorakit's strict reader first: counts, sizes and offsets checked against the file size
    gguf = _gguf()
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the package raises plain ValueError / struct errors on corrupt files
        raise LorakitError(f"not a readable GGUF file ({e})", path=path) from None
    if _field(reader, "general.type") != "adapter" or _field(reader, "adapter.type") != "lora":
        raise LorakitError("GGUF file is not a LoRA adapter (general.type / adapter.type)", path=path)
    arch = _field(reader, "general.architecture")
    alpha = _field(reader, "adapter.lora.alpha")
    if isinstance(alpha, bool) or not (alpha is None or isinstance(alpha, numbers.Real)):
        raise LorakitError(f"adapter.lora.alpha is {alpha!r}: not a number", path=path)
    if alpha is None or not alpha > 0:
        raise LorakitError(f"adapter.lora.alpha is {alpha}: the scale alpha / rank is undefined", path=path)
    heads = _heads(
        _base_config(base),
        (_field(reader, HEADS_KEY.format(arch=arch)), _field(reader, KV_HEADS_KEY.format(arch=arch))),
        gguf_base_fields((base.kv if base is not None else None))
        if _field(reader, HEADS_KEY.format(arch=arch)) is None
        else None,
    )
    pairs, unknown = {}, []
    for t in reader.tensors:
        stem, _, part = t.name.rpartition(".")
        if part in ("lora_a", "lora_b"):
            pairs.setdefault(stem.removesuffix(".weight"), {})[part] = _array(gguf, t)
        else:
            unknown.append(t.name)
    notes = []
    refuse_unknown(path, unknown, allow_unknown, notes, what="tensors")
    ad = Adapter(
        source_format="gguf", notes=notes, provenance={"source_format": "gguf", "architecture": arch}
    )
    mixtral = base is not None and base.model_type == "mixtral"
    for gname, p in sorted(pairs.items()):
        if set(p) != {"lora_a", "lora_b"}:
            raise LorakitError(f"has {' and '.join(p)} only (wrong pairing)", path=path, tensor=gname)
        if p["lora_a"].dim() == 3 or p["lora_b"].dim() == 3:
            for m in expert_modules(gname, p["lora_a"], p["lora_b"], alpha, mixtral, path):
                ad.add(m)
            continue
        module = from_gguf_name(gname)
        if module is None:
            raise LorakitError("not a Llama-family tensor name", path=path, tensor=gname)
        a, b = p["lora_a"], p["lora_b"]
        if gname == "token_embd":  # flipped: a [vocab, r], b [embd, r]; dW [vocab, embd] = a @ b^T
            B, A, kind = a, b.T.contiguous(), "embedding"
        else:
            A, B, kind = a, b, "linear"
        if A.shape[0] != B.shape[1]:
            raise LorakitError(
                f"lora_a rank {A.shape[0]} != lora_b rank {B.shape[1]}", path=path, tensor=gname
            )
        if gname.endswith(("attn_q", "attn_k")) and arch != "qwen2" and unpermute_qk:
            n_head, n_kv = heads
            if n_head is None:
                raise LorakitError(
                    f"undoing llama.cpp's Q/K row permutation needs the head counts: pass {opt('base')} "
                    "(a folder with config.json)",
                    path=path,
                    tensor=gname,
                )
            B = unpermute(B, n_head, n_kv if gname.endswith("attn_k") else None).contiguous()
        ad.add(Module(module, A, B, alpha=alpha, kind=kind))
    return ad


def expert_modules(stem, a, b, alpha, mixtral, path):
    """The per-expert modules of a 3-D expert LoRA (lora_a [E, r, in], lora_b [E, out, r]); experts whose factors
    are all zero (no LoRA: how llama.cpp files hold the others) are left out."""
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[1] != b.shape[2]:
        raise LorakitError(
            f"3-D expert LoRA: lora_a {list(a.shape)} and lora_b {list(b.shape)} are not [E, r, in] and "
            "[E, out, r] of one E and r",
            path=path,
            tensor=stem,
        )
    out = []
    for e in range(a.shape[0]):
        name = expert_module(stem, e, mixtral)
        if name is None:
            raise LorakitError(
                "a 3-D LoRA tensor that is no expert tensor (blk.N.ffn_*_exps)", path=path, tensor=stem
            )
        if bool((b[e] != 0).any()) and bool((a[e] != 0).any()):
            out.append(Module(name, a[e].contiguous(), b[e].contiguous(), alpha=alpha))
    return out


def _array(gguf, t):
    kind = gguf.GGMLQuantizationType
    shape = [int(d) for d in reversed(list(t.shape))]
    if t.tensor_type == kind.F32:
        return torch.from_numpy(np.array(t.data, dtype=np.float32)).reshape(shape)
    if t.tensor_type == kind.F16:
        return torch.from_numpy(np.array(t.data, dtype=np.float16)).reshape(shape)
    if t.tensor_type == kind.BF16:
        raw = np.array(t.data).view(np.uint16).reshape(shape)
        return torch.from_numpy(raw.astype(np.int16)).view(torch.bfloat16)
    if t.tensor_type == kind.Q8_0:  # convert_lora_to_gguf.py --outtype q8_0
        from gguf.quants import dequantize

        return torch.from_numpy(
            np.ascontiguousarray(dequantize(np.array(t.data), t.tensor_type), dtype=np.float32)
        ).reshape(shape)
    raise LorakitError(
        f"LoRA tensor of GGML type {t.tensor_type.name}: only F32, F16, BF16 and Q8_0 are read", tensor=t.name
    )


def _base_copies_skipped(adapter, base, path):
    """PEFT's copies of base weights beside their LoRA are skipped, as llama.cpp's converter skips them (checked
    against the base when given); any other replacement is refused."""
    copies = adapter.base_copies
    others = [n for n in adapter.replacements if n not in copies]
    if others:
        raise LorakitError(
            f"llama.cpp LoRA holds only A and B: no full-tensor replacements ({others[0]})", path=path
        )
    return checked_base_copies(adapter, copies, base, path, "llama.cpp LoRA")


def expert_tensors(mods, alpha, base, path, notes):
    """[(name, tensor)] of llama.cpp's 3-D expert LoRA tensors: per layer and projection, `blk.N.ffn_gate_exps`
    `.lora_a` [E, r, in] and `.lora_b` [E, out, r] (ggml ne {in, r, E}, {r, out, E}), as build_lora_mm_id applies
    them. Every expert gets the file's scale alpha / r: ranks padded with zeros to the largest and each expert's own
    scale folded into its B (exact: zero factors add nothing); experts without a LoRA are zero."""
    groups = {}
    for m in mods:
        where = expert_of(m.name)
        if where is not None:
            groups.setdefault(where[0], {})[where[1]] = m
    count = _expert_count(base)
    tensors = []
    for stem, experts in sorted(groups.items()):
        E = max(count or 0, max(experts) + 1)
        r = max(m.rank for m in experts.values())
        first = next(iter(experts.values()))
        (out, inn), dtype = first.shape, first.A.dtype
        a, b = torch.zeros(E, r, inn, dtype=dtype), torch.zeros(E, out, r, dtype=dtype)
        for e, m in experts.items():
            if m.shape != (out, inn):
                raise LorakitError(
                    f"expert {e} is {list(m.shape)}, expert {next(iter(experts))} {[out, inn]}",
                    path=path,
                    tensor=m.name,
                )
            a[e, : m.rank] = m.A
            b[e, :, : m.rank] = (m.B.float() * (m.scale * r / alpha)).to(dtype)
        tensors += [(f"{stem}.weight.lora_a", a), (f"{stem}.weight.lora_b", b)]
        notes.append(
            f"{stem}: {len(experts)} of {E} experts' LoRAs as llama.cpp's 3-D expert tensors (rank {r})"
        )
    return tensors


def _expert_count(base):
    """The base's experts per layer (a GGUF's {arch}.expert_count, config.json's num_experts / num_local_experts),
    None when unknown (then the highest expert index with a LoRA decides)."""
    if base is None:
        return None
    kv, config = base.kv or {}, base.config or {}
    count = kv.get(f"{kv.get('general.architecture')}.expert_count")
    count = count or config.get("num_experts") or config.get("num_local_experts")
    return count if isinstance(count, int) and not isinstance(count, bool) and count > 0 else None


def write(adapter, path, force=False, base=None):
    gguf = _gguf()
    mods = list(adapter.modules.values())
    refuse_deltas(adapter, "llama.cpp LoRA", path)
    notes = list(_base_copies_skipped(adapter, base, path))
    if any(m.bias is not None or m.magnitude is not None for m in mods):
        raise LorakitError(
            "llama.cpp LoRA holds only A and B: no bias deltas, DoRA magnitudes or replacements", path=path
        )
    config = _base_config(base, adapter.base_model)
    fields = gguf_base_fields((base.kv if base is not None else None))
    arch = adapter.provenance.get("architecture") or (fields[0] if fields else None) or _arch(config)
    alpha = most_common([m.alpha for m in mods])
    n_head, n_kv = _heads(config, base_fields=fields)
    folded = []
    tensors, mods = (
        expert_tensors(mods, alpha, base, path, notes),
        [m for m in mods if expert_of(m.name) is None],
    )
    for m in mods:
        gname = to_gguf_name(m.name)
        B, A = m.B, m.A
        if m.alpha != alpha:  # one alpha per file: fold this module's scale into B (within 1 ulp)
            B = (B.float() * (m.scale * m.rank / alpha)).to(B.dtype)
            folded.append(m.name)
        if gname.endswith(("attn_q", "attn_k")) and arch == "llama":
            if n_head is None:
                raise LorakitError(
                    f"llama.cpp permutes Q/K rows: pass {opt('base')} (a folder with config.json) for the "
                    "head counts",
                    path=path,
                    tensor=m.name,
                )
            B = permute(B, n_head, n_kv if gname.endswith("attn_k") else None)
        a, b = (B, A.T) if m.kind == "embedding" else (A, B)
        tensors.append((f"{gname}.weight.lora_a", a))
        tensors.append((f"{gname}.weight.lora_b", b))
    if folded:
        fold_note(notes, f"{len(folded)} module(s) with alpha != {alpha}")
    with atomic_output(path, force=force) as tmp:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_type("adapter")
        w.add_string("adapter.type", "lora")
        w.add_float32("adapter.lora.alpha", float(alpha))
        if n_head is not None:
            w.add_uint32(HEADS_KEY.format(arch=arch), int(n_head))
            w.add_uint32(KV_HEADS_KEY.format(arch=arch), int(n_kv))
        for name, t in tensors:
            t = t.contiguous()
            if t.dtype == torch.bfloat16:
                w.add_tensor(
                    name,
                    t.view(torch.int16).numpy().view(np.uint16),
                    raw_dtype=gguf.GGMLQuantizationType.BF16,
                )
            else:
                w.add_tensor(
                    name, t.numpy() if t.dtype in (torch.float32, torch.float16) else t.float().numpy()
                )
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return notes
