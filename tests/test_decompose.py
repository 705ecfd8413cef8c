import pytest
import torch

from lowrank.core import decompose
from lowrank.core.stats import InputStats
from lowrank.errors import LowrankError
from lowrank.methods.asvd import asvd_weighting
from lowrank.methods.corda import corda_weighting
from lowrank.methods.svd import identity_weighting
from lowrank.methods.whiten import whiten_weighting


def correlated_inputs(tokens, n, seed=0, rank=None):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g) * torch.logspace(0, -2, n)
    x = torch.randn(tokens, n, generator=g) @ mix.T
    if rank is not None:  # rank-deficient inputs: only `rank` directions ever excited
        x = torch.randn(tokens, rank, generator=g) @ torch.randn(rank, n, generator=g)
    x[:, 0] *= 30  # an outlier channel, as LLM activations have
    return x


def stats_of(x):
    stats = InputStats(x.shape[1])
    stats.add(x)
    return stats


def weightings(stats):
    return {
        "svd": identity_weighting(),
        "whiten": whiten_weighting(stats, 1e-6),
        "asvd": asvd_weighting(stats, 0.5),
        "corda": corda_weighting(stats),
    }


@pytest.mark.parametrize("method", ["svd", "whiten", "asvd", "corda"])
def test_full_rank_reproduces_the_outputs(method):
    x = correlated_inputs(512, 32)
    w = torch.randn(48, 32)
    f = decompose.factorize(w, weightings(stats_of(x))[method], 32)
    outputs = x.double() @ w.double().T
    assert ((x.double() @ (f.up @ f.down).T - outputs).norm() / outputs.norm()).item() < 1e-5


def test_whiten_beats_svd_on_calibration_output_error():
    x = correlated_inputs(2048, 64)
    w = torch.randn(96, 64)
    stats = stats_of(x)
    for rank in (4, 16, 32):
        errors = {}
        for name, weighting in weightings(stats).items():
            f = decompose.factorize(w, weighting, rank)
            errors[name] = decompose.output_error(w, f.up @ f.down, stats.gram)[0]
        assert errors["whiten"] < errors["svd"]
        assert errors["whiten"] <= min(errors.values()) * (1 + 1e-6)  # the output-error optimum


def test_whiten_dropped_singular_values_are_the_output_error():
    x = correlated_inputs(4096, 40)
    w = torch.randn(30, 40)
    stats = stats_of(x)
    weighting = whiten_weighting(stats, 1e-12)
    f = decompose.factorize(w, weighting, 10)
    err, _ = decompose.output_error(w.double(), f.up @ f.down, stats.gram)
    assert err == pytest.approx(float(f.sigma[10:].square().sum()), rel=1e-4)


def test_rank_deficient_gram_does_not_fail():
    # 8 distinct directions in 64 dimensions: Cholesky of X^T X fails, the damped eigen-root does not.
    x = correlated_inputs(256, 64, rank=8)
    stats = stats_of(x)
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky(stats.gram)
    weighting = whiten_weighting(stats, 1e-4)
    w = torch.randn(32, 64)
    f = decompose.factorize(w, weighting, 8)
    assert torch.isfinite(f.up).all() and torch.isfinite(f.down).all()
    err, ref = decompose.output_error(w, f.up @ f.down, stats.gram)
    assert err / ref < 1e-4  # rank 8 captures every direction the inputs ever take


def test_dead_input_gives_identity_weighting():
    stats = InputStats(8)
    stats.add(torch.zeros(10, 8))
    weighting = whiten_weighting(stats, 1e-4)
    assert weighting.info["dead"]
    assert decompose.whitened_error(torch.ones(3, 8), torch.zeros(3, 8), weighting) == (0.0, 0.0)


def test_signs_are_fixed():
    w = torch.randn(20, 12)
    f1 = decompose.factorize(w, identity_weighting(), 5)
    f2 = decompose.factorize(w.clone(), identity_weighting(), 5)
    assert torch.equal(f1.up, f2.up)
    index = f1.up.abs().argmax(0)
    assert (f1.up[index, torch.arange(5)] > 0).all()


def test_whitened_error_equals_the_gram_error():
    x = correlated_inputs(1000, 24)
    stats = stats_of(x)
    w, approx = torch.randn(10, 24), torch.randn(10, 24)
    expected = decompose.output_error(w, approx, stats.gram)
    got = decompose.whitened_error(w, approx, whiten_weighting(stats, 1e-3, consume=True))
    assert got[0] == pytest.approx(expected[0], rel=1e-5) and got[1] == pytest.approx(expected[1], rel=1e-5)
    with pytest.raises(RuntimeError, match="spent"):
        stats.gram  # consumed


