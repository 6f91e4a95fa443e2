"""PEFT adapter types other than LoRA (`peft_type` in adapter_config.json), read as exact LoRA modules.

Facts (huggingface/peft tuners/<type>/layer.py, model.py; checked against PEFT's own merge in the tests):
- AdaLoRA: `lora_A [r, in]`, `lora_E [r, 1]`, `lora_B [out, r]` (no `.weight`); dW = B @ (A * E) * s / (ranknum +
  1e-5), s = lora_alpha (init_r when it is 0), ranknum = init_r (not saved). Pruned ranks have E = 0 (or were cut
  from the saved tensors by rank_pattern): the LoRA keeps the others, exactly.
- VeRA: shared `base_model.vera_A [r, max_in]`, `vera_B [max_out, r]` (saved with save_projection, else drawn again
  from projection_prng_key: kaiming-uniform with a CPU generator, A first), per module `vera_lambda_b [out]`,
  `vera_lambda_d [r]`: dW = (b * B[:out]) @ (d * A[:, :in]), rank r, scale 1.
- LoHa / LoKr: LyCORIS's tensors under PEFT's names, scale alpha / r (rank_pattern / alpha_pattern per module, and for
  LoKr alpha / r even when no factor is decomposed): exact LoRA of rank r1 r2 (lorakit.core.lycoris).
- DeLoRA: `delora_A [r, in]`, `delora_B [out, r]`, `delora_lambda [1]`, `delora_w_norm [in]` (saved): dW =
  B diag(lambda / r / (max(||A_i||, 1e-4) max(||B^i||, 1e-4))) A diag(w_norm): rank r.
- MiSS: `miss_block [r, out]` (`[r, mini_r]` tiled along out for init_weights "mini") added to every r-column block
  of W (the columns past the last whole block get its first rows): dW = block^T @ [I_r I_r ...], rank r. The "bat"
  form multiplies W and is refused.
- FourierFT: `fourierft_spectrum [n]` at the n positions randperm(out * in, seed random_loc_seed)[:n]; dW =
  Re(ifft2(dense spectrum)) * scaling: a sum of n rank-2 cosine/sine terms, so an exact LoRA of rank <= 2n.
"""

import math

import torch

from ..core import Adapter, Module
from ..core.multiplicative import Transform
from ..errors import LorakitError, opt
from .common import refuse_unknown
from .peft_config import pattern_value

PREFIX = "base_model.model."
# peft_type -> the per-module tensors it saves (the ending of each key)
PARAMS = {
    "ADALORA": ("lora_A", "lora_B", "lora_E"),
    "VERA": ("vera_lambda_b", "vera_lambda_d"),
    "LOHA": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "LOKR": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
    "FOURIERFT": ("fourierft_spectrum",),
    "DELORA": ("delora_A", "delora_B", "delora_lambda", "delora_w_norm"),
    "MISS": ("miss_block",),
    "IA3": ("ia3_l",),
    "HRA": ("hra_u",),
    "OFT": ("oft_R",),
    "BOFT": ("boft_R", "boft_s"),
}
SHARED = {"VERA": ("vera_A", "vera_B")}
# types that change W multiplicatively (read as core.multiplicative.Transform: merged exactly, converted to a
# LoRA only against a base)
MULTIPLICATIVE = ("IA3", "HRA", "OFT", "BOFT")


def read(tensors, config, path, base=None, allow_unknown=False):
    """An Adapter of exact LoRA modules from a PEFT folder of another type."""
    kind = config.get("peft_type")
    if kind not in PARAMS:
        raise LorakitError(_unsupported(kind), path=path, code="LK403")
    if config.get("fan_in_fan_out"):
        raise LorakitError(f"{kind} with fan_in_fan_out (GPT-2 Conv1D) is not supported", path=path)
    modules, shared, unknown = _grouped(tensors, kind)
    ad = Adapter(provenance={"peft_type": kind})
    refuse_unknown(path, unknown, allow_unknown, ad.notes)
    shapes = base.shapes() if base is not None else None
    build = BUILDERS[kind]
    for name, parts in sorted(modules.items()):
        try:
            module = build(name, parts, config, shared, shapes, modules, ad.notes)
        except LorakitError as e:
            raise LorakitError(e.message, path=path, tensor=e.tensor or name, code=e.code) from None
        if isinstance(module, Transform):
            ad.transforms[name] = module
        elif module is not None:
            ad.add(module)
    what = "multiplicative transform" if kind in MULTIPLICATIVE else "exact LoRA"
    ad.notes.append(f"PEFT {kind} read as {what}: {len(ad.modules) + len(ad.transforms)} module(s)")
    return ad


