"""A base's weights under the Hugging Face names lorakit's model uses, whatever the container (the base translates
names, config and row order: lorakit.bases). Each linear weight comes either as a full-precision tensor or as its
stored codes (lorakit.quant.base.Stored), so that training can keep a quantized base quantized."""


class Weights:
    """`config`: the config.json (a GGUF's derived from its KVs); `name in weights`, `get(name)` (full precision),
    `stored(name)` (the codes of a quantized weight, else None)."""

    def __init__(self, base):
        self.base = base
        self.config = (
            base.hf_config()
        )  # first: a folder without config.json is told so before its shards are read
        self.view = base.view

    def config_path(self):
        return self.base.config_path()

    def stored_name(self, name):
        return self.base.stored_name(name)

    def __contains__(self, name):
        return self.base.stored_name(name) in self.view

    def get(self, name):
        t = self.view.get(self.base.stored_name(name))
        order = self.base.hf_row_order(name, t.shape[0])
        return t if order is None else t.index_select(0, order)

    def stored(self, name):
        """The codes of a quantized weight in Hugging Face row order (its format's Stored), None for a full-precision
        one or a type no codec here reads (dequantized instead)."""
        key = self.base.stored_name(name)
        members = self.view.quantized.get(key)
        if members is None or not self.base.codes_readable(key):
            return None
        stored = self.view.handler.stored(self.view.ckpt, members)
        order = self.base.hf_row_order(name, stored.codes.shape[0])
        return stored if order is None else stored.rows(order)
