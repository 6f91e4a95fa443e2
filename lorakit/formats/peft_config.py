"""PEFT's adapter_config.json, read in one place for every PEFT type: the keys lorakit reads with their types, the
rank / alpha patterns, and what `init_lora_weights` says about the base the adapter was trained against.

Facts (huggingface/peft tuners/lora/config.py, layer.py, model.py subtract_mutated_init; peft_model.py
save_pretrained): PiSSA ("pissa", "pissa_niter_K"), OLoRA ("olora") and CorDA ("corda") initialise A0, B0 from the
base weight and train against W_res = W - scale * B0 A0, which the adapter folder does not hold; PEFT converts them
for the original W with `save_pretrained(path_initial_model_for_weight_conversion=...)`: lora_A = [A; A0], lora_B =
[B, -B0], r and lora_alpha doubled (alpha x sqrt(2) with use_rslora), init_lora_weights True. LoftQ ("loftq")
replaces W by a quantized Q with Q + B0 A0 ~ W: neither file holds Q. LoRA-GA ("lora_ga") moves the base in PEFT
as PiSSA does (lora_ga_init subtracts scale * B0 A0) and PEFT converts it the same way. EVA ("eva"), "gaussian",
"orthogonal" and True / False only choose the starting factors: the base is unchanged.
"""

import re

from ..errors import LorakitError, listed

CONFIG = "adapter_config.json"

# init_lora_weights -> why the adapter does not apply to the original base as it is
MOVES_BASE = {
    "pissa": "PiSSA trained it against the base minus its top singular directions (W - B0 A0)",
    "olora": "OLoRA trained it against the base minus its QR factors (W - B0 A0)",
    "corda": "CorDA trained it against the base minus its context-oriented factors (W - B0 A0)",
    # PEFT's lora_ga_init subtracts scale * B0 A0 from W too (peft 0.21 tuners/lora/layer.py), whatever LoRA-GA's
    # paper needs: the files tell only what PEFT did
    "lora_ga": "LoRA-GA trained it against the base minus its gradient-aligned factors (W - B0 A0)",
}
LOFTQ = (
    "LoftQ trained it against a quantized base Q (Q + B0 A0 ~ W) that neither the adapter nor the original "
    "base holds: merge it into the LoftQ base it was trained with, or serve it at runtime on that base"
)
# initialisations that only choose the starting factors: the adapter applies to the original base as it is
BASE_UNCHANGED = {"eva", "gaussian", "orthogonal"}


def pattern_value(patterns, module, default):
    """PEFT's rank_pattern / alpha_pattern rule: the first key (dict order) matching the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


# a quantified group that itself holds a quantifier or an alternative: (a+)+, (a|aa)*, (x*){9}: exponential
# backtracking on a module name; PEFT's patterns are module names, and such a key would hang the reader
NESTED_QUANTIFIER = re.compile(r"\((?:[^()\\]|\\.)*[+*{|](?:[^()\\]|\\.)*\)[+*{]")


def check_config(config, path):
    """The adapter_config.json keys lorakit reads, with their types: a wrong one is an error naming the key."""
    if not isinstance(config, dict):
        raise LorakitError("adapter_config.json must be a JSON object", path=path)

    def number(key, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise LorakitError(f"'{key}' must be a number, got {value!r}", path=path)

    r = config.get("r")
    if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
        raise LorakitError(f"'r' must be a positive integer, got {r!r}", path=path)
    if config.get("lora_alpha") is not None:
        number("lora_alpha", config["lora_alpha"])
    for key in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict):
            raise LorakitError(f"'{key}' must be an object of pattern -> number", path=path)
        for pattern, value in patterns.items():
            number(f"{key}[{pattern!r}]", value)
            _regex(f"'{key}' key", pattern, path)
    to_save = config.get("modules_to_save")
    if to_save is not None and not (isinstance(to_save, list) and all(isinstance(s, str) for s in to_save)):
        raise LorakitError("'modules_to_save' must be a list of module names", path=path)
    for key in ("target_modules", "exclude_modules", "layers_pattern", "modules_to_save"):
        value = config.get(key)
        if key != "modules_to_save" and value is not None and not _names(value):
            raise LorakitError(f"'{key}' must be a string or a list of strings, got {value!r}", path=path)
        for pattern in _patterns(key, value):
            _regex(f"'{key}'", pattern, path)
    group = config.get("qalora_group_size")
    if config.get("use_qalora") and group is not None and not (_index(group) and group >= 1):
        raise LorakitError(f"'qalora_group_size' must be a positive integer, got {group!r}", path=path)
    layers = config.get("layers_to_transform")
    if layers is not None and not (_index(layers) or isinstance(layers, list) and all(map(_index, layers))):
        raise LorakitError(
            f"'layers_to_transform' must be a layer index or a list of them, got {layers!r}", path=path
        )


def _regex(what, pattern, path):
    """Refuse a pattern that is no regular expression, or one whose matching time can explode."""
    try:
        re.compile(pattern)
    except re.error as e:
        raise LorakitError(f"{what} {pattern!r} is not a regular expression ({e})", path=path) from None
    if NESTED_QUANTIFIER.search(pattern) or len(pattern) > 1000:
        raise LorakitError(
            f"{what} {pattern!r} has a nested quantifier (exponential matching time): refused", path=path
        )


def untargeted_note(config, names):
    """A warning naming the modules PEFT would leave out by the config's targeting (None where it takes them all)."""
    missed = untargeted(config, names)
    if not missed:
        return None
    return (
        f"WARNING: adapter_config.json does not target {len(missed)} module(s) the file holds (its target_modules, "
        f"exclude_modules, modules_to_save or layers_to_transform): PEFT would not load them, lorakit reads them as "
        f"the file holds them: {listed(missed)}"
    )


