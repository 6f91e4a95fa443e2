"""Calibration data for requantizing merges (`merge --calibration DATA`), on the model lorakit's trainer runs.

`input_factors` runs the adapted model (the base as its codes, the adapters applied at run time: the model the merge
should reproduce) on the data block by block, and keeps each linear layer's input moments H = X^T X compressed (the
top eigenpairs exactly, the rest as their mean: lorakit.quant.requant.InputMoments). Requantizing by GPTQ with H
makes the rounding error E small where the data's inputs lie (||E X||), not only in the adapter's input subspace.
Only one block's full moments are held at a time. `kl` then measures the merged model against the adapted
one on held-out tokens of the same data: the figure the survival report leads with.
"""

from dataclasses import dataclass

import torch

from ..errors import LorakitError
from ..quant.requant import InputMoments, stacked_factors
from . import lora
from .data import load_data
from .model import LlamaForCausalLM, rope
from .weights import Weights

SEQ_LEN = 256
CALIBRATION_SEQUENCES = 16  # 4096 tokens: the moments of every layer's inputs
HELD_OUT_SEQUENCES = 4  # the tokens after them: the KL estimate
# eigen-directions kept per layer exactly (activation spectra fall fast), the rest as their mean
FACTOR_RANK = 256


def sequences(base, data, vocab_size):
    """(calibration [n, SEQ_LEN], held-out [m, SEQ_LEN]) token ids from a data file (ids or text)."""
    kind, tokens = load_data(data, vocab_size, base)
    if kind != "stream":
        tokens = torch.cat([torch.as_tensor(ids) for ids, _ in tokens])
    n = len(tokens) // SEQ_LEN
    if n < 2:
        raise LorakitError(
            f"calibration data of {len(tokens)} tokens: at least {2 * SEQ_LEN} are needed", path=data
        )
    held = max(1, min(HELD_OUT_SEQUENCES, n // 4))
    ids = tokens[: n * SEQ_LEN].reshape(n, SEQ_LEN).long()
    return ids[: min(CALIBRATION_SEQUENCES, n - held)], ids[n - held :]


def adapted_model(base, loaded, sign=1.0):
    """lorakit's model on `base` with every adapter module applied at run time (their deltas summed exactly, as
    merge sums them), and its Weights."""
    weights = Weights(base)
    model = LlamaForCausalLM.from_pretrained(base)
    modules = {}
    for _, ad, w in loaded:
        for m in ad.modules.values():
            modules.setdefault(m.name, []).append((m, w))
    names = dict(model.named_modules())
    for name, loras in modules.items():
        if name not in names or not lora._kind(names[name]):
            raise LorakitError(
                "--calibration runs the adapted model, which has no such linear layer", tensor=name
            )
        B, A = stacked_factors(loras, sign)
        layer = lora.LoRA(names[name], A.shape[0], float(A.shape[0]), "linear")  # scale 1: B holds it
        with torch.no_grad():
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    return model.eval(), weights


@torch.no_grad()
def input_factors(model, weights, ids):
    """{the base's weight name: InputMoments}: each linear layer's inputs on `ids`, block by block."""
    x = model.model.embed_tokens(ids)
    cos, sin = rope(torch.arange(ids.shape[1]), model.config.dim_head, model.config.rope_theta, x.dtype)
    factors = {}
    for i, block in enumerate(model.model.layers):
        inputs, moments, hooks = {}, {}, []  # layer -> its input; input -> its compressed moments
        for name, layer in block.named_modules():
            if isinstance(layer, lora.LoRA) or (lora._kind(layer) and not name.endswith(".base")):
                hooks.append(layer.register_forward_hook(_moment_into(inputs, moments, name)))
        x = block(x, cos, sin)
        for h in hooks:
            h.remove()
        for name, key in inputs.items():
            factors[weights.stored_name(f"model.layers.{i}.{name}.weight")] = moments[key][1]
    return factors


def _moment_into(inputs, moments, name):
    """A hook measuring a layer's input; q/k/v (and gate/up) see one tensor: its moments are computed once."""

    def hook(layer, args, output):
        x, key = args[0], args[0].data_ptr()
        if (
            key not in moments
        ):  # the tensor is held with its moments, so its address is not reused in the block
            X = x.reshape(-1, x.shape[-1]).double()
            moments[key] = (x, top_factor(X.T @ X))
        inputs[name] = key

    return hook


def top_factor(H, rank=FACTOR_RANK):
    """H compressed (InputMoments): A [k, in] with A^T A its best rank-k approximation (the top eigenpairs), and the
    mean of the other eigenvalues."""
    values, vectors = torch.linalg.eigh(H)
    k = min(rank, H.shape[0])
    top, V = values[-k:].clamp(min=0), vectors[:, -k:]
    rest = float(values[:-k].clamp(min=0).mean()) if k < H.shape[0] else 0.0
    return InputMoments((V * top.sqrt()).T.float().contiguous(), rest)


@torch.no_grad()
def kl(reference, candidate, ids):
    """Mean KL(reference || candidate) per token of next-token distributions on `ids` (fp64 log-softmax)."""
    total = 0.0
    for x in ids:
        p = reference(x[None]).double().log_softmax(-1)
        q = candidate(x[None]).double().log_softmax(-1)
        total += float((p.exp() * (p - q)).sum(-1).mean())
    return total / len(ids)


@dataclass
class Calibration:
    """What `merge --calibration` gives the engine and keeps for the report."""

    factors: dict  # {weight name: InputMoments}
    held_out: torch.Tensor
    adapted: object  # the adapted model (base codes + adapters at run time): the merge's reference


def calibrate(base, loaded, data, sign=1.0):
    """Run the adapted model on `data` (token ids or text): the input factors of every layer, block by block."""
    model, weights = adapted_model(base, loaded, sign)
    ids, held_out = sequences(base, data, model.config.vocab_size)
    return Calibration(input_factors(model, weights, ids), held_out, model)


def estimate(calibration, output, base):
    """The merged model's KL per token against the adapted one, on the held-out calibration tokens, next to the
    base's (no adapter at all); the adapter at run time is the reference itself (0)."""
    merged = LlamaForCausalLM.from_pretrained(output)
    return {
        "kl": kl(calibration.adapted, merged, calibration.held_out),
        "kl_no_adapter": kl(
            calibration.adapted, LlamaForCausalLM.from_pretrained(base), calibration.held_out
        ),
        "kl_tokens": calibration.held_out.numel(),
    }
