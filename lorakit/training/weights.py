"""A base's weights under the Hugging Face names lorakit's model uses, whatever the container: a model folder (any
quantized format lorakit reads) or a llama.cpp GGUF (its names, config and Q/K row order translated). Each linear
weight comes either as a full-precision tensor or as its stored codes (lorakit.quant.base.Stored), so that training
can keep a quantized base quantized."""

import os

import torch

from ..errors import LorakitError
from ..naming import llama_cpp
from ..quant.gguf import TYPES as GGML_CODECS


class Weights:
    """`config`: the config.json (a GGUF's derived from its KVs); `name in weights`, `get(name)` (full precision),
    `stored(name)` (the codes of a quantized weight, else None)."""

    def __init__(self, base):
        self.base = base
        self.gguf = base.kv is not None and base.config is None
        if base.config is None and not self.gguf:
            raise LorakitError("no config.json: the base must be a Hugging Face model folder", path=base.path)
        self.view = base.view
        if self.gguf:
            embed = self.view.shape("token_embd.weight") if "token_embd.weight" in self.view else None
            if embed is None:
                raise LorakitError("the GGUF has no token_embd.weight", path=base.path)
            self.config = llama_cpp.hf_config(base.kv, embed[0], tied="output.weight" not in self.view)
        else:
            self.config = base.config

    def config_path(self):
        return self.base.path if self.gguf else os.path.join(self.base.path, "config.json")

    def stored_name(self, name):
        return (llama_cpp.tensor_name(name) or "") if self.gguf else name

    def __contains__(self, name):
        return self.stored_name(name) in self.view

    def _order(self, name, rows):
        return llama_cpp.row_order(self.stored_name(name), self.base.kv, rows) if self.gguf else None

    def get(self, name):
        t = self.view.get(self.stored_name(name))
        order = self._order(name, t.shape[0])
        return t if order is None else t.index_select(0, order)

    def stored(self, name):
        """The codes of a quantized weight in Hugging Face row order (its format's Stored), None for a full-precision
        one or a type no codec here reads (dequantized instead)."""
        key = self.stored_name(name)
        members = self.view.quantized.get(key)
        if members is None or (self.gguf and self.view.ckpt.entry(key).dtype not in GGML_CODECS):
            return None
        stored = self.view.handler.stored(self.view.ckpt, members)
        order = self._order(name, stored.codes.shape[0])
        return stored if order is None else stored.rows(order)


def dequantized(base):
    """(config.json, {Hugging Face name: fp32 tensor}) of every weight lorakit's model loads from `base`, quantized
    ones dequantized: a base as the full-precision folder it stands for (the head left out when tied)."""
    from .model import LlamaConfig, LlamaForCausalLM

    weights = Weights(base)
    config = {k: v for k, v in weights.config.items() if k != "quantization_config"}
    with torch.device("meta"):
        names = list(LlamaForCausalLM(LlamaConfig.from_dict(config)).state_dict())
    return config, {n: weights.get(n).float().contiguous() for n in names if n in weights}
