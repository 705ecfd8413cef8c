"""The per-layer work of `compress`: give each target of a block its rank, factorize it with its method's
weighting, measure the error of what will be stored, and swap in a LowRankLinear. The walk over the blocks is
sequential.py's; this is the `visit` it calls. A fused projection (Phi-3 `qkv_proj`, `query_key_value`, ...) is
one target like any other, factorized whole with one rank: fused.py says why (measured) and names its slices.
"""

from dataclasses import dataclass, field

import torch

from ..core import decompose
from ..core.ranks import factor_params, uniform_rank
from ..core.stats import PairedStats
from ..errors import LowrankError, UsageError
from ..io.loading import torch_dtype
from ..io.modeling_lowrank import LowRankLinear, linear_shape
from .targets import dense_weight, replace_module


@dataclass
class LayerResult:
    name: str
    out_features: int
    in_features: int
    rank: int | None  # None: kept dense
    params_before: int
    params_after: int
    energy_kept: float  # measured after the cast: 1 - ||(W - W')X||^2 / ||W X||^2 on the calibration inputs
    predicted_energy_kept: float  # what the method's own spectrum predicts (exact for whiten, before the cast)
    rel_error: float  # ||(W - W')X|| / ||W X||
    dense_reason: str | None = None
    info: dict = field(default_factory=dict)
    sigma: torch.Tensor | None = None


def rank_for(config, name, m, n):
    """(rank, None), or (None, why the layer stays dense)."""
    if config.ranks and name in config.ranks:
        rank = config.ranks[name]
        return (None, "allocation") if rank is None else (int(rank), None)
    rank = uniform_rank(m, n, config.ratio)
    return rank, (None if rank is not None else "break-even")


@torch.no_grad()
def decompose_block(block, names, collector, config, fisher=None):
    """Factorize the block's target layers in place. Returns one LayerResult per target."""
    method = config.method_spec
    stored = torch_dtype(config.dtype)
    stored = None if stored == "auto" else stored  # "auto": the model's own
    results, weightings = [], {}
    remaining = {}  # layers still to do per input group: a group's statistics are freed after its last layer
    for name in names:
        remaining[id(collector.stats_of(name))] = remaining.get(id(collector.stats_of(name)), 0) + 1
    for name, rel in names.items():
        module = block.get_submodule(rel)
        m, n, has_bias = linear_shape(module)
        weight = dense_weight(module)
        stats = collector.stats_of(name)
        if not torch.isfinite(weight).all():
            raise LowrankError(f"{name} has NaN or Inf weights; the checkpoint is damaged")
        rank, reason = rank_for(config, name, m, n)
        remaining[id(stats)] -= 1
        if rank is None:
            results.append(LayerResult(name, m, n, None, m * n, m * n, 1.0, 1.0, 0.0, dense_reason=reason))
            _release_if_done(collector, name, stats, remaining, weightings)
            continue
        if not 1 <= rank <= min(m, n):
            raise UsageError(f"rank {rank} for {name} is outside 1..{min(m, n)}")
        key = name if method.per_layer else id(stats)  # FWSVD weighs each layer, the others each input
        if key not in weightings:
            weightings[key] = method.weighting(stats, config, fisher[name] if method.per_layer else None)
        paired = isinstance(stats, PairedStats)
        target = decompose.anchored_target(weight, stats, weightings[key]) if config.anchor else weight
        factors = decompose.factorize(target, weightings[key], rank)
        up = decompose.refit_up(weight, factors.down, stats, config.damp) if config.refit else factors.up
        layer = LowRankLinear(n, m, rank, bias=has_bias, device=weight.device, dtype=weight.dtype)
        # rounded to the dtype that is written (a GGUF computes in float32 and is written in bfloat16)
        layer.down.weight.data.copy_(factors.down if stored is None else factors.down.to(stored))
        layer.up.weight.data.copy_(up if stored is None else up.to(stored))
        if has_bias:
            layer.up.bias.data.copy_(module.bias.detach())
        # Errors are measured on what will be stored: the factors after the cast to the model's dtype. With
        # paired statistics the error is against the original model's outputs W x, else against W x'.
        approx = layer.up.weight @ layer.down.weight
        if paired:
            err, ref = decompose.anchored_error(weight, approx, stats, name)
        elif method.whitened:
            err, ref = decompose.whitened_error(weight, approx, weightings[key], factors.sigma)
        else:
            err, ref = decompose.output_error(weight, approx, stats.gram)
        sigma2 = factors.sigma.square()
        total = ref if config.anchor else float(sigma2.sum())
        predicted = float(sigma2[:rank].sum() / total) if total > 0 else 1.0
        rel_error = (err / ref) ** 0.5 if ref > 0 else 0.0
        results.append(
            LayerResult(
                name, m, n, rank, m * n, factor_params(m, n, rank), 1.0 - rel_error**2, predicted, rel_error,
                info=dict(weightings[key].info), sigma=factors.sigma.float().cpu(),
            )
        )
        replace_module(block, rel, layer)
        if method.per_layer:
            weightings.pop(key)
        _release_if_done(collector, name, stats, remaining, weightings)
    return results


def _release_if_done(collector, name, stats, remaining, weightings):
    """Free an input group's statistics and whitening as soon as its last layer is done (big Grams add up)."""
    if remaining[id(stats)] == 0:
        weightings.pop(id(stats), None)
        collector.release(name)


def decompose_block_distributed(block, names, collector, config, fisher, dist):
    """decompose_block across processes: statistics gathered to each group's owner, which factorizes that group's
    layers; factors broadcast to every rank; the layer results gathered on rank 0 (in `names` order)."""
    owner = dist.reduce_groups(collector.groups)
    owner_of = {name: owner[i] for i, group in enumerate(collector.groups) for name in group.names}
    mine = {name: rel for name, rel in names.items() if owner_of[name] == dist.rank}
    results = decompose_block(block, mine, collector, config, fisher)
    with torch.no_grad():
        for name, rel in names.items():
            module = block.get_submodule(rel)
            if owner_of[name] != dist.rank:
                m, n, has_bias = linear_shape(module)
                rank, _ = rank_for(config, name, m, n)
                if rank is None:
                    continue  # the owner kept it dense too: the rule is deterministic
                weight = dense_weight(module)
                layer = LowRankLinear(n, m, rank, bias=has_bias, device=weight.device, dtype=weight.dtype)
                if has_bias:
                    layer.up.bias.data.copy_(module.bias.detach())
                replace_module(block, rel, layer)
                module = layer
            if isinstance(module, LowRankLinear):
                dist.broadcast_layer(module, owner_of[name])
    gathered = dist.gather_objects(results)
    if not dist.main:
        return []
    by_name = {layer.name: layer for part in gathered for layer in part}
    return [by_name[name] for name in names]


