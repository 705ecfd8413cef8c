"""How many components each matrix keeps.

`--ratio R` is the fraction of the targeted layers' parameters that is KEPT. An m x n matrix stored as a rank-r
pair holds r(m + n) parameters, so the uniform rule gives r = floor(R m n / (m + n)); a rank that reaches the
break-even floor(m n / (m + n)) saves nothing, and that layer stays dense.
"""

from fractions import Fraction

RATIO_DEFINITION = "fraction of the targeted linear layers' parameters that is kept (1 - ratio is removed)"


def _exact(ratio):
    # Fraction(repr(0.3)) == 3/10: floor() must not lose a rank to binary rounding of the ratio.
    return Fraction(repr(float(ratio)))


def break_even_rank(m, n):
    return (m * n) // (m + n)


def uniform_rank(m, n, ratio):
    """Rank for keep-fraction `ratio` of an m x n matrix, at least 1; None when the layer should stay dense."""
    rank = max(1, int(_exact(ratio) * m * n / (m + n)))
    return None if rank >= break_even_rank(m, n) else rank


def factor_params(m, n, rank):
    return m * n if rank is None else rank * (m + n)
