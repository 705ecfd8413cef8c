"""asvd (ASVD, Yuan et al. 2023): per-input-channel scale mean|x|^alpha, SVD of W diag(scale)."""

from .base import Method


def asvd_weighting(stats, alpha):
    from ..core.decompose import Weighting

    # ASVD adds a small epsilon so that dead channels stay invertible.
    scale = stats.mean_abs.pow(alpha) + 1e-6
    return Weighting(right=scale, right_inv=1.0 / scale, info={"alpha": alpha})


METHOD = Method("asvd", "activation-aware SVD (ASVD): per-channel scale mean|x|^alpha",
                lambda stats, config, importance=None: asvd_weighting(stats, config.alpha), order=2, abs_sums=True,
                uses_alpha=True)
