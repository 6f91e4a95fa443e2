"""kohya / sd-scripts names: the lora_* prefixes, where each lives in a base, and the mangling (dots to
underscores) resolved back against a base's tensor names."""

from .ldm import diffusers_to_ldm_unet, ldm_unet_family, ldm_unet_to_diffusers

PREFIXES = (
    "lora_unet",
    "lora_te1",
    "lora_te2",
    "lora_te3",
    "lora_te",
    "lycoris",
)  # lycoris_: LyCORIS on DiTs
# where each kohya prefix lives in a base: (kohya prefix, base name prefix). Diffusers folders are read with their
# component as prefix (unet., text_encoder., ...); original single-file SD/SDXL/Flux checkpoints use the others.
BASE_PREFIXES = (
    ("lora_unet", "unet."),
    ("lora_unet", "transformer."),
    ("lora_te", "text_encoder."),
    ("lora_te1", "text_encoder."),
    ("lora_te2", "text_encoder_2."),
    ("lora_te3", "text_encoder_3."),
    ("lora_unet", "model.diffusion_model."),
    ("lora_te", "cond_stage_model.transformer."),
    ("lora_te1", "conditioner.embedders.0.transformer."),
    ("lora_unet", ""),
    # a text encoder in a file of its own (Flux's clip_l / t5xxl files, SDXL's CLIP-G): its names bare
    ("lora_te", ""),
    ("lora_te1", ""),
    ("lora_te2", ""),
    ("lora_te3", ""),
    ("lycoris", "transformer."),
    ("lycoris", "model.diffusion_model."),
    ("lycoris", "unet."),
    ("lycoris", ""),
)


def mangled_prefix(name):
    """The kohya prefix (longest first: lora_te1 before lora_te) of a name still in kohya's mangled form (no dots:
    not resolved to a module path), or None."""
    if "." in name:
        return None
    return next((p for p in sorted(PREFIXES, key=len, reverse=True) if name.startswith(p)), None)


def mangle(prefix, path):
    return (prefix + "." + path).replace(".", "_")


def resolution_table(shapes):
    """kohya lora_name -> spec module name, for every weight of the base."""
    table = {}
    for name in shapes:
        if not name.endswith(".weight"):
            continue
        module = name[: -len(".weight")]
        for kohya_prefix, base_prefix in BASE_PREFIXES:
            if module.startswith(base_prefix):
                path = module[len(base_prefix) :]
                table.setdefault(mangle(kohya_prefix, path), module)
                if (
                    base_prefix == "model.diffusion_model."
                ):  # a single file: kohya's SD1 names are diffusers paths
                    sd1 = ldm_unet_to_diffusers(path)
                    if sd1:
                        table.setdefault(mangle(kohya_prefix, sd1), module)
                if base_prefix == "unet.":  # a diffusers UNet: kohya's SDXL names are the original paths
                    for ldm in diffusers_to_ldm_unet(path):
                        table.setdefault(mangle(kohya_prefix, ldm), module)
    return table


def kohya_names(modules, meta=None):
    """spec module names -> the kohya lora_names sd-scripts' own trainer uses for that model family: SD1/SD2 UNets
    by their diffusers paths (sd-scripts' original_unet mirrors them) even when the module names are the single
    file's (model.diffusion_model.input_blocks...), SDXL and Flux by their original paths."""
    components = {m.split(".", 1)[0] for m in modules}
    sd1 = ldm_unet_family(modules, meta) == "sd1"
    out = {}
    for module in modules:
        if module.startswith("model.diffusion_model.") and sd1:
            path = module[len("model.diffusion_model.") :]
            out[module] = mangle("lora_unet", ldm_unet_to_diffusers(path) or path)
        else:
            out[module] = kohya_name(module, components)
    return out


def kohya_name(module, components):
    """spec module name -> kohya lora_name (by prefix only; kohya_names knows the model families)."""
    if mangled_prefix(module):
        return module
    two_text_encoders = "text_encoder_2" in components
    for kohya_prefix, base_prefix in BASE_PREFIXES:
        if base_prefix and module.startswith(base_prefix):
            if base_prefix == "text_encoder." and kohya_prefix != (
                "lora_te1" if two_text_encoders else "lora_te"
            ):
                continue
            return mangle(kohya_prefix, module[len(base_prefix) :])
    return mangle("lora_unet", module)