def test_gram_is_accumulated_in_float64():
    stats = InputStats(4)
    x = torch.randn(100, 4, generator=torch.Generator().manual_seed(0))
    stats.add(x[:50])
    stats.add(x[50:])
    exact = x.double().T @ x.double()
    assert stats.gram.dtype == torch.float64
    # each batch's product is a float32 GEMM: accurate to float32 rounding of the largest entries
    assert torch.allclose(stats.gram, exact, rtol=0, atol=1e-6 * float(exact.abs().max()))
    assert stats.tokens == 100


def test_exact_sum_does_not_depend_on_order():
    from lowrank.core.stats import ExactSum

    g = torch.Generator().manual_seed(0)
    terms = [(torch.randn(50, generator=g) * 10 ** torch.randint(-8, 8, (50,), generator=g)).double() for _ in range(40)]
    forward, backward, split = ExactSum(50), ExactSum(50), [ExactSum(50), ExactSum(50)]
    for t in terms:
        forward.add(t)
    for t in reversed(terms):
        backward.add(t)
    for i, t in enumerate(terms):
        split[i % 2].add(t)
    split[0].merge(split[1])
    assert torch.equal(forward.value, backward.value) and torch.equal(forward.value, split[0].value)
    naive_forward = sum(terms)
    naive_backward = sum(reversed(terms))
    assert not torch.equal(naive_forward, naive_backward)  # plain float64 sums do depend on the order


def test_gram_from_the_upper_triangle_equals_the_full_product():
    from lowrank.core.stats import gram_matrix

    x = torch.randn(300, 1000, generator=torch.Generator().manual_seed(0))
    got = gram_matrix(x, panel=384)
    assert torch.equal(got, got.T)
    assert torch.allclose(got, x.T @ x, rtol=1e-5, atol=1e-3)
    assert torch.equal(gram_matrix(x[:, :200]), x[:, :200].T @ x[:, :200])


def test_non_finite_statistics_are_an_error_not_a_dead_input():
    # float16 activations that overflowed give an Inf/NaN Gram; `not scale > 0` used to call it a dead input and
    # return the identity weighting, with a measured error of 0
    stats = InputStats(8)
    stats.add(torch.full((10, 8), float("inf")))
    with pytest.raises(LowrankError, match="not finite"):
        whiten_weighting(stats, 1e-4)


@pytest.mark.parametrize("out_features", [24, 60])  # wide (from M M^T) and tall (from M^T M, S formed)
def test_factorize_matches_a_direct_svd_of_the_weighted_matrix(out_features):
    stats = stats_of(correlated_inputs(2048, 40))
    weighting = whiten_weighting(stats, 1e-6)
    damped = stats.gram + 1e-6 * stats.gram.diagonal().mean() * torch.eye(40, dtype=torch.float64)
    w = torch.randn(out_features, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    f = decompose.factorize(w, weighting, 10)
    root = torch.linalg.cholesky(damped)  # any S with S S^T = G gives the same singular values of W S
    assert torch.allclose(f.sigma, torch.linalg.svdvals(w @ root), rtol=1e-8)
    err = float((((w - f.up @ f.down) @ root).square()).sum())
    assert err == pytest.approx(float(f.sigma[10:].square().sum()), rel=1e-8)  # the truncation's exact cost


def test_factor_scale_does_not_grow_with_the_calibration_tokens():
    # The same input distribution seen 1x and 100x: the whitening's Gram is 100x larger, its singular values 10x.
    # The stored factors must not carry that scale (they grew as tokens^1/4 when balanced by sqrt(sigma) alone).
    x = correlated_inputs(512, 48, rank=48)
    few, many = stats_of(x), stats_of(x.repeat(100, 1))
    w = torch.randn(40, 48, generator=torch.Generator().manual_seed(1))
    a = decompose.factorize(w, whiten_weighting(few, 1e-4), 12)
    b = decompose.factorize(w, whiten_weighting(many, 1e-4), 12)
    for mine, theirs in ((a.up, b.up), (a.down, b.down)):  # equal to rounding (the old balance: off by 100^1/4)
        assert (mine - theirs).norm() < 1e-4 * mine.norm()
    assert torch.allclose(a.up.norm(dim=0), a.down.norm(dim=1))  # each component's two halves equally large
