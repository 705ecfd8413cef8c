"""whiten (the default): SVD-LLM's truncation-aware whitening. S S^T = X^T X (damped), SVD of W S.

Dropping sigma_i costs exactly sigma_i^2 of calibration output error, so the truncation is the calibration
output-error optimum (EoRA's eigenspace projection is the same optimum).
"""

from .base import Method


def whiten_weighting(stats, damp, consume=False):
    """The whitening of the input statistics; `consume` builds it in the statistics' own storage (which is then
    gone): the Gram matrix of a wide layer is the largest thing in memory, and this saves two copies of it."""
    from ..core.decompose import whitening

    return whitening(stats.take_gram() if consume else stats.gram, damp)


def _weighting(stats, config, importance=None):
    from ..core.stats import PairedStats

    # paired statistics are read again by the anchored fit, so their Gram matrix is not consumed
    return whiten_weighting(stats, config.damp, consume=not isinstance(stats, PairedStats))


METHOD = Method("whiten", "truncation-aware whitening (SVD-LLM): the calibration output-error optimum", _weighting,
                order=0, whitened=True)