def _patterns(key, value):
    """What PEFT matches as regular expressions: a string of these keys, every entry of layers_pattern and
    modules_to_save (target_modules / exclude_modules entries are names, matched as suffixes)."""
    if isinstance(value, str):
        return [value]
    if key in ("layers_pattern", "modules_to_save"):
        return value or []
    return []


def _names(value):
    return isinstance(value, str) or isinstance(value, list) and all(isinstance(v, str) for v in value)


def _index(value):
    return isinstance(value, int) and not isinstance(value, bool)


def untargeted(config, names):
    """The modules of `names` that PEFT would not inject with this config, so not load from the file (as
    peft.tuners.tuners_utils.check_target_module_exists decides: exclude_modules, modules_to_save, target_modules,
    layers_to_transform with layers_pattern). Empty where the targeting depends on the model: no target_modules (the
    model type's defaults) or "all-linear"."""
    targets = config.get("target_modules")
    if targets is None or targets == "all-linear":  # check_config saw its type
        return []
    return [name for name in names if not _targeted(config, targets, name)]


def _targeted(config, targets, key):
    excluded = config.get("exclude_modules")
    if excluded and (
        re.fullmatch(excluded, key)
        if isinstance(excluded, str)
        else key in excluded or any(key.endswith(f".{e}") for e in excluded)
    ):
        return False
    if any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in config.get("modules_to_save") or []):
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    found = any(key.endswith(f".{t}") for t in targets)
    layers = config.get("layers_to_transform")
    if not found or layers is None or layers == []:
        return found
    pattern = config.get("layers_pattern")
    if not pattern:  # the first numbered segment (a MoE's expert index comes after the layer's)
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        match = next(
            (
                m
                for p in ([pattern] if isinstance(pattern, str) else pattern)
                if (m := re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key))
            ),
            None,
        )
    if match is None:
        return False
    return int(match["idx"]) == layers if isinstance(layers, int) else int(match["idx"]) in layers


def initialisation(config):
    """init_lora_weights as PEFT's names: "pissa" for "pissa_niter_4", "true" / "false" for the booleans."""
    value = str((config or {}).get("init_lora_weights", True)).lower()
    return "pissa" if value.startswith("pissa") else value


ALORA = (
    "an Activated LoRA (alora_invocation_tokens) applies only from its invocation tokens on, so no change of the "
    "weights equals it (PEFT cannot merge it either): serve it at run time with an engine that runs aLoRA"
)


def base_change(config):
    """Why an adapter does not apply to the original base as it is (None where it does): its initialisation
    moved the base, and the initial adapter is needed to undo that (`undoable`); LoftQ, an Activated LoRA and layer
    replication: nothing can."""
    init = initialisation(config)
    if init == "loftq":
        return LOFTQ
    if config.get("alora_invocation_tokens"):
        return ALORA
    if config.get("layer_replication"):
        return (
            f"PEFT's layer_replication {config['layer_replication']} stacks the base's layers again, sharing "
            "their weights: the adapter's layer numbers are those of the stacked model, so no change of the base's "
            "own weights equals it"
        )
    return MOVES_BASE.get(init)


def undoable(reason):
    """Whether the initial adapter (--initial) undoes what `base_change` said (PiSSA, OLoRA, CorDA, LoRA-GA)."""
    return reason in MOVES_BASE.values()


def initialisation_note(config):
    """What a reader says of an initialisation that leaves the base as it is (None for PEFT's default)."""
    init = initialisation(config)
    if init in BASE_UNCHANGED:
        return f"init_lora_weights '{init}' only chose the starting factors: the base is unchanged, merged as it is"
    return None
