"""What a method is: its name, how it weights the matrix it factorizes, and what it needs."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Method:
    name: str
    summary: str  # one line, shown by --help
    weighting: Callable[..., Any]  # weighting(stats, config, importance) -> core.decompose.Weighting
    order: int  # place in listings; the default method first
    per_layer: bool = False  # the weighting depends on the layer itself (its gradients), not only on its input
    gradients: bool = False  # needs a backward pass over the whole model first (a causal LM head)
    abs_sums: bool = False  # needs the per-channel sums of |x| besides the Gram matrix
    whitened: bool = False  # factors from the whitening: errors measured through it; anchor, refit and the
    #                         Fisher allocation (measured with it: BENCHMARKS.md) are defined for it
    uses_alpha: bool = False  # --alpha applies
