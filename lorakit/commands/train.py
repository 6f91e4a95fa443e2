"""`lorakit train`: the arguments checked (refused, never clamped), then the training loop of lorakit.training.loop
(nanoGPT style, read top to bottom)."""

from ..errors import LorakitError
from ..io import check_output
from ..training import loop
from .args import existing, in_range


def train(
    base,
    data,
    output,
    rank=16,
    alpha=32.0,
    targets="q_proj,v_proj",
    steps=100,
    lr=2e-4,
    batch=8,
    seq_len=256,
    grad_accum=1,
    eval_every=50,
    warmup=None,
    device="auto",
    dtype="auto",
    seed=0,
    format="lorakit",
    resume=None,
    force=False,
    quiet=False,
):
    """Train a LoRA adapter on `base` (a Hugging Face Llama-family folder); returns a report, writes `output`."""
    existing(base, "base")
    existing(data, "data")
    existing(resume, "resume")
    for option, value, low, integer in (
        ("rank", rank, 1, True),
        ("steps", steps, 1, True),
        ("batch", batch, 1, True),
        ("seq_len", seq_len, 1, True),
        ("grad_accum", grad_accum, 1, True),
        ("eval_every", eval_every, 0, True),
        ("warmup", warmup, 0, True),
        ("seed", seed, 0, True),
    ):
        in_range(option, value, low, integer=integer)
    in_range("alpha", alpha, 0, low_open=True)
    in_range("lr", lr, 0, low_open=True)
    if format not in ("lorakit", "peft"):
        raise LorakitError(f"--format is lorakit or peft, not '{format}'")
    check_output(output, [base, data, resume], force, directory=format == "peft")
    return loop.train(
        base,
        data,
        output,
        rank=rank,
        alpha=alpha,
        targets=targets,
        steps=steps,
        lr=lr,
        batch=batch,
        seq_len=seq_len,
        grad_accum=grad_accum,
        eval_every=eval_every,
        warmup=warmup,
        device=device,
        dtype=dtype,
        seed=seed,
        format=format,
        resume=resume,
        force=force,
        quiet=quiet,
    )
