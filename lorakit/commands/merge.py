"""`lorakit merge`: adapters into a base checkpoint, streamed tensor by tensor with bounded memory. This checks the
arguments; lorakit.bases opens the base and lorakit.engine plans, writes and reports."""

import os

from ..errors import LorakitError
from ..io import check_output
from ..options import MergeOptions, takes_options
from .args import (
    existing,
    load_inputs,
    local,
    paths,
    refuse_adapter_as_base,
    undo_initial,
    weight_notes,
    weighted_inputs,
)


@takes_options(MergeOptions)
def merge(base, adapters, output, options):
    """Merge adapters (`path` or `path:weight`) into `base`: W' = W + sum_i w_i * scale_i * B_i @ A_i, in fp32,
    rounded once. Writes `output` in the base's layout (file, folder, GGUF, pipeline). Quantized bases (FP8, INT8,
    GPTQ, AWQ, NF4, GGUF) are written back in their format with `strategy` (lorakit.quant.STRATEGIES), or dequantized
    with `dtype`; the report then says how much of each adapter module survived. `skip_unmatched`: adapter tensors
    the base does not have are skipped and listed in the report (an error otherwise). Options: MergeOptions.
    Returns a report."""
    from ..bases import open_base
    from ..engine.merge import merge_into, parted

    inputs = weighted_inputs(adapters)
    base = existing(local(base, "base", options.quiet), "BASE")
    base_path = os.fspath(base)
    check_output(  # an existing output of a part of several is judged once its files are known (engine.merge)
        output,
        [base_path, options.full_precision_base, options.initial, *paths(inputs)],
        options.force or parted(options),
    )
    base = open_base(base)  # headers and configs parsed here, once, for every step below
    refuse_adapter_as_base(base)
    loaded = load_inputs(inputs, base)  # names resolved against the base (kohya's are lossy)
    loaded, undone = undo_initial(loaded, options.initial, "merge")
    calibration = _calibrate(base, loaded, options)
    report = merge_into(base, loaded, output, options, paths(inputs), calibration)
    report["notes"] = [f"{label}: {note}" for label, note in undone] + report["notes"] + weight_notes(loaded)
    if calibration is not None:
        from ..engine.report import model_worse
        from ..training.calibration import estimate

        report["quantization"] = {**estimate(calibration, output, base_path), **report["quantization"]}
        warning = model_worse(report["quantization"])
        report["notes"] += [warning] if warning else []
    return report


def _calibrate(base, loaded, options):
    """The layer inputs of the adapted model on --calibration data (None without it, or for a full-precision base,
    where nothing is rounded)."""
    if options.calibration is None:
        return None
    if not base.quantized:
        raise LorakitError(
            "--calibration is for quantized bases: nothing is requantized here", path=base.path
        )
    from ..training.calibration import calibrate

    return calibrate(base, loaded, options.calibration, -1.0 if options.unmerge else 1.0)
