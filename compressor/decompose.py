"""The decomposition kernel every method shares: SVD of a weighted matrix, weights folded back into the factors.

For a layer y = W x (W is m x n) a method picks a weighting: an optional positive row scale d (m,) and an
optional right transform S (n x n, or a diagonal (n,)) with its inverse. Then

    M = diag(d) W S = U Sigma V^T,   up = diag(d)^-1 U_r Sigma_r^1/2,   down = Sigma_r^1/2 V_r^T S^-1

so up @ down is the rank-r approximation of W that is optimal for || diag(d) (W - W') S ||_F.

    svd     S = I                      plain truncated SVD (Eckart-Young in weight space)
    whiten  S S^T = X^T X             SVD-LLM: dropping sigma_i costs exactly sigma_i^2 of calibration output
                                       error sum ||(W - W') x||^2, the output-error optimum (EoRA's projection too)
    asvd    S = diag(mean|x|^alpha)   ASVD: per-channel activation scale
    corda   S = C = X^T X / N          CorDA: the covariance itself, a different weighting from whiten
    fwsvd   S = diag(sqrt(I))          FWSVD: Fisher importance per input feature (see fisher.py)
"""

from dataclasses import dataclass, field

import torch


@dataclass
class Weighting:
    right: torch.Tensor | None = None  # (n, n) or diagonal (n,), float64
    right_inv: torch.Tensor | None = None
    row: torch.Tensor | None = None  # (m,), float64, positive
    info: dict = field(default_factory=dict)


@dataclass
class Factors:
    up: torch.Tensor  # (m, r), float64
    down: torch.Tensor  # (r, n), float64
    sigma: torch.Tensor  # full spectrum of the weighted matrix, float64, descending


def eigen_sqrt(gram, damp):
    """S with S S^T = G + damp * mean(diag G) * I, and S^-1, from a float64 eigendecomposition.

    Never Cholesky plus an explicit inverse: that fails on the rank-deficient Grams of few calibration tokens
    or dead channels (SVD-LLM issues #6/#7). The relative damping keeps S^-1 bounded.
    """
    gram = gram.to(torch.float64)
    n = gram.shape[0]
    scale = torch.diagonal(gram).mean().item()
    if not scale > 0:  # an input that is always zero: any weighting is as good as none
        eye = torch.eye(n, dtype=torch.float64, device=gram.device)
        return eye, eye, {"damp": damp, "damped_directions": n}
    floor = damp * scale
    eigenvalues, vectors = torch.linalg.eigh(gram + floor * torch.eye(n, dtype=torch.float64, device=gram.device))
    # Directions whose own variance is below the damping floor are mostly damping: worth knowing in the report.
    damped = int((eigenvalues < 2 * floor).sum())
    eigenvalues = eigenvalues.clamp_min(floor)  # round-off can leave tiny negatives
    root = eigenvalues.sqrt()
    return vectors * root, (vectors / root).T, {"damp": damp, "damped_directions": damped}


def _fix_signs(u, vh):
    # Singular vectors are defined up to sign: make each column's largest entry positive, for byte-identical output.
    index = u.abs().argmax(0)
    signs = torch.sign(u[index, torch.arange(u.shape[1], device=u.device)])
    signs[signs == 0] = 1
    return u * signs, vh * signs[:, None]


def _apply_right(matrix, right):
    return matrix * right if right.dim() == 1 else matrix @ right


def factorize(weight, weighting, rank, svd_dtype=torch.float32):
    """Rank-`rank` factors of `weight` (m x n) under `weighting`; the SVD runs in `svd_dtype` (float32 or better)."""
    w = weight.to(torch.float64)
    m = w
    if weighting.row is not None:
        m = weighting.row[:, None] * m
    if weighting.right is not None:
        m = _apply_right(m, weighting.right)
    u, s, vh = torch.linalg.svd(m.to(svd_dtype), full_matrices=False)
    u, vh = _fix_signs(u.to(torch.float64), vh.to(torch.float64))
    s = s.to(torch.float64)
    root = s[:rank].sqrt()
    up = u[:, :rank] * root
    down = root[:, None] * vh[:rank]
    if weighting.row is not None:
        up = up / weighting.row[:, None]
    if weighting.right_inv is not None:
        down = _apply_right(down, weighting.right_inv)
    return Factors(up=up, down=down, sigma=s)


def output_error(weight, approx, gram):
    """(sum ||(W - W') x||^2, sum ||W x||^2) over the calibration tokens, from the Gram matrix.

    Both are computed from W - W' and W directly (no cancellation), so float32 is accurate to ~1e-6 relative.
    """
    w = weight.to(torch.float32)
    delta = w - approx.to(torch.float32)
    gram = gram.to(torch.float32)
    return float(((delta @ gram) * delta).sum(dtype=torch.float64)), float(((w @ gram) * w).sum(dtype=torch.float64))


# --- the methods' weightings -------------------------------------------------------------------------------------


def whiten_weighting(stats, damp):
    root, root_inv, info = eigen_sqrt(stats.gram, damp)
    return Weighting(right=root, right_inv=root_inv, info=info)


def asvd_weighting(stats, alpha):
    # ASVD adds a small epsilon so that dead channels stay invertible.
    scale = stats.mean_abs.pow(alpha) + 1e-6
    return Weighting(right=scale, right_inv=1.0 / scale, info={"alpha": alpha})


def corda_weighting(stats, damp=0.01, tolerance=0.05):
    """CorDA: the covariance C = X^T X / N itself, damped as PEFT does (start at 1% of mean(diag C) and double
    until ||C_d C_d^-1 - I|| < tolerance)."""
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


def fisher_weighting(importance):
    """FWSVD: diag(sqrt(I)) on the input side (see fisher.py for the orientation), floored so it stays invertible."""
    scale = importance.to(torch.float64).sqrt()
    scale = scale.clamp_min(1e-6 * float(scale.max()) if scale.max() > 0 else 1.0)
    return Weighting(right=scale, right_inv=1.0 / scale, info={"fisher_max_over_min": float(scale.max() / scale.min())})


def identity_weighting():
    return Weighting()
