import pytest
import torch

from lowrank import decompose
from lowrank.stats import InputStats


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
        "svd": decompose.identity_weighting(),
        "whiten": decompose.whiten_weighting(stats, 1e-6),
        "asvd": decompose.asvd_weighting(stats, 0.5),
        "corda": decompose.corda_weighting(stats),
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
    weighting = decompose.whiten_weighting(stats, 1e-12)
    f = decompose.factorize(w, weighting, 10, svd_dtype=torch.float64)
    err, _ = decompose.output_error(w.double(), f.up @ f.down, stats.gram)
    assert err == pytest.approx(float(f.sigma[10:].square().sum()), rel=1e-4)


def test_rank_deficient_gram_does_not_fail():
    # 8 distinct directions in 64 dimensions: Cholesky of X^T X fails, the damped eigen-root does not.
    x = correlated_inputs(256, 64, rank=8)
    stats = stats_of(x)
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky(stats.gram)
    weighting = decompose.whiten_weighting(stats, 1e-4)
    w = torch.randn(32, 64)
    f = decompose.factorize(w, weighting, 8)
    assert torch.isfinite(f.up).all() and torch.isfinite(f.down).all()
    err, ref = decompose.output_error(w, f.up @ f.down, stats.gram)
    assert err / ref < 1e-4  # rank 8 captures every direction the inputs ever take
    assert weighting.info["damped_directions"] >= 56


def test_dead_input_gives_identity_weighting():
    stats = InputStats(8)
    stats.add(torch.zeros(10, 8))
    weighting = decompose.whiten_weighting(stats, 1e-4)
    assert torch.equal(weighting.right, torch.eye(8, dtype=torch.float64))


def test_signs_are_fixed():
    w = torch.randn(20, 12)
    f1 = decompose.factorize(w, decompose.identity_weighting(), 5)
    f2 = decompose.factorize(-(-w), decompose.identity_weighting(), 5)
    assert torch.equal(f1.up, f2.up)
    index = f1.up.abs().argmax(0)
    assert (f1.up[index, torch.arange(5)] > 0).all()


def test_gram_is_accumulated_in_float64():
    stats = InputStats(4)
    x = torch.randn(100, 4)
    stats.add(x[:50])
    stats.add(x[50:])
    assert stats.gram.dtype == torch.float64
    assert torch.allclose(stats.gram, x.double().T @ x.double(), rtol=1e-5)
    assert stats.tokens == 100
