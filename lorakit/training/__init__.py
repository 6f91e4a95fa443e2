"""Training: data (data.py), LoRA layers for any torch model (lora.py), a one-file Llama-family model (model.py) and
the training loop (loop.py), read top to bottom."""
