"""compressed-tensors' quantization_config (llm-compressor's checkpoints), read in one place for its formats.

{"quant_method": "compressed-tensors", "format": <one format, or "mixed-precision">, "config_groups": {name:
{"targets": [...], "weights": {num_bits, type, symmetric, strategy, group_size, block_structure, actorder, ...},
"format": <the group's own>}}, "ignore": [module names, "re:<regex>"]}. Facts: compressed-tensors 0.19/0.20
(config/base.py CompressionFormat, quantization/quant_config.py).
"""

import os

from ..errors import LorakitError

# compressed-tensors format -> the lorakit format that reads it
READER = {
    "pack-quantized": "ct-int",
    "nvfp4-pack-quantized": "nvfp4",
    "mxfp8-quantized": "mxfp8",
    "float-quantized": "fp8",
    "int-quantized": "int8",
    "naive-quantized": "int8",
}


# what a group's weights arguments must say for the reader of its format (compressed-tensors' QuantizationArgs: type,
# num_bits, strategy); a key left out takes compressed-tensors' default and is not checked. ct-int's bits are its own
# check (2, 4 or 8 supported, its message says so)
EXPECTED = {
    "ct-int": ("int", None, ("group", "channel", "tensor")),
    "nvfp4": ("float", (4,), ("tensor_group",)),
    "mxfp8": ("float", (8,), ("group",)),
    "fp8": ("float", (8,), ("block", "channel", "tensor")),
    "int8": ("int", (8,), ("channel", "tensor", "group")),
}


def is_compressed_tensors(q):
    return q.get("quant_method") == "compressed-tensors"


def groups(q):
    """[(its compressed-tensors format, its weights arguments)] of every config group that quantizes weights, each
    checked (the numbers lorakit reads from them are positive integers)."""
    config_groups = q.get("config_groups") or {}
    if not isinstance(config_groups, dict):
        raise LorakitError("quantization_config.config_groups is not a JSON object")
    found = []
    for name, group in config_groups.items():
        if not isinstance(group, dict):
            raise LorakitError(f"quantization_config.config_groups.{name} is not a JSON object")
        weights = group.get("weights")
        if weights is None:
            continue
        if not isinstance(weights, dict):
            raise LorakitError(f"quantization_config.config_groups.{name}.weights is not a JSON object")
        fmt = group.get("format") or q.get("format")
        check_weights(f"quantization_config.config_groups.{name}.weights", weights, READER.get(fmt))
        found.append((fmt, weights))
    ignore = q.get("ignore")
    if ignore is not None and not (isinstance(ignore, list) and all(isinstance(n, str) for n in ignore)):
        raise LorakitError(f"quantization_config.ignore is {ignore!r}: expected a list of module names")
    return found


def positive_int(value):
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_weights(where, weights, reader=None):
    """The numbers are positive integers, and type, num_bits and strategy are what `reader`'s format stores."""
    for key in ("num_bits", "group_size"):
        value = weights.get(key)
        if value is not None and not positive_int(value):
            raise LorakitError(f"{where}.{key} is {value!r}: expected a positive integer")
    block = weights.get("block_structure")
    if block is not None and not (
        isinstance(block, list) and len(block) == 2 and all(map(positive_int, block))
    ):
        raise LorakitError(
            f"{where}.block_structure is {block!r}: expected [rows, columns], positive integers"
        )
    kind, bits, strategies = EXPECTED.get(reader, (None, None, None))
    for key, allowed in (("type", kind and (kind,)), ("num_bits", bits), ("strategy", strategies)):
        value = weights.get(key)
        if value is not None and allowed and value not in allowed:
            raise LorakitError(
                f"{where}.{key} is {value!r}: {reader} weights take {' or '.join(map(str, allowed))}"
            )
    strategy = weights.get("strategy")
    if block is not None and strategy not in (None, "block"):
        raise LorakitError(f"{where}.strategy is {strategy!r} beside a block_structure: expected 'block'")


def weights_for(q, reader):
    """The weights arguments of the groups `reader` (a lorakit format name) reads, [] for none; a checkpoint mixing
    formats of several readers is refused (one format a checkpoint)."""
    if not is_compressed_tensors(q):
        return []
    found = groups(q)
    readers = {READER.get(fmt, fmt) for fmt, _ in found}
    unknown = {fmt for fmt, _ in found if fmt not in READER}
    if unknown:
        raise LorakitError(f"compressed-tensors format {sorted(unknown)[0]!r} is not supported")
    if reader in readers and len(readers) > 1:
        raise LorakitError(
            f"compressed-tensors checkpoint mixing formats ({', '.join(sorted(readers))}): one format a checkpoint "
            "is supported"
        )
    return [w for fmt, w in found if READER[fmt] == reader]


def check_ignored(q, ckpt, modules):
    """The ignore list must name modules the checkpoint has, left unquantized: a literal name with no tensor (but a
    tied lm_head, stored nowhere) or one stored quantized is refused."""
    for name in q.get("ignore") or []:
        if not isinstance(name, str) or name.startswith("re:"):
            continue
        if name in modules:
            tensor = next(iter(modules[name].values()))
            raise LorakitError(
                f"quantization_config ignores '{name}' (left unquantized), but it is stored quantized",
                path=ckpt.where[tensor],
                tensor=tensor,
            )
        prefix = name + "."
        if name.split(".")[-1] != "lm_head" and not any(t.startswith(prefix) for t in ckpt.where):
            config = os.path.join(ckpt.path, "config.json") if os.path.isdir(ckpt.path) else ckpt.path
            raise LorakitError(
                f"quantization_config ignores '{name}', which the checkpoint does not have (no tensor "
                f"'{name}.weight')",
                path=config,
            )
