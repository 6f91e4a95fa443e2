"""Token embeddings and the output head: the one rule for which base tensors they are."""

EMBEDDING_NAMES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")
HEAD = "lm_head.weight"


def is_embedding(weight_name):
    """Whether a base tensor name is a token embedding (the one rule: merge's tied embeddings, extract's kinds)."""
    return weight_name.endswith(EMBEDDING_NAMES)
