"""Combine methods: a registry, one file per family. A method is a function
`method(name, entries, rank=None, energy=None, density=0.5, seed=0) -> (B2, A2, energy_kept)` giving flat factors of
the combined delta of one module (entries: [(Module or None, weight)]); lorakit.core.algebra.combine_module does the
rest (shape checks, DoRA, bias deltas). Adding a method: a file here defining the function, and its row below.

Torch-free at import: the CLI takes its choices and help from this table.
"""

import importlib

from ..errors import LorakitError

# name -> (module in this package, whether it takes --rank/--energy, what it does); the order is --help's
METHODS = {
    "cat": ("exact", False, "concatenated factors: the exact sum, rank = sum of ranks (no truncation)"),
    "linear": (
        "exact",
        True,
        "the exact weighted sum of the deltas, optionally truncated optimally (--rank/--energy)",
    ),
    "svd": ("exact", True, "the weighted sum truncated optimally; default rank: the largest input rank"),
    "ties": (
        "sparse",
        True,
        "TIES: trim to --density by magnitude, elect signs, disjoint mean; re-factorized",
    ),
    "dare_linear": ("sparse", True, "DARE: random drop (1 - --density, seeded), rescale, sum; re-factorized"),
    "dare_ties": ("sparse", True, "DARE drop, then TIES sign election; re-factorized"),
    "magnitude_prune": ("sparse", True, "trim each delta to --density by magnitude, sum; re-factorized"),
}

USES_DENSITY = tuple(n for n, row in METHODS.items() if row[0] == "sparse")  # what --density sets
USES_SEED = ("dare_linear", "dare_ties")  # DARE's random drop: the only randomness


def get_method(name, rank=None, energy=None):
    """The method's function, after checking that it takes the rank rule given."""
    if name not in METHODS:
        raise LorakitError(f"unknown method '{name}' (choose from {', '.join(METHODS)})")
    module, truncates, _ = METHODS[name]
    if not truncates and (rank is not None or energy is not None):
        raise LorakitError(
            f"{name} is exact: --rank/--energy apply to "
            f"{', '.join(n for n, row in METHODS.items() if row[1])}"
        )
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
