"""`lorakit train`: the training loop itself is lorakit.training.loop (nanoGPT style, read top to bottom)."""
from ..training.loop import train

__all__ = ["train"]
