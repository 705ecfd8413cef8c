"""Truncated SVDs of LoRA updates, and the balanced factors that store them.

A LoRA module's update is dW = s·B·A (B is m x r, A is r x n, s = alpha/r or alpha/sqrt(r)). Its SVD follows from
the r x r "core" without ever forming the m x n product (LoRA-Squeeze's memory-efficient variant):

    B = Q_B R_B,  A^T = Q_A R_A  (thin QRs)   =>   s·B·A = Q_B (s R_B R_A^T) Q_A^T,   s R_B R_A^T = U_c S V_c^T
    =>  dW = (Q_B U_c) S (Q_A V_c)^T  is an exact SVD: the singular values of dW are those of the r x r core.

Only the R factors are needed. R is computed as the Cholesky factor of the float64 Gram matrix B^T B (CholeskyQR:
R^T R = B^T B is exactly the R of B's QR). Products of float32 (or bf16/fp16) numbers are exact in float64, so the
Gram is exact up to float64 summation and the singular values come out to ~1e-16·cond(B)·sigma_1, better than a
float32 Householder QR (~6e-8·cond·sigma_1) and several times faster on CPU (LAPACK's QR of a tall m x 64 matrix
took 4x the float64 Gram's time in float32, 25x in float64, on the development machine). A Gram that is not
numerically positive definite (B with dependent columns, an untrained B = 0, m < r) uses its eigendecomposition,
another square root R (any R with R^T R = G works in the core), with eigenvalues below the float64 rounding of the
largest set to zero: directions of B or A below ~2e-7 of their largest are noise there, and dropping them changes
the update by about the float32 rounding of its entries (relative ~1e-7).

The Q factors are never formed either: with V_k = Q_A V_c[:, :k], dW V_k = s·B·(R_A^T V_c[:, :k]) = U_k S_k, and
likewise dW^T U_k = s·A^T·(R_B^T U_c[:, :k]) = V_k S_k. Each kept component i is then stored balanced:
B'_i = (U_i sigma_i)/sqrt(sigma_i), A'_i = (V_i sigma_i)/sqrt(sigma_i), with sigma_i taken as the measured norms
of the two vectors (equal to sigma_i in exact arithmetic; using them keeps a numerically-zero component bounded).
s'·B'·A' is then the rank-k truncation of dW for any new scale s'. Each column's largest entry is made positive
(singular vectors are defined up to sign), so the same input always gives the same bytes.

Randomized SVD (Halko, Martinsson & Tropp 2011, Alg. 4.4 with QR re-orthonormalisation between power iterations)
works on any operator x -> dW x: a factor pair, or a dense weight delta. Dense exact SVD is for dense deltas only.
"""

import zlib
from dataclasses import dataclass

import torch

F64 = torch.float64
NEGLIGIBLE = 1e-9  # a component below NEGLIGIBLE·sigma_1 is stored as zeros: it is below any storage precision


class NonFinite(ValueError):
    """The factors hold NaN or Inf (seen in their r x r Gram matrices, which is cheaper than checking every entry)."""


def as_float64(b):
    """B (m x r) in float64, stored transposed (r x m contiguous, returned as its m x r view): B^T B and B @ X on
    this layout are the fast ones for a tall, thin B (~1.3x and ~2x on the development CPU)."""
    if b.dtype == F64 and b.T.is_contiguous():
        return b
    return b.T.contiguous().to(F64).T  # transposed in its own dtype first: fewer bytes to shuffle


def gram_root(gram):
    """An r x r matrix R with R^T R = gram (float64): the R factor of the QR via Cholesky, or (for a numerically
    singular Gram) a square root from its eigendecomposition with the directions below the float64 noise floor
    set to zero: their square roots would be ~1e-8-relative noise, not information."""
    floor = 4 * len(gram) * torch.finfo(F64).eps * float(gram.diagonal().max()) if len(gram) else 0.0
    lower, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0 and bool(torch.isfinite(lower).all()) and float(lower.diagonal().square().min()) > floor:
        return lower.T
    values, vectors = torch.linalg.eigh(gram)
    values = torch.where(values > floor, values, torch.zeros_like(values))
    return values.sqrt()[:, None] * vectors.T


