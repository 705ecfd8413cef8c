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

Each method's weighting is in methods/; this module is the kernel they share.
"""

import math
from dataclasses import dataclass, field

import torch

from ..errors import overflow


@dataclass
class Weighting:
    right: torch.Tensor | None = None  # S: (n, n) or diagonal (n,), float64
    right_inv: torch.Tensor | None = None
    gram: torch.Tensor | None = None  # whiten: S S^T itself (the damped Gram); S is built from it only if needed
    basis: torch.Tensor | None = None  # whitening in eigen form: S = Q diag(root), S^-1 = diag(1/root) Q^T
    root: torch.Tensor | None = None
    row: torch.Tensor | None = None  # (m,), float64, positive
    info: dict = field(default_factory=dict)

    def _eigen_root(self):
        # Only layers wider out than in need S itself (see factorize): build it once, then drop the Gram.
        if self.basis is None:
            eigenvalues, self.basis = torch.linalg.eigh(self.gram)
            self.root = eigenvalues.clamp_min(self.info["floor"]).sqrt()  # round-off can leave tiny negatives
            self.gram = None
        return self.basis, self.root

    def times_right(self, matrix):
        """matrix @ S"""
        if self.gram is not None or self.basis is not None:
            basis, root = self._eigen_root()
            return (matrix @ basis) * root
        if self.right is None:
            return matrix
        return matrix * self.right if self.right.dim() == 1 else matrix @ self.right

    def times_right_inv(self, matrix):
        """matrix @ S^-1"""
        if self.gram is not None or self.basis is not None:
            basis, root = self._eigen_root()
            return (matrix / root) @ basis.T
        if self.right_inv is None:
            return matrix
        return matrix * self.right_inv if self.right_inv.dim() == 1 else matrix @ self.right_inv

    def times_square(self, matrix):
        """matrix @ S S^T, without forming S where S S^T is known (a whitening's damped Gram)"""
        if self.gram is not None:
            return matrix @ self.gram
        if self.basis is not None:
            return ((matrix @ self.basis) * self.root.square()) @ self.basis.T
        if self.right is None:
            return matrix
        return matrix * self.right.square() if self.right.dim() == 1 else (matrix @ self.right) @ self.right.T

    def times_gram_inverse(self, matrix):
        """matrix @ (S S^T)^-1, for a whitening"""
        basis, root = self._eigen_root()
        return ((matrix @ basis) / root.square()) @ basis.T


@dataclass
class Factors:
    up: torch.Tensor  # (m, r), float64
    down: torch.Tensor  # (r, n), float64
    sigma: torch.Tensor  # full spectrum of the weighted matrix, float64, descending


def whitening(gram, damp):
    """Weighting with S S^T = G + damp * mean(diag G) * I (float64), S taken from an eigendecomposition when needed.

    Never Cholesky plus an explicit inverse: that fails on the rank-deficient Grams of few calibration tokens
    or dead channels (SVD-LLM issues #6/#7). The relative damping keeps S^-1 bounded. `gram` is damped in place
    (pass a matrix you no longer need: InputStats.gram is a fresh one, InputStats.take_gram() the statistics'
    own storage).
    """
    gram = gram.to(torch.float64)
    n = gram.shape[0]
    scale = torch.diagonal(gram).mean().item()
    if not math.isfinite(scale):  # NaN would pass for a dead input below (not NaN > 0)
        raise overflow("calibration statistics")
    if not scale > 0:  # an input that is always zero: nothing the layer does reaches its output
        ones = torch.ones(n, dtype=torch.float64, device=gram.device)
        return Weighting(basis=torch.eye(n, dtype=torch.float64, device=gram.device), root=ones,
                         info={"damp": damp, "floor": 0.0, "dead": True})
    floor = damp * scale
    torch.diagonal(gram).add_(floor)
    return Weighting(gram=gram, info={"damp": damp, "floor": floor})


def _fix_signs(up, down):
    # Singular vectors are defined up to sign: make each column's largest entry positive, for byte-identical output.
    index = up.abs().argmax(0)
    signs = torch.sign(up[index, torch.arange(up.shape[1], device=up.device)])
    signs[signs == 0] = 1
    return up * signs, down * signs[:, None]


def _eigen_svd(w, weighting):
    """sigma (descending) of M = W S, and M's left singular vectors U when m <= n (from M M^T = W (S S^T) W^T),
    else its right ones V and M itself (from M^T M): (sigma, U, None, None) or (sigma, None, V, M)."""
    m, n = w.shape
    if m <= n:
        gram, weighted = weighting.times_square(w) @ w.T, None
    else:
        weighted = weighting.times_right(w)
        gram = weighted.T @ weighted
    values, vectors = torch.linalg.eigh(gram)
    sigma, vectors = values.flip(0).clamp_min(0).sqrt(), vectors.flip(1)
    return (sigma, vectors, None, None) if weighted is None else (sigma, None, vectors, weighted)


def factorize(weight, weighting, rank):
    """Rank-`rank` factors of `weight` (m x n) under `weighting`, in float64.

    The SVD of M = diag(d) W S comes from the eigendecomposition of its smaller Gram matrix, M M^T (m x m) or
    M^T M (n x n), in float64: several times faster than an SVD of M, and as accurate as a float32 SVD for
    every singular value above ~1e-8 sigma_1. When m <= n, M M^T = W (S S^T) W^T needs only S S^T, which for a
    whitening is the damped Gram itself: the layers with wide inputs (an MLP's down projection) never pay for
    an eigendecomposition of their input's Gram.
    """
    w = weight.to(torch.float64)
    if weighting.row is not None:
        w = weighting.row[:, None] * w
    sigma, u, v, weighted = _eigen_svd(w, weighting)
    balance = _safe(sigma[:rank].sqrt())  # both factors carry sqrt(sigma_i)
    if u is not None:  # U_r U_r^T W: M's truncation with S cancelled
        up, down = u[:, :rank] * balance, (u[:, :rank].T @ w) / balance[:, None]
    else:  # M V_r V_r^T S^-1
        up, down = (weighted @ v[:, :rank]) / balance, weighting.times_right_inv(v[:, :rank].T) * balance[:, None]
    if weighting.row is not None:
        up = up / weighting.row[:, None]
    up, down = _fix_signs(*_equal_norms(up, down))
    return Factors(up=up, down=down, sigma=sigma)


def _equal_norms(up, down):
    """Rescale each component so that its up column and down row have the same norm; the product is unchanged.
    Balancing by sqrt(sigma) alone left the factors carrying the scale of the statistics: a whitening from N
    tokens scales sigma by sqrt(N), so `up` grew as N^1/4 (3.5x from 1e3 to 1e5 tokens) and `down` shrank as
    much, a risk of overflow or subnormals for factors stored in float16. Equal norms depend on W alone."""
    up_norm, down_norm = up.norm(dim=0), down.norm(dim=1)
    usable = (up_norm > 0) & (down_norm > 0)
    scale = torch.where(usable, (down_norm / torch.where(usable, up_norm, 1)).sqrt(), torch.ones_like(up_norm))
    return up * scale, down / scale[:, None]


def spectrum(weight, weighting, left_vectors=False):
    """The singular values of M = W S (descending, float64) as `factorize` finds them, and, if asked, M's left
    singular vectors (m x min(m, n)). For sigma = 0 those are arbitrary unit vectors (m <= n) or zero (m > n):
    weight them by sigma."""
    w = weight.to(torch.float64)
    sigma, u, v, weighted = _eigen_svd(w if weighting.row is None else weighting.row[:, None] * w, weighting)
    if left_vectors and u is None:
        u = (weighted @ v) / _safe(sigma) * (sigma > 0)
    return sigma, (u if left_vectors else None)


def _safe(scale):
    # Balancing divides by sqrt(sigma_i): leave components with no energy at all unscaled.
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def whitened_error(weight, approx, weighting, sigma=None):
    """output_error through a whitening's damped Gram G + floor I: ||D X||^2 = tr(D (G + floor I) D^T) - floor ||D||^2.

    `sigma`, the spectrum of W S from `factorize(weight, weighting, ...)`, gives ||W X||^2 without a product:
    sum sigma^2 = ||W S||^2."""
    if weighting.info.get("dead"):
        return 0.0, 0.0
    floor = weighting.info["floor"]
    w = weight.to(torch.float64)
    delta = w - approx.to(torch.float64)

    def energy(d):  # by blocks of rows: a wide layer's full products would be the peak of a streamed run
        return sum(float((weighting.times_square(rows) * rows).sum()) - floor * float(rows.square().sum())
                   for rows in d.split(256))

    reference = energy(w) if sigma is None else float(sigma.square().sum()) - floor * float(w.square().sum())
    return max(energy(delta), 0.0), reference


def output_error(weight, approx, gram):
    """(sum ||(W - W') x||^2, sum ||W x||^2) over the calibration tokens, from the Gram matrix.

    Both are computed from W - W' and W directly (no cancellation), so float32 is accurate to ~1e-6 relative.
    """
    w = weight.to(torch.float32)
    delta = w - approx.to(torch.float32)
    gram = gram.to(torch.float32)
    # a sum of squares: clamped at 0, as rounding can take a near-zero error (a layer kept almost whole) below it
    error = max(0.0, float(((delta @ gram) * delta).sum(dtype=torch.float64)))
    return error, max(0.0, float(((w @ gram) * w).sum(dtype=torch.float64)))


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