def _unsupported(kind):
    return (
        f"peft_type {kind} is not supported (lorakit reads LORA, {', '.join(PARAMS)}); the nearest path: "
        "PEFT's save_as_lora / convert_to_lora, then lorakit"
    )


def _grouped(tensors, kind):
    """({module: {param: tensor}}, {shared name: tensor}, [unknown keys])."""
    params = sorted(PARAMS[kind], key=len, reverse=True)
    modules, shared, unknown = {}, {}, []
    for key, t in tensors.items():
        name = key.removeprefix(PREFIX).removesuffix(".weight")
        if key.removeprefix("base_model.") in SHARED.get(kind, ()):
            shared[key.removeprefix("base_model.")] = t
            continue
        param = next((p for p in params if name.endswith("." + p)), None)
        if param is None:
            unknown.append(key)
        else:
            modules.setdefault(name[: -len(param) - 1], {})[param] = t
    return modules, shared, unknown


def _need(parts, names, what):
    missing = [n for n in names if n not in parts]
    if missing:
        raise LorakitError(f"{what} without {', '.join(missing)}", code="LK201")


def _base_shape(name, shapes, kind):
    if shapes is None:
        raise LorakitError(f"{kind} does not store the layer's shape: pass {opt('base')}", code="LK402")
    shape = shapes.get(f"{name}.weight")
    if shape is None:
        raise LorakitError("not in the base", tensor=f"{name}.weight")
    return tuple(shape)


def _positive_int(config, key, default=None):
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LorakitError(
            f"adapter_config.json '{key}' must be a positive integer, got {value!r}", code="LK401"
        )
    return value


def adalora(name, parts, config, shared, shapes, modules, notes):
    _need(parts, ("lora_A", "lora_B", "lora_E"), "AdaLoRA")
    A, B, E = parts["lora_A"], parts["lora_B"], parts["lora_E"]
    r = A.shape[0]
    if A.ndim != 2 or B.ndim != 2 or B.shape[1] != r or tuple(E.shape) != (r, 1):
        shapes_ = ", ".join(f"{k} {list(parts[k].shape)}" for k in ("lora_A", "lora_E", "lora_B"))
        raise LorakitError(f"AdaLoRA factors do not fit: {shapes_}", code="LK203")
    ranknum = _positive_int(config, "init_r", 12)
    alpha = config.get("lora_alpha") or ranknum
    keep = E.flatten() != 0  # a pruned rank contributes nothing: the LoRA of the kept ones is exact
    if not keep.any():
        notes.append(f"{name}: every AdaLoRA rank is pruned (lora_E = 0): no delta")
        return None
    scale = float(alpha) / (ranknum + 1e-5)
    A = (A.double() * E.double())[keep].to(A.dtype).contiguous()
    k = int(keep.sum())
    return Module(name, A, B[:, keep].contiguous(), alpha=scale * k)


def vera(name, parts, config, shared, shapes, modules, notes):
    _need(parts, ("vera_lambda_b", "vera_lambda_d"), "VeRA")
    b, d = parts["vera_lambda_b"].flatten(), parts["vera_lambda_d"].flatten()
    out, inp = _base_shape(name, shapes, "VeRA")[:2]
    A_shared, B_shared = _vera_projections(config, shared, shapes, modules, d.numel())
    if b.numel() != out or A_shared.shape[1] < inp or B_shared.shape[0] < out:
        raise LorakitError(
            f"VeRA vectors do not fit the layer [{out}, {inp}]: lambda_b {b.numel()}, projections "
            f"A {list(A_shared.shape)}, B {list(B_shared.shape)}"
        )
    A = d.double()[:, None] * A_shared[:, :inp].double()
    B = b.double()[:, None] * B_shared[:out].double()
    return Module(name, A.to(b.dtype).contiguous(), B.to(b.dtype).contiguous(), alpha=float(d.numel()))