def _balanced(y, z, scale_out):
    """Factors (B', A') with s'·B'·A' = sum_i y_i z_i^T / sigma_i, from y_i = U_i sigma_i and z_i = V_i sigma_i.
    Also returns the per-component multipliers (B' = y * left, A' = (z * right)^T)."""
    a = torch.linalg.vector_norm(y, dim=0)
    b = torch.linalg.vector_norm(z, dim=0)
    top = float(torch.sqrt(a[0] * b[0])) if len(a) else 0.0
    keep = (a > 0) & (b > 0) & (torch.sqrt(a * b) > NEGLIGIBLE * top)
    a, b = torch.where(keep, a, 1.0), torch.where(keep, b, 1.0)
    # column norms of B' and rows of A' both become sqrt(sigma_i / |s'|): balanced
    left = a.pow(-0.75) * b.pow(0.25) * keep / abs(scale_out) ** 0.5
    right = a.pow(0.25) * b.pow(-0.75) * keep / abs(scale_out) ** 0.5
    if scale_out < 0:
        left = -left
    up = y * left
    if up.shape[1]:
        # Singular vectors are defined up to sign: make each column's largest-magnitude entry positive (and flip
        # the matching row of A'), so that the same input gives the same bytes whatever sign LAPACK picked.
        signs = torch.sign(up[up.abs().argmax(0), torch.arange(up.shape[1])])
        signs[signs == 0] = 1
        left, right, up = left * signs, right * signs, up * signs
    return up, (z * right).T, left, right


def _pad(up, down, rank):
    extra = rank - up.shape[1]
    if extra > 0:
        up = torch.cat([up, up.new_zeros(up.shape[0], extra)], 1)
        down = torch.cat([down, down.new_zeros(extra, down.shape[1])], 0)
    return up, down


@dataclass
class FactorSVD:
    """The exact SVD of s·B·A in factor space. Holds only r x r matrices; `factors` takes B and A again."""

    sigma: torch.Tensor  # (r,) float64, descending: every singular value of the update
    total: float  # ||s·B·A||_F^2 = sum sigma^2
    _left: torch.Tensor  # s·R_A^T V_c (r x r): U_k S_k = B @ _left[:, :k]
    _right: torch.Tensor  # s·R_B^T U_c (r x r): V_k S_k = A^T @ _right[:, :k]
    exact = True

    @classmethod
    def of(cls, b, a, scale):
        b64, a64 = as_float64(b), a.to(F64)
        gram_b, gram_a = b64.T @ b64, a64 @ a64.T
        if not (bool(gram_b.isfinite().all()) and bool(gram_a.isfinite().all())):
            raise NonFinite("the factors contain NaN or Inf values")
        root_b, root_a = gram_root(gram_b), gram_root(gram_a)
        u, sigma, vh = torch.linalg.svd(scale * (root_b @ root_a.T))
        return cls(sigma=sigma, total=float((sigma * sigma).sum()), _left=scale * (root_a.T @ vh.T),
                   _right=scale * (root_b.T @ u))

    def factors(self, b, a, rank, scale_out):
        """(B', A') in float64 with scale_out·B'·A' = the rank-`rank` truncation (zero-padded beyond r)."""
        up, down, _, _ = self.maps(b, a, rank, scale_out)
        return _pad(up, down, rank)

    def maps(self, b, a, rank, scale_out):
        """(B', A', W, L) with B' = B @ W and A' = L @ A (no padding): the new factors are linear maps of the old
        ones, which is what lets an optimizer's state follow them (see squeeze_callback)."""
        k = min(rank, len(self.sigma))
        b64, a64 = as_float64(b), a.to(F64)
        # Both products with the long side contiguous and last (b64 is stored transposed): ~4x faster for A.
        up, down, left, right = _balanced((self._left[:, :k].T @ b64.T).T, (self._right[:, :k].T @ a64).T, scale_out)
        return up, down, self._left[:, :k] * left, (self._right[:, :k] * right).T


