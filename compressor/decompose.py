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
    right: torch.Tensor | None = None  # S: (n, n) or diagonal (n,), float64
    right_inv: torch.Tensor | None = None
    basis: torch.Tensor | None = None  # whitening kept in eigen form: S = Q diag(root), S^-1 = diag(1/root) Q^T
    root: torch.Tensor | None = None
    row: torch.Tensor | None = None  # (m,), float64, positive
    info: dict = field(default_factory=dict)

    def times_right(self, matrix):
        """matrix @ S"""
        if self.basis is not None:
            return (matrix @ self.basis) * self.root
        if self.right is None:
            return matrix
        return matrix * self.right if self.right.dim() == 1 else matrix @ self.right

    def times_right_inv(self, matrix):
        """matrix @ S^-1"""
        if self.basis is not None:
            return (matrix / self.root) @ self.basis.T
        if self.right_inv is None:
            return matrix
        return matrix * self.right_inv if self.right_inv.dim() == 1 else matrix @ self.right_inv

    def times_gram_inverse(self, matrix):
        """matrix @ (S S^T)^-1, for a whitening"""
        return ((matrix @ self.basis) / self.root.square()) @ self.basis.T


@dataclass
class Factors:
    up: torch.Tensor  # (m, r), float64
    down: torch.Tensor  # (r, n), float64
    sigma: torch.Tensor  # full spectrum of the weighted matrix, float64, descending


def whitening(gram, damp):
    """Weighting with S S^T = G + damp * mean(diag G) * I, from a float64 eigendecomposition, in eigen form.

    Never Cholesky plus an explicit inverse: that fails on the rank-deficient Grams of few calibration tokens
    or dead channels (SVD-LLM issues #6/#7). The relative damping keeps S^-1 bounded. `gram` is damped in place
    (pass a matrix you no longer need: InputStats.gram is a fresh one, InputStats.take_gram() the statistics'
    own storage).
    """
    gram = gram.to(torch.float64)
    n = gram.shape[0]
    scale = torch.diagonal(gram).mean().item()
    if not scale > 0:  # an input that is always zero: nothing the layer does reaches its output
        ones = torch.ones(n, dtype=torch.float64, device=gram.device)
        return Weighting(basis=torch.eye(n, dtype=torch.float64, device=gram.device), root=ones,
                         info={"damp": damp, "floor": 0.0, "damped_directions": n, "dead": True})
    floor = damp * scale
    torch.diagonal(gram).add_(floor)
    eigenvalues, vectors = torch.linalg.eigh(gram)
    del gram
    # Directions whose own variance is below the damping floor are mostly damping: worth knowing in the report.
    damped = int((eigenvalues < 2 * floor).sum())
    root = eigenvalues.clamp_min(floor).sqrt()  # round-off can leave tiny negatives
    return Weighting(basis=vectors, root=root, info={"damp": damp, "floor": floor, "damped_directions": damped})


def _fix_signs(u, vh):
    # Singular vectors are defined up to sign: make each column's largest entry positive, for byte-identical output.
    index = u.abs().argmax(0)
    signs = torch.sign(u[index, torch.arange(u.shape[1], device=u.device)])
    signs[signs == 0] = 1
    return u * signs, vh * signs[:, None]


def factorize(weight, weighting, rank, svd_dtype=torch.float32):
    """Rank-`rank` factors of `weight` (m x n) under `weighting`; the SVD runs in `svd_dtype` (float32 or better)."""
    w = weight.to(torch.float64)
    m = w if weighting.row is None else weighting.row[:, None] * w
    m = weighting.times_right(m)
    u, s, vh = torch.linalg.svd(m.to(svd_dtype), full_matrices=False)
    u, vh = _fix_signs(u.to(torch.float64), vh.to(torch.float64))
    s = s.to(torch.float64)
    root = s[:rank].sqrt()
    up = u[:, :rank] * root
    down = root[:, None] * vh[:rank]
    if weighting.row is not None:
        up = up / weighting.row[:, None]
    return Factors(up=up, down=weighting.times_right_inv(down), sigma=s)


def whitened_error(weight, approx, weighting):
    """output_error through a whitening of G instead of G itself: ||D X||^2 = ||D S||^2 - floor ||D||^2."""
    if weighting.info.get("dead"):
        return 0.0, 0.0
    floor = weighting.info["floor"]
    w = weight.to(torch.float64)
    delta = w - approx.to(torch.float64)

    def energy(d):  # by blocks of rows: a wide layer's full products would be the peak of a streamed run
        return sum(float(weighting.times_right(rows).square().sum()) - floor * float(rows.square().sum())
                   for rows in d.split(256))

    return max(energy(delta), 0.0), energy(w)


def output_error(weight, approx, gram):
    """(sum ||(W - W') x||^2, sum ||W x||^2) over the calibration tokens, from the Gram matrix.

    Both are computed from W - W' and W directly (no cancellation), so float32 is accurate to ~1e-6 relative.
    """
    w = weight.to(torch.float32)
    delta = w - approx.to(torch.float32)
    gram = gram.to(torch.float32)
    return float(((delta @ gram) * delta).sum(dtype=torch.float64)), float(((w @ gram) * w).sum(dtype=torch.float64))


# --- the methods' weightings -------------------------------------------------------------------------------------


def whiten_weighting(stats, damp, consume=False):
    """The whitening of the input statistics; `consume` builds it in the statistics' own storage (which is then
    gone): the Gram matrix of a wide layer is the largest thing in memory, and this saves two copies of it."""
    return whitening(stats.take_gram() if consume else stats.gram, damp)


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


# --- anchored fitting: the compressed block sees shifted inputs x' but should reproduce W x -----------------------


def anchored_target(weight, stats, weighting):
    """W* = W C G'^-1, the best full-rank map of the shifted inputs onto the original outputs W x
    (C = sum x x'^T, G' = sum x' x'^T damped as in `weighting`, whose right factor S' has S' S'^T = G').

    ||W X - W' X'||^2 = ||W X - W* X'||^2 (irreducible) + ||(W* - W') S'||^2, so the best rank-r W' is the
    whitened truncation of W*: `factorize(W*, weighting, r)` (AA-SVD's anchored objective, in closed form).
    """
    return weighting.times_gram_inverse(weight.to(torch.float64) @ stats.cross)


def refit_up(weight, down, stats, damp):
    """With `down` fixed, the up factor that best reproduces the original outputs: argmin_A ||W X - A down X'||,
    A = W C down^T (down G' down^T)^-1 (SVD-LLM's closed-form update, anchored to the original stream)."""
    down = down.to(torch.float64)
    gram = down @ stats.gram @ down.T
    gram += damp * torch.diagonal(gram).mean() * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram, (weight.to(torch.float64) @ stats.cross @ down.T).T).T


def anchored_error(weight, approx, stats, name):
    """(||W X - W' X'||^2, ||W X||^2) over the calibration tokens, from C, G' and the recorded output energy."""
    w, a = weight.to(torch.float64), approx.to(torch.float64)
    reference = stats.output_energy[name]
    err = reference - 2 * float((w @ stats.cross * a).sum()) + float((a @ stats.gram * a).sum())
    return max(err, 0.0), reference