def _vera_projections(config, shared, shapes, modules, r):
    """The shared vera_A, vera_B: as saved, or drawn again as PEFT draws them (from projection_prng_key, sized by the
    largest targeted layer)."""
    if "vera_A" in shared and "vera_B" in shared:
        A, B = shared["vera_A"], shared["vera_B"]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != r or B.shape[1] != r:
            raise LorakitError(f"VeRA projections A {list(A.shape)}, B {list(B.shape)} are not of rank {r}")
        return A, B
    if "projection_prng_key" not in config:
        raise LorakitError(
            "VeRA without saved projections (vera_A, vera_B) and without projection_prng_key", code="LK401"
        )
    if shapes is None:
        raise LorakitError(
            f"VeRA without saved projections: pass {opt('base')} (their size is the largest layer's)"
        )
    dims = [_base_shape(n, shapes, "VeRA") for n in modules]
    out, inp = max(s[0] for s in dims), max(s[1] for s in dims)
    g = torch.Generator(device="cpu").manual_seed(int(config["projection_prng_key"]))
    return _kaiming_uniform((r, inp), g), _kaiming_uniform((out, r), g)


def _kaiming_uniform(shape, generator):
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])  # PEFT's _kaiming_init: fan_in, gain sqrt(2)
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def lycoris(name, parts, config, shared, shapes, modules, notes):
    """LoHa / LoKr: LyCORIS's exact factors (the kohya reader's), at PEFT's scale alpha / r."""
    from .kohya import build_module  # the LyCORIS math lives with its reader

    weight_shape = tuple(shapes[f"{name}.weight"]) if shapes and f"{name}.weight" in shapes else None
    m = build_module(None, name, name, set(parts), parts.get, weight_shape, False, notes)
    r = pattern_value(config.get("rank_pattern"), name, config.get("r"))
    alpha = pattern_value(config.get("alpha_pattern"), name, config.get("alpha"))
    if isinstance(r, bool) or not isinstance(r, int) or r < 1 or not isinstance(alpha, (int, float)):
        raise LorakitError(
            f"{config.get('peft_type')} needs r (a positive integer) and alpha, got {r!r}, {alpha!r}"
        )
    m.alpha = float(alpha) / r * m.rank  # build_module gave scale 1: no alpha tensor
    return m