@dataclass
class TruncatedSVD:
    """A (possibly randomized) truncated SVD held explicitly: U (m x l), sigma (l,), Vh (l x n)."""

    sigma: torch.Tensor  # (l,) float64, descending
    total: float  # ||dW||_F^2, exact (not only the part the sketch caught)
    u: torch.Tensor
    vh: torch.Tensor
    exact: bool

    def factors(self, b, a, rank, scale_out):
        k = min(rank, len(self.sigma))
        sigma = self.sigma[:k].to(self.u.dtype)
        up, down, _, _ = _balanced((self.u[:, :k] * sigma).to(F64), (self.vh[:k].T * sigma).to(F64), scale_out)
        return _pad(up, down, rank)


class FactorOperator:
    """dW = s·B·A as an operator (float64), for the randomized SVD of a factor pair."""

    def __init__(self, b, a, scale):
        self.b, self.a, self.scale = b.to(F64), a.to(F64), scale
        self.shape = (self.b.shape[0], self.a.shape[1])
        self.dtype = F64

    def matmul(self, x):
        return self.scale * (self.b @ (self.a @ x))

    def rmatmul(self, y):
        return self.scale * (self.a.T @ (self.b.T @ y))

    def total(self):
        # ||s B A||_F^2 = s^2 <B^T B, A A^T>, exact without forming the product
        return float(self.scale**2 * ((self.b.T @ self.b) * (self.a @ self.a.T)).sum())


class DenseOperator:
    """A dense delta (m x n) as an operator, in float32 (float64 would double the time and memory)."""

    def __init__(self, delta):
        self.delta = delta.to(torch.float32)
        self.shape = tuple(self.delta.shape)
        self.dtype = torch.float32

    def matmul(self, x):
        return self.delta @ x.to(self.dtype)

    def rmatmul(self, y):
        return self.delta.T @ y.to(self.dtype)

    def total(self):
        return float(self.delta.to(F64).square().sum())


def module_seed(seed, name):
    """A per-module seed that depends on the module's name, not on its position or on which modules are run."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def _orthonormal(y):
    return torch.linalg.qr(y)[0]


def randomized_svd(op, size, power_iters, seed, keep=None):
    """Randomized SVD of `op` with a sketch of `size` columns (target rank + oversampling) and `power_iters` power
    iterations, each re-orthonormalised by QR. Returns a TruncatedSVD of at most `keep` components."""
    m, n = op.shape
    size = max(1, min(size, m, n))
    generator = torch.Generator().manual_seed(seed)
    omega = torch.randn(n, size, generator=generator, dtype=F64).to(op.dtype)
    q = _orthonormal(op.matmul(omega))
    for _ in range(power_iters):
        q = _orthonormal(op.rmatmul(q))
        q = _orthonormal(op.matmul(q))
    small = op.rmatmul(q).T.to(F64)  # Q^T dW, size x n
    u_small, sigma, vh = torch.linalg.svd(small, full_matrices=False)
    keep = size if keep is None else min(keep, size)
    u = q.to(F64) @ u_small[:, :keep]
    return TruncatedSVD(sigma=sigma[:keep], total=op.total(), u=u.to(op.dtype), vh=vh[:keep].to(op.dtype),
                        exact=False)


def dense_svd(delta, keep=None):
    """Exact SVD of a dense delta (float32 LAPACK): O(m n min(m, n)); the slow path kept for --algorithm exact."""
    d = delta.to(torch.float32)
    u, sigma, vh = torch.linalg.svd(d, full_matrices=False)
    keep = len(sigma) if keep is None else min(keep, len(sigma))
    return TruncatedSVD(sigma=sigma[:keep].to(F64), total=float(d.to(F64).square().sum()), u=u[:, :keep],
                        vh=vh[:keep], exact=True)


def stored_error(apply, total, up, down, scale_out):
    """||dW - s'·B'·A'||_F^2 for the factors as stored (after the cast), in float64 without forming m x n:
    ||dW||^2 + ||s'B'A'||^2 - 2 s' <dW, B'A'>, with apply(X) = dW @ X and total = ||dW||^2. Cancellation limits
    it to ~1e-8 relative: far below the rounding of any storage dtype."""
    up64, down64 = up.to(F64), down.to(F64)
    own = scale_out**2 * float(((up64.T @ up64) * (down64 @ down64.T)).sum())
    cross = scale_out * float((apply(down64.T).to(F64) * up64).sum())
    return max(total + own - 2 * cross, 0.0)
