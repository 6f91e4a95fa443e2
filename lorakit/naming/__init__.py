"""Name maps, one file per naming family, shared by the formats, the bases and the merge engine:

- `embeddings`: token embeddings and the output head;
- `kohya`: sd-scripts' lora_* prefixes and mangling, resolved against a base;
- `ldm`: SD1/SD2/SDXL original (LDM) UNet <-> diffusers UNet paths;
- `dit_tables` (data) and `dit`: the DiT families' original <-> diffusers names;
- `fused`: slices of fused tensors (OpenCLIP in_proj, DiT qkv) both ways;
- `diffusers`: pipeline components, original single-file names -> diffusers names;
- `llama_cpp`: Hugging Face <-> llama.cpp tensor names and Q/K row order.

A new naming family is one file here; nothing in this package reads files. `natural_key` orders module names
for every listing.
"""

import re


def natural_key(name):
    """'blk.2' before 'blk.10': digit runs compared as numbers."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]
