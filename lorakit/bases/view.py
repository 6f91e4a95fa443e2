"""WeightView: a base's stored tensors as full-precision weights, the one way the engine and the commands read them."""

from ..errors import MALFORMED, LorakitError


class WeightView:
    """A checkpoint as full-precision weights: quantized modules appear as `<module>.weight`, dequantized on read
    (so extract and inspect work on quantized bases); every other tensor as stored. `handler` is the QuantFormat of
    the quantized modules `modules` ({module: {role: tensor}}), None for a full-precision checkpoint."""

    def __init__(self, path, ckpt, handler, modules):
        self.path, self.ckpt, self.handler = path, ckpt, handler
        self.quantized = {handler.weight_name(m): members for m, members in modules.items()}
        # packed tensor -> the weight it makes up (hidden from the names: the weight stands for them)
        self.member_of = {
            t: n for n, members in self.quantized.items() for t in handler.members(ckpt, members)
        }
        self.names = sorted([n for n in ckpt.where if n not in self.member_of] + list(self.quantized))
        try:  # every quantized module's layout checked now, before any work: one line naming the tensor
            self._rows = {n: tuple(handler.shape(ckpt, m)) for n, m in self.quantized.items()}
            self._qshapes = {n: tuple(handler.full_shape(ckpt, m)) for n, m in self.quantized.items()}
        except MALFORMED as e:
            raise LorakitError(
                f"malformed {handler.name} checkpoint ({type(e).__name__}: {e})", path=path
            ) from None

    def __contains__(self, name):
        return name in self.quantized or (name in self.ckpt and name not in self.member_of)

    def shape(self, name):
        if name in self.quantized:
            return self._qshapes[name]
        return tuple(self.ckpt.entry(name).shape)

    def module_shape(self, name):
        """A quantized module's [out, in] as its codes lie (the shape its grid and a merge's rows use)."""
        return self._rows[name]

    def nbytes(self, name):
        if name in self.quantized:
            members = self.handler.members(self.ckpt, self.quantized[name])
            return sum(self.ckpt.entry(t).nbytes for t in members)
        return self.ckpt.entry(name).nbytes

    def raw(self, name):
        """Stored bytes (None for a dequantized weight: compare values instead)."""
        return None if name in self.quantized else self.ckpt.shards[self.ckpt.where[name]].raw(name)

    def get(self, name):
        if name in self.quantized:
            try:
                m = self.quantized[name]
                return self.handler.to_full(self.ckpt, m, self.handler.dequantize(self.ckpt, m))
            except MALFORMED as e:
                raise LorakitError(
                    f"cannot dequantize ({type(e).__name__}: {e})", path=self.path, tensor=name
                ) from None
        return self.ckpt.get(name)

    def shapes(self):
        return {n: self.shape(n) for n in self.names}
