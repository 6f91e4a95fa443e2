"""The merge engine: plan (every adapter tensor resolved before anything is written), tensor (the per-tensor fp32
math), pipeline (the worker threads over a Writer: safetensors today). IO lives in lorakit.io, the math of
quantized modules in lorakit.quant."""
