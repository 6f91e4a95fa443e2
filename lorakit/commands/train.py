"""`lorakit train`: the arguments checked (refused, never clamped), then the training loop of lorakit.training.loop
(nanoGPT style, read top to bottom)."""

import dataclasses

from ..formats import FOLDER_FORMATS, refuse_misnamed
from ..io import check_output
from ..options import TrainOptions, takes_options
from ..training import loop
from .args import existing, local


@takes_options(TrainOptions)
def train(base, data, output, options):
    """Train a LoRA adapter on `base` (a Hugging Face Llama-family folder); returns a report, writes `output`.
    Options: TrainOptions."""
    base = existing(local(base, "base", options.quiet), "base")
    data = existing(local(data, "data", options.quiet), "data")
    check_output(
        output, [base, data, options.resume], options.force, directory=options.format in FOLDER_FORMATS
    )
    refuse_misnamed(options.format, output)  # now, not after the training
    return loop.train(base, data, output, **dataclasses.asdict(options))
