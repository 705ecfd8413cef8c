"""The numerics of `lowrank squeeze`: factor-space SVD against a dense SVD, randomized SVD, rank rules, patterns."""

import itertools
import math
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowrank.core.factor_svd import (
    DenseOperator,
    FactorOperator,
    FactorSVD,
    dense_svd,
    module_seed,
    randomized_svd,
    stored_error,
)
from lowrank.errors import UsageError
from lowrank.squeezing.formats import clean_number, pattern_value, peft_patterns
from lowrank.squeezing.ranks import (
    Candidate,
    budget_ranks,
    energy_curve,
    energy_ranks,
    parse_budget,
    rank_for_energy,
    uniform_ranks,
)

F64 = torch.float64


def random_pair(seed, m, n, r, conditioning, degenerate):
    """B (m x r) and A (r x n) with singular values spread over `conditioning` decades; `degenerate` makes B
    rank-deficient (a repeated column and a zero column), as an under-trained LoRA can be."""
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(m, r, generator=g, dtype=F64) * torch.logspace(0, -conditioning, r, dtype=F64)
    a = torch.randn(r, n, generator=g, dtype=F64) / math.sqrt(n)
    if degenerate and r >= 3:
        b[:, 1] = b[:, 0]
        b[:, 2] = 0
    return b, a


def dense_truncation(b, a, scale, k):
    u, s, vh = torch.linalg.svd(scale * b @ a, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k], s


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), m=st.integers(1, 40), n=st.integers(1, 40), r=st.integers(1, 12),
       k_fraction=st.floats(0, 1), scale=st.sampled_from([0.125, 1.0, 2.0, -0.5]),
       scale_out=st.sampled_from([1.0, 0.3, 4.0]), conditioning=st.sampled_from([0, 2, 5]),
       degenerate=st.booleans())
def test_factor_space_svd_equals_the_dense_truncation(seed, m, n, r, k_fraction, scale, scale_out, conditioning,
                                                     degenerate):
    b, a = random_pair(seed, m, n, r, conditioning, degenerate)
    k = max(1, round(k_fraction * r))
    svd = FactorSVD.of(b, a, scale)
    dense = scale * b @ a
    truncated, sigma = dense_truncation(b, a, scale, k)
    norm = float(sigma[0]) if len(sigma) and sigma[0] > 0 else 1.0
    # every singular value of the update (those beyond min(m, n) are zero), to float32 precision of sigma_1: the
    # float64 Gram sets directions of B or A below ~2e-7 of their largest to zero (they are rounding noise)
    found = torch.zeros(r, dtype=F64)
    found[: min(r, len(sigma))] = sigma[:r]
    assert torch.allclose(svd.sigma, found, atol=1e-7 * norm, rtol=0)
    assert svd.total == pytest.approx(float((dense**2).sum()), rel=1e-9, abs=1e-12 * norm**2)
    up, down = svd.factors(b, a, k, scale_out)
    approx = scale_out * up @ down
    # Eckart-Young: a rank-k matrix whose error is exactly the dropped energy IS a best rank-k truncation (this
    # holds even when sigma_k = sigma_k+1 makes the truncation non-unique)
    tail = float((sigma[k:] ** 2).sum())
    assert float(((dense - approx) ** 2).sum()) == pytest.approx(tail, abs=1e-9 * norm**2)
    if len(sigma) > k and sigma[k - 1] - sigma[k] > 1e-3 * norm:  # unique: equal to the dense one
        assert torch.allclose(approx, truncated, atol=1e-7 * norm)
    assert up.shape == (m, k) and down.shape == (k, n)


def test_factors_are_balanced_sign_fixed_and_gauge_free():
    b, a = random_pair(1, 30, 20, 8, 1, False)
    up, down = FactorSVD.of(b, a, 0.5).factors(b, a, 5, 0.25)
    # column i of B' and row i of A' both have norm sqrt(sigma_i / s')
    sigma = FactorSVD.of(b, a, 0.5).sigma[:5]
    assert torch.allclose(up.norm(dim=0), (sigma / 0.25).sqrt(), rtol=1e-10)
    assert torch.allclose(down.norm(dim=1), (sigma / 0.25).sqrt(), rtol=1e-10)
    assert (up[up.abs().argmax(0), torch.arange(5)] > 0).all()
    # the output depends on the update only: B G, G^-1 A (G orthogonal, with sign flips) gives the same factors
    g, _ = torch.linalg.qr(torch.randn(8, 8, dtype=F64, generator=torch.Generator().manual_seed(3)))
    other_up, other_down = FactorSVD.of(-b @ g, g.T @ -a, 0.5).factors(-b @ g, g.T @ -a, 5, 0.25)
    assert torch.allclose(other_up, up, atol=1e-12) and torch.allclose(other_down, down, atol=1e-12)


