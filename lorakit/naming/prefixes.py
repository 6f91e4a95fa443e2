"""The prefixes one model's language-model weights go by. transformers >= 4.52 names a vision-language model's text
weights `model.language_model.*` (Gemma 3 / 3n / 4, Qwen2.5-VL, Qwen3-VL, Llama 4, Mistral 3, LLaVA) and its
vision tower `model.visual.*` / `model.vision_tower.*`; the original checkpoints of the same models say
`language_model.model.*` (Gemma 3, Llama 4, Mistral 3, LLaVA) or `model.*` and `visual.*` (Qwen2-VL / 2.5-VL); a
text-only model says `model.*`, a Mamba or Nemotron-H checkpoint `backbone.*` (the same model in memory: `model.*`).
PEFT names an adapter's modules as the model in memory did when it was made, so an adapter and a base can disagree
by one of these prefixes (vLLM #48019, #34186: such an adapter loads and does
nothing). A module is renamed onto the base only where exactly one other prefix lands it."""

# longest first: a name is read with the longest prefix it starts with, then every other one is tried
PREFIXES = (
    "model.language_model.model.",
    "model.language_model.",
    "language_model.model.",
    "model.text_model.",
    "language_model.",
    "backbone.",  # Mamba / Nemotron-H checkpoints; transformers 5 holds them under model.
    "model.",
    "",
)


def other_names(name):
    """The names `name` has under the other prefixes (its own prefix read every way it starts)."""
    out = []
    for own in PREFIXES:
        if name.startswith(own):
            rest = name[len(own) :]
            out += [p + rest for p in PREFIXES if p != own and p + rest != name]
    return list(dict.fromkeys(out))


def rename_onto(names, lands):
    """{name: base name} for the `names` that do not land as they are (`lands(name)` False) but land under exactly
    one other prefix."""
    renamed = {}
    for name in names:
        if lands(name):
            continue
        found = [other for other in other_names(name) if lands(other)]
        if len(found) == 1:
            renamed[name] = found[0]
    return renamed


def common_tail(a, b):
    """How many trailing dotted parts two names share ('model.layers.0.q' and 'x.layers.0.q': 3)."""
    pa, pb = a.split("."), b.split(".")
    n = 0
    while n < min(len(pa), len(pb)) and pa[-1 - n] == pb[-1 - n]:
        n += 1
    return n


def differing_prefixes(a, b):
    """The dotted prefixes two names differ by, their common tail removed: ('model.language_model.', 'model.')."""
    n = common_tail(a, b)
    return tuple("".join(f"{p}." for p in parts[: len(parts) - n]) for parts in (a.split("."), b.split(".")))


def nearest(name, candidates):
    """The candidate closest to `name`: the most trailing dotted parts in common, then difflib's ratio among those
    (a wrong prefix keeps the tail; a typo keeps most of it)."""
    import difflib

    if not candidates:
        return None
    scored = [(common_tail(name, c), c) for c in candidates]
    best = max(s for s, _ in scored)
    tied = [c for s, c in scored if s == best][:200]
    return max(tied, key=lambda c: (difflib.SequenceMatcher(None, name, c).ratio(), c))
