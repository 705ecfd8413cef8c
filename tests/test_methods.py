"""The weighted decompositions: each is the method its paper describes."""

import pytest
import torch
import torch.nn.functional as F
from conftest import build_model

from lowrank.compression.config import CompressConfig
from lowrank.compression.model import compress_model
from lowrank.core import decompose
from lowrank.core.fisher import input_importance
from lowrank.core.stats import InputStats
from lowrank.errors import UsageError
from lowrank.methods.asvd import asvd_weighting
from lowrank.methods.corda import corda_weighting
from lowrank.methods.fwsvd import fisher_weighting
from lowrank.methods.svd import identity_weighting


def ids(samples=6, length=40, seed=0):
    return torch.randint(5, 320, (samples, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind, name", [("llama", "model.layers.1.mlp.down_proj"), ("gpt2", "transformer.h.0.attn.c_attn")])
def test_fisher_is_the_per_sample_squared_gradient_summed_over_outputs(kind, name):
    model = build_model(kind)
    data = ids()
    importance = input_importance(model, data, [name], batch_size=4, device="cpu")[name]
    weight = model.get_submodule(name).weight
    expected = torch.zeros_like(importance)
    for sample in data:  # brute force: one backward per sample, the gradient of that sample's mean token loss
        logits = model(input_ids=sample[None]).logits[0]
        (grad,) = torch.autograd.grad(F.cross_entropy(logits[:-1], sample[1:]), weight)
        grad = grad.T if kind == "gpt2" else grad  # Conv1D stores W as in x out
        expected += grad.double().square().sum(0)
    expected /= len(data)
    assert torch.allclose(importance, expected, rtol=1e-4, atol=1e-12 * float(expected.max()))
    assert not any(p.grad is not None for p in model.parameters())  # no parameter gradients were kept


def test_fwsvd_needs_a_causal_lm():
    with pytest.raises(UsageError, match="causal language model"):
        compress_model(build_model("bert"), ids(), CompressConfig(alloc="uniform", method="fwsvd"))


def test_fwsvd_protects_important_inputs():
    # One input feature carries all the loss sensitivity: FWSVD keeps that column better than plain SVD.
    w = torch.randn(40, 30, dtype=torch.float64)
    importance = torch.ones(30, dtype=torch.float64)
    importance[7] = 1e4
    weighting = fisher_weighting(importance)
    fw = decompose.factorize(w, weighting, 5)
    plain = decompose.factorize(w, identity_weighting(), 5)
    column_error = lambda f: float((w[:, 7] - (f.up @ f.down)[:, 7]).norm())  # noqa: E731
    assert column_error(fw) < 0.05 * column_error(plain)


def test_asvd_scale_is_mean_absolute_activation_to_alpha():
    stats = InputStats(3)
    stats.add(torch.tensor([[1.0, -4.0, 0.0], [-3.0, 4.0, 0.0]]))
    weighting = asvd_weighting(stats, 0.5)
    assert torch.allclose(weighting.right, torch.tensor([2.0, 4.0, 0.0], dtype=torch.float64).sqrt() + 1e-6)
    assert torch.allclose(weighting.right * weighting.right_inv, torch.ones(3, dtype=torch.float64))


def test_corda_uses_the_covariance_itself_with_its_damping_loop():
    x = torch.randn(64, 16, dtype=torch.float64) @ torch.diag(torch.logspace(0, -8, 16, dtype=torch.float64))
    stats = InputStats(16)
    stats.add(x)
    weighting = corda_weighting(stats)
    cov = stats.gram / stats.tokens
    damp = weighting.info["damp"]
    eye = torch.eye(16, dtype=torch.float64)
    assert damp >= 0.01 and (damp / 0.01) == 2 ** round(torch.log2(torch.tensor(damp / 0.01)).item())
    assert torch.allclose(weighting.right, cov + damp * torch.diagonal(cov).mean() * eye)
    assert torch.linalg.matrix_norm(weighting.right @ weighting.right_inv - eye) < 0.05


def test_every_method_compresses_a_model():
    for method in ("svd", "whiten", "asvd", "corda", "fwsvd"):
        model = build_model("llama")
        result = compress_model(model, ids(), CompressConfig(alloc="uniform", method=method, ratio=0.5))
        assert all(torch.isfinite(torch.tensor(layer.rel_error)) for layer in result.layers)
        assert ("fisher" in result.timings) == (method == "fwsvd")