def test_zero_update_and_padding():
    b, a = torch.zeros(10, 4, dtype=F64), torch.randn(4, 6, dtype=F64)
    svd = FactorSVD.of(b, a, 1.0)
    assert svd.total == 0 and (svd.sigma == 0).all()
    up, down = svd.factors(b, a, 2, 1.0)
    assert not up.any() and not down.any() and torch.isfinite(up).all()
    b, a = random_pair(2, 10, 6, 4, 0, False)
    up, down = FactorSVD.of(b, a, 1.0).factors(b, a, 7, 1.0)  # --allow-pad: zeros beyond the source rank
    assert up.shape == (10, 7) and not up[:, 4:].any() and not down[4:].any()
    assert torch.allclose(up @ down, b @ a, atol=1e-12)


def test_randomized_svd():
    g = torch.Generator().manual_seed(0)
    b = torch.randn(200, 30, generator=g, dtype=F64) * torch.logspace(0, -3, 30, dtype=F64)
    a = torch.randn(30, 150, generator=g, dtype=F64)
    truncated, sigma = dense_truncation(b, a, 1.0, 6)
    op = FactorOperator(b, a, 1.0)
    assert op.total() == pytest.approx(float((sigma**2).sum()), rel=1e-12)
    # a sketch that spans the whole rank-30 range is exact
    full = randomized_svd(op, 30, 0, seed=1, keep=6)
    assert torch.allclose(full.sigma, sigma[:6], rtol=1e-10)
    up, down = full.factors(None, None, 6, 1.0)
    assert torch.allclose(up @ down, truncated, atol=1e-9 * float(sigma[0]))
    # a small sketch with power iterations is near-optimal and reproducible for a seed
    sketch = randomized_svd(op, 6 + 4, 2, seed=5, keep=6)
    up, down = sketch.factors(None, None, 6, 1.0)
    optimal = float((sigma[6:] ** 2).sum()) ** 0.5
    assert float((b @ a - up @ down).norm()) <= 1.05 * optimal
    again = randomized_svd(op, 10, 2, seed=5, keep=6)
    assert torch.equal(again.u, sketch.u) and torch.equal(again.sigma, sketch.sigma)
    assert module_seed(0, "a.q_proj") == module_seed(0, "a.q_proj") != module_seed(0, "a.k_proj")
    # dense deltas: randomized (float32) and exact paths agree with the float64 truth
    delta = (b @ a).to(torch.float32)
    dense = dense_svd(delta, keep=6)
    assert torch.allclose(dense.sigma, sigma[:6], rtol=1e-5)
    rsvd = randomized_svd(DenseOperator(delta), 16, 2, seed=0, keep=6)
    assert torch.allclose(rsvd.sigma, sigma[:6], rtol=1e-3)


def test_stored_error_is_measured_on_the_cast_factors():
    b, a = random_pair(4, 64, 48, 16, 1, False)
    svd = FactorSVD.of(b, a, 2.0)
    up, down = svd.factors(b, a, 5, 2.0)
    for dtype in (torch.float32, torch.bfloat16):
        up_c, down_c = up.to(dtype), down.to(dtype)
        measured = stored_error(lambda x: 2.0 * b @ (a @ x), svd.total, up_c, down_c, 2.0)
        direct = float(((2.0 * b @ a - 2.0 * up_c.to(F64) @ down_c.to(F64)) ** 2).sum())
        assert measured == pytest.approx(direct, rel=1e-6)


def test_energy_rule_has_no_off_by_one():
    # sigma^2 = 0.5, 0.3, 0.2: energy 0.8 is met exactly at k = 2 (kohya's dynamic rules kept one more)
    sigma = [math.sqrt(0.5), math.sqrt(0.3), math.sqrt(0.2)]
    curve = energy_curve(sigma, 1.0)
    assert curve == pytest.approx([0, 0.5, 0.8, 1.0])
    assert rank_for_energy(curve, 0.8) == 2
    assert rank_for_energy(curve, 0.80001) == 3
    assert rank_for_energy(curve, 0.5) == 1 and rank_for_energy(curve, 0.1) == 1
    assert rank_for_energy(curve, 1.0) == 3
    assert energy_curve([0.0, 0.0], 0.0) == [1.0, 1.0, 1.0]  # a zero update keeps everything at any rank
    assert rank_for_energy(energy_curve([1.0, 1.0], 10.0), 0.9) == 2  # never reached: the whole spectrum found


def candidates(specs):
    out = []
    for i, (rank, cost, sigma) in enumerate(specs):
        out.append(Candidate(name=f"m{i}", rank=rank, cost=cost, sigma=sigma, total=sum(s * s for s in sigma),
                             cap=rank))
    return out


