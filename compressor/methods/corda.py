"""corda (CorDA, Yang et al. 2024; PEFT's instruction-previewed mode): SVD of W times the input covariance C itself
(not its square root, which is what makes whitening output-optimal), top components kept."""

from .base import Method


def corda_weighting(stats, damp=0.01, tolerance=0.05):
    """The covariance C = X^T X / N, damped as PEFT does (start at 1% of mean(diag C) and double until
    ||C_d C_d^-1 - I|| < tolerance)."""
    import torch

    from ..core.decompose import Weighting

    cov = stats.gram / max(stats.tokens, 1)
    n = cov.shape[0]
    eye = torch.eye(n, dtype=torch.float64, device=cov.device)
    scale = torch.diagonal(cov).mean().item() or 1.0
    for _ in range(40):
        damped = cov + damp * scale * eye
        inverse = torch.linalg.inv(damped)
        if torch.linalg.matrix_norm(damped @ inverse - eye).item() < tolerance:
            break
        damp *= 2
    return Weighting(right=damped, right_inv=inverse, info={"damp": damp})


METHOD = Method("corda", "CorDA: SVD of W times the input covariance, top components kept",
                lambda stats, config, importance=None: corda_weighting(stats), order=3)
