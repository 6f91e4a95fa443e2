"""`lorakit demo`: a new user's first minute. A tiny base and adapter in a temp folder, and what lorakit does."""
import os
import tempfile


def demo(keep=None, quiet=False, echo=print):
    """Run the demo; returns a dict of what it made and found."""
    from .. import examples
    from ..render import inspect_text, validate_text
    from ..formats import load
    from .inspect import inspect
    from .validate import validate

    folder = keep or tempfile.mkdtemp(prefix="lorakit-demo-")
    os.makedirs(folder, exist_ok=True)
    base = os.path.join(folder, "base")
    tensors = examples.write_llama_checkpoint(base)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    adapter_path = os.path.join(folder, "adapter.safetensors")
    adapter = examples.random_adapter(shapes, rank=4, alpha=8.0, magnitude=0.02, base_model="lorakit-demo/tiny-llama")
    adapter.save(adapter_path, force=True)
    echo(f"# 1. a tiny Llama-style base in {base} and a rank-4 adapter on q_proj, v_proj:")
    echo(f"#    {adapter_path}\n")

    echo("$ lorakit validate adapter.safetensors")
    report = validate([adapter_path])
    echo(validate_text(report))
    echo("\n$ lorakit inspect adapter.safetensors --spectrum --base base")
    summary = inspect(adapter_path, spectrum=True, base=base, quiet=True)
    echo(inspect_text(summary))

    loaded = load(adapter_path)
    m = next(iter(loaded.modules.values()))
    echo(f"\n# lorakit.load() gives the exact delta of each module in fp32: {m.name} dW {list(m.delta().shape)}, "
         f"||dW||_F = {float(m.delta().norm()):.4f}")
    return {"folder": folder, "base": base, "adapter": adapter_path, "valid": report["valid"], "inspect": summary}
