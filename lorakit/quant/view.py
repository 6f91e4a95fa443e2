"""WeightView: a base checkpoint as full-precision weights, the one way every `--base` is read."""

import os

from ..errors import MALFORMED, LorakitError
from ..io import Checkpoint
from ..io.gguf import GGUFCheckpoint, is_gguf
from . import detect


class WeightView:
    """A checkpoint as full-precision weights: quantized modules appear as `<module>.weight`, dequantized on read
    (so extract and inspect work on quantized bases); every other tensor as stored."""

    def __init__(self, path):
        self.path = os.fspath(path)
        if is_gguf(self.path):  # llama.cpp: every block-quantized tensor is a module
            from .gguf import GGUFBlocks

            self.ckpt, self.handler = GGUFCheckpoint(self.path), GGUFBlocks()
            mods = self.handler.find(self.ckpt)
        else:
            self.ckpt = Checkpoint(self.path)
            self.handler, mods = detect(self.ckpt, self.path)
        self.quantized = {f"{m}.weight": members for m, members in mods.items()}
        # packed tensor -> the weight it makes up (hidden from the names: the weight stands for them)
        self.member_of = {
            t: n for n, members in self.quantized.items() for t in self.handler.members(self.ckpt, members)
        }
        self.names = sorted([n for n in self.ckpt.where if n not in self.member_of] + list(self.quantized))
        try:  # every quantized module's layout checked now, before any work: one line naming the tensor
            self._qshapes = {n: tuple(self.handler.shape(self.ckpt, m)) for n, m in self.quantized.items()}
        except MALFORMED as e:
            raise LorakitError(
                f"malformed {self.handler.name} checkpoint ({type(e).__name__}: {e})", path=self.path
            ) from None

    def __contains__(self, name):
        return name in self.quantized or (name in self.ckpt and name not in self.member_of)

    def shape(self, name):
        if name in self.quantized:
            return self._qshapes[name]
        return tuple(self.ckpt.entry(name).shape)

    def nbytes(self, name):
        if name in self.quantized:
            return sum(
                self.ckpt.entry(t).nbytes for t in self.handler.members(self.ckpt, self.quantized[name])
            )
        return self.ckpt.entry(name).nbytes

    def raw(self, name):
        """Stored bytes (None for a dequantized weight: compare values instead)."""
        return None if name in self.quantized else self.ckpt.shards[self.ckpt.where[name]].raw(name)

    def get(self, name):
        if name in self.quantized:
            try:
                return self.handler.dequantize(self.ckpt, self.quantized[name])
            except MALFORMED as e:
                raise LorakitError(
                    f"cannot dequantize ({type(e).__name__}: {e})", path=self.path, tensor=name
                ) from None
        return self.ckpt.get(name)

    def shapes(self):
        return {n: self.shape(n) for n in self.names}


def base_shapes(path):
    """Tensor name -> full-precision shape of a base given as `--base`: a checkpoint file or folder (quantized ones
    seen through WeightView), or a diffusers pipeline folder (names get the component as prefix: unet., ...)."""
    path = os.fspath(path)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "model_index.json")):
        shapes = {}
        for component in sorted(os.listdir(path)):
            folder = os.path.join(path, component)
            if os.path.isdir(folder) and any(f.endswith(".safetensors") for f in os.listdir(folder)):
                shapes.update({f"{component}.{k}": v for k, v in WeightView(folder).shapes().items()})
        return shapes
    return WeightView(path).shapes()
