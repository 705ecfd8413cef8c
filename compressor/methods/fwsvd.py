"""fwsvd (FWSVD, Hsu et al. 2022): Fisher importance, the per-sample squared gradients of the LM loss summed per
row of the weight as the paper writes it (y = xW, so one importance per input feature; core/fisher.py)."""

from .base import Method


def fisher_weighting(importance):
    """diag(sqrt(I)) on the input side, floored so that it stays invertible."""
    import torch

    from ..core.decompose import Weighting

    scale = importance.to(torch.float64).sqrt()
    scale = scale.clamp_min(1e-6 * float(scale.max()) if scale.max() > 0 else 1.0)
    return Weighting(right=scale, right_inv=1.0 / scale, info={"fisher_max_over_min": float(scale.max() / scale.min())})


METHOD = Method("fwsvd", "Fisher-weighted SVD (FWSVD); needs backward passes over the whole model, memory as in "
                "training on one window", lambda stats, config, importance=None: fisher_weighting(importance),
                order=4, per_layer=True, gradients=True)