def fourierft(name, parts, config, shared, shapes, modules, notes):
    spectrum = parts["fourierft_spectrum"].flatten().double()
    out, inp = _base_shape(name, shapes, "FourierFT")[:2]
    n = spectrum.numel()
    if not 0 < n <= out * inp:
        raise LorakitError(f"FourierFT has {n} frequencies for a [{out}, {inp}] layer")
    seed = int(config.get("random_loc_seed", 777))
    idx = torch.randperm(out * inp, generator=torch.Generator().manual_seed(seed))[:n]
    rows, cols = (idx // inp).double(), (idx % inp).double()
    a = 2 * math.pi * torch.arange(out, dtype=torch.float64)[:, None] * rows[None, :] / out  # [out, n]
    b = 2 * math.pi * torch.arange(inp, dtype=torch.float64)[None, :] * cols[:, None] / inp  # [n, in]
    s = spectrum * float(config.get("scaling", 150.0)) / (out * inp)
    B = torch.cat([a.cos() * s, -a.sin() * s], dim=1)  # Re(e^{ia} e^{ib}) = cos a cos b - sin a sin b
    A = torch.cat([b.cos(), b.sin()], dim=0)
    nonzero = (B.abs().sum(0) > 0) & (A.abs().sum(1) > 0)  # sin terms of row or column 0 vanish
    dtype = parts["fourierft_spectrum"].dtype
    A, B = A[nonzero].to(dtype).contiguous(), B[:, nonzero].to(dtype).contiguous()
    return Module(name, A, B, alpha=float(A.shape[0]))


def delora(name, parts, config, shared, shapes, modules, notes):
    _need(parts, PARAMS["DELORA"], "DeLoRA")
    A, B = parts["delora_A"].double(), parts["delora_B"].double()
    lam, w_norm = parts["delora_lambda"].double().flatten(), parts["delora_w_norm"].double().flatten()
    r = A.shape[0]
    if A.ndim != 2 or B.ndim != 2 or B.shape[1] != r or lam.numel() != 1 or w_norm.numel() != A.shape[1]:
        sizes = ", ".join(f"{k} {list(parts[k].shape)}" for k in PARAMS["DELORA"])
        raise LorakitError(f"DeLoRA tensors do not fit: {sizes}", code="LK203")
    diag = lam / r / (A.norm(dim=1).clamp(min=1e-4) * B.norm(dim=0).clamp(min=1e-4))
    A2 = diag[:, None] * A * w_norm[None, :]
    dtype = parts["delora_A"].dtype
    return Module(name, A2.to(dtype).contiguous(), B.to(dtype).contiguous(), alpha=float(r))


def miss(name, parts, config, shared, shapes, modules, notes):
    mode = config.get("init_weights", True)
    if mode == "bat":
        raise LorakitError("MiSS in its 'bat' form multiplies W (no additive delta): not supported")
    block = parts["miss_block"]
    out, inp = _base_shape(name, shapes, "MiSS")[:2]
    if block.ndim != 2:
        raise LorakitError(f"miss_block has shape {list(block.shape)}, expected [r, out]")
    if mode == "mini":
        block = block.repeat(1, out // _positive_int(config, "mini_r"))
    r = block.shape[0]
    if block.shape[1] != out:
        raise LorakitError(
            f"miss_block {list(parts['miss_block'].shape)} does not fit the layer [{out}, {inp}]"
        )
    A = (torch.arange(inp)[None, :] % r == torch.arange(r)[:, None]).to(block.dtype)  # [I_r I_r ...]
    return Module(name, A.contiguous(), block.T.contiguous(), alpha=float(r))


def ia3(name, parts, config, shared, shapes, modules, notes):
    scale = parts["ia3_l"]
    if scale.ndim < 2 or sum(d != 1 for d in scale.shape) > 1:
        raise LorakitError(
            f"ia3_l has shape {list(scale.shape)}: expected [out, 1] or [1, in] (conv: [out, 1, 1, 1] or [1, in, 1, 1])",
            code="LK203",
        )
    if scale.ndim > 2 and not _feedforward(name, config.get("feedforward_modules")):
        scale = scale.transpose(0, 1)  # PEFT's conv ia3_l is [1, out, 1, 1] and scales the output channels
    return Transform(name, "ia3", {"ia3_l": scale.contiguous()})


def _feedforward(name, modules):
    """PEFT's rule: a regex string matched in full, or names the module's path ends with."""
    import re

    if isinstance(modules, str):
        return re.fullmatch(modules, name) is not None
    return any(name == m or name.endswith(f".{m}") for m in modules or ())


def hra(name, parts, config, shared, shapes, modules, notes):
    U = parts["hra_u"]
    if U.ndim != 2 or not (U.norm(dim=0) > 0).all():
        raise LorakitError(
            f"hra_u has shape {list(U.shape)} or a zero column: not Householder vectors", code="LK203"
        )
    return Transform(name, "hra", {"hra_u": U}, {"apply_GS": bool(config.get("apply_GS"))})


def oft(name, parts, config, shared, shapes, modules, notes):
    R = parts["oft_R"]
    n = R.shape[-1] if R.ndim == 2 else 0
    block = (1 + math.isqrt(1 + 8 * n)) // 2
    if R.ndim != 2 or block * (block - 1) // 2 != n or n == 0:
        raise LorakitError(
            f"oft_R has shape {list(R.shape)}: not [blocks, b (b - 1) / 2] skew-matrix entries", code="LK203"
        )
    if config.get("coft"):
        raise LorakitError("OFT with coft (constrained OFT) is not supported")
    options = {
        "block_size": block,
        "use_cayley_neumann": config.get("use_cayley_neumann", True),
        "num_cayley_neumann_terms": config.get("num_cayley_neumann_terms", 5),
    }
    return Transform(name, "oft", {"oft_R": R}, options)


def boft(name, parts, config, shared, shapes, modules, notes):
    _need(parts, ("boft_R", "boft_s"), "BOFT")
    R, s = parts["boft_R"], parts["boft_s"]
    if R.ndim != 4 or R.shape[2] != R.shape[3] or s.ndim != 2 or 1 not in s.shape:
        raise LorakitError(
            f"BOFT tensors boft_R {list(R.shape)}, boft_s {list(s.shape)} do not fit", code="LK203"
        )
    return Transform(name, "boft", {"boft_R": R, "boft_s": s.reshape(-1, 1)})  # conv layers store it [1, out]


BUILDERS = {
    "ADALORA": adalora,
    "VERA": vera,
    "LOHA": lycoris,
    "LOKR": lycoris,
    "FOURIERFT": fourierft,
    "DELORA": delora,
    "MISS": miss,
    "IA3": ia3,
    "HRA": hra,
    "OFT": oft,
    "BOFT": boft,
}
