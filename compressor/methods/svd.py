"""svd: plain truncated SVD of W, the baseline every paper reports."""

from .base import Method


def identity_weighting():
    from ..core.decompose import Weighting

    return Weighting()


METHOD = Method("svd", "plain truncated SVD of the weights (the baseline)", lambda stats, config, importance=None:
                identity_weighting(), order=1)
