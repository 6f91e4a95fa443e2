"""diffusers pipeline folders (model_index.json beside unet/, text_encoder/, transformer/ ...): each component folder
a base of its own, their tensor names seen with the component as prefix (unet.<name>), as diffusers LoRAs name them."""

import os
from functools import cached_property

from ..errors import LorakitError
from .base import Base

INDEX = "model_index.json"


def _outside(path, folder):
    """Whether `path` resolves to something that is not an entry of `folder` (a link out of it)."""
    return os.path.dirname(os.path.realpath(path)) != os.path.realpath(folder)


def _holds_weights(folder):
    """A component folder: it holds .safetensors files (links to files too: the Hugging Face cache links every file
    of a snapshot to its blob)."""
    return any(f.endswith(".safetensors") for f in os.listdir(folder))


class PipelineBase(Base):
    kind = "diffusers-pipeline"
    config = None
    kv = None

    @staticmethod
    def claims(path):
        return os.path.isdir(path) and os.path.isfile(os.path.join(path, INDEX))

    def __init__(self, path):
        from . import open_base

        self.path = os.fspath(path)
        self.components = {}
        for entry in sorted(os.listdir(self.path)):
            sub = os.path.join(self.path, entry)
            # a component folder linked out of the pipeline is refused (the Hugging Face cache links files only)
            if os.path.islink(sub) and os.path.isdir(sub) and _outside(sub, self.path):
                raise LorakitError(
                    f"'{entry}' is a link out of the pipeline folder (to {os.path.realpath(sub)}): refused",
                    path=self.path,
                )
            if os.path.isdir(sub) and not os.path.islink(sub) and _holds_weights(sub):
                self.components[entry] = open_base(sub)

    @cached_property
    def _shapes(self):
        return {f"{c}.{k}": v for c, base in self.components.items() for k, v in base.shapes().items()}

    def __contains__(self, name):
        component, _, rest = name.partition(".")
        return component in self.components and rest in self.components[component]

    def _component(self, name):
        """(the component's Base, the tensor's name in it)."""
        if name not in self:
            raise LorakitError("no such tensor in the pipeline", path=self.path, tensor=name)
        component, _, rest = name.partition(".")
        return self.components[component], rest

    def shape(self, name):
        base, rest = self._component(name)
        return base.shape(rest)

    def get(self, name):
        base, rest = self._component(name)
        return base.get(rest)

    @property
    def quantized(self):
        return any(base.quantized for base in self.components.values())

    @property
    def records(self):
        return {f"{c}.{k}": r for c, base in self.components.items() for k, r in base.records.items()}

    @property
    def identity(self):
        raise LorakitError(
            "a pipeline has no single base identity: name one of its components", path=self.path
        )