def test_uniform_and_energy_rules():
    mods = candidates([(4, 10, [4, 2, 1, 1]), (8, 10, [1] * 8)])
    assert uniform_ranks(mods, 4, False) == [4, 4]
    with pytest.raises(UsageError, match="above the source rank of 1 module"):
        uniform_ranks(mods, 6, False)
    assert uniform_ranks(mods, 6, True) == [6, 6]
    assert energy_ranks(mods, 0.9, 1) == [2, 8]  # sigma^2 16, 4, 1, 1: 20/22 >= 0.9 at k = 2
    assert energy_ranks(mods, 0.5, 3) == [3, 4]  # the floor applies
    mods[1].cap = 5  # --max-rank 5
    assert energy_ranks(mods, 0.9, 1) == [2, 5]


def test_budget_rule_is_optimal_on_small_cases_and_respects_floors():
    g = torch.Generator().manual_seed(7)
    for trial in range(20):
        specs = []
        for _ in range(3):
            r = int(torch.randint(1, 5, (1,), generator=g))
            sigma = sorted((torch.rand(r, generator=g) * 3).tolist(), reverse=True)
            specs.append((r, int(torch.randint(2, 9, (1,), generator=g)), sigma))
        mods = candidates(specs)
        budget = int(torch.randint(10, 60, (1,), generator=g))
        floor_cost = sum(c.cost for c in mods)
        if floor_cost > budget:
            with pytest.raises(UsageError, match="floors alone"):
                budget_ranks(mods, budget, 1, None)
            continue
        ranks = budget_ranks(mods, budget, 1, None)
        assert sum(k * c.cost for k, c in zip(ranks, mods)) <= budget
        curves = [energy_curve(c.sigma, c.total) for c in mods]
        got = sum(curve[k] for curve, k in zip(curves, ranks))
        best = max(sum(curve[k] for curve, k in zip(curves, ks))
                   for ks in itertools.product(*[range(1, c.rank + 1) for c in mods])
                   if sum(k * c.cost for k, c in zip(ks, mods)) <= budget)
        # greedy by gain per parameter: optimal up to the one item that did not fit (costs differ)
        max_gain = max(curve[k + 1] - curve[k] for curve in curves for k in range(len(curve) - 1))
        assert got >= best - max_gain - 1e-12
    # energies: first module 0.9876, 0.9975, 0.9999, 1 (one strong direction); second 0.25, 0.5, 0.75, 1
    mods = candidates([(4, 10, [10, 1, 0.5, 0.1]), (4, 10, [1, 1, 1, 1])])
    assert budget_ranks(mods, 40, 1, None) == [1, 3]  # per-module energy fractions, not absolute sigma^2
    assert budget_ranks(mods, 40, 2, None) == [2, 2]  # --min-rank floor
    assert budget_ranks(mods, 80, 1, 0.99) == [4, 4]  # --min-energy floors [2, 4] first, then the rest
    with pytest.raises(UsageError, match="floors alone"):
        budget_ranks(mods, 50, 1, 0.99)


def test_parse_budget():
    assert parse_budget("0.25", 1000) == 250
    assert parse_budget(0.5, 1000) == 500
    assert parse_budget("2M", 1) == 2_000_000 and parse_budget("800k", 1) == 800_000
    assert parse_budget("1500", 10**6) == 1500
    for bad in ("-1", "abc", "1.5", "0"):
        with pytest.raises(UsageError):
            parse_budget(bad, 1000)


def test_peft_pattern_semantics():
    patterns = {"q_proj": 4, "layers.1.mlp": 2}
    assert pattern_value(patterns, "model.layers.0.self_attn.q_proj", 8) == 4
    assert pattern_value(patterns, "model.layers.0.self_attn.xq_proj", 8) == 8  # a suffix after a dot only
    assert pattern_value(patterns, "model.layers.11.mlp", 8) == 8
    assert pattern_value({"a": 1, "b.a": 2}, "b.a", 0) == 1  # first match wins, in order
    names = ["model.layers.1.q_proj", "model.layers.11.q_proj", "model.layers.1.k_proj"]
    r, alpha, ranks, alphas = peft_patterns(names, [4, 8, 8], [2, 4, 4])
    assert (r, alpha) == (8, 4) and ranks == {"model.layers.1.q_proj": 4} and alphas == {"model.layers.1.q_proj": 2}
    # a plain path is a regex: "x.q.proj" would also match "x.q_proj", so the keys are escaped and anchored
    names = ["x.q.proj", "x.q_proj"]
    r, alpha, ranks, _ = peft_patterns(names, [2, 4], [2, 4])
    assert r == 4 and list(ranks) == ["^" + re.escape("x.q.proj")]
    assert pattern_value(ranks, "x.q_proj", r) == 4 and pattern_value(ranks, "x.q.proj", r) == 2


def test_clean_number():
    assert clean_number(2.0) == 2 and isinstance(clean_number(2.0), int)
    assert clean_number(0.25 * 3) == 0.75
    assert clean_number(2 * math.sqrt(8)) == 5.65685424949
