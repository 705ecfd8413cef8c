"""The per-layer work of `compress`: give each target of a block its rank, factorize it with its method's
weighting, measure the error of what will be stored, and swap in a LowRankLinear. The walk over the blocks is
sequential.py's; this is the `visit` it calls. A fused projection (Phi-3 `qkv_proj`, `query_key_value`, ...) is
factorized whole with one rank, or per output slice (each slice's rows with their own rank, whitened with the
layer's one input Gram) into a SlicedLowRankLinear: fused.py says when and why (measured).
"""

from dataclasses import dataclass, field

import torch

from ..core import decompose
from ..core.ranks import factor_params, uniform_rank
from ..core.stats import PairedStats
from ..errors import LowrankError, UsageError
from ..io.loading import torch_dtype
from ..io.modeling_lowrank import LowRankLinear, SlicedLowRankLinear, linear_shape
from .fused import slice_key
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
    sigma: torch.Tensor | dict | None = None  # a per-slice layer's: {slice: its spectrum}

    def spectra(self):
        """{name: spectrum} for the spectra file: the layer's, or each slice's as LAYER:SLICE."""
        if isinstance(self.sigma, dict):
            return {f"{self.name}:{part}": sigma.contiguous() for part, sigma in self.sigma.items()}
        return {} if self.sigma is None else {self.name: self.sigma.contiguous()}

    def take_spectra(self, spectra):
        """The reverse of spectra(): this layer's spectrum (or its slices') from a file's {name: spectrum}."""
        mine = {key.rpartition(":")[2]: value for key, value in spectra.items() if key.startswith(self.name + ":")}
        self.sigma = mine or spectra.get(self.name)


def rank_for(config, name, m, n):
    """(rank, None), or (None, why the layer stays dense)."""
    if config.ranks and name in config.ranks:
        rank = config.ranks[name]
        return (None, "allocation") if rank is None else (int(rank), None)
    rank = uniform_rank(m, n, config.ratio)
    return rank, (None if rank is not None else "break-even")


@torch.no_grad()
def decompose_block(block, names, collector, config, fisher=None, sliced=None):
    """Factorize the block's target layers in place. Returns one LayerResult per target. `sliced`: {name:
    FusedLayout} of the fused layers factorized per slice (fused.sliced_layers)."""
    sliced = sliced or {}
    method = config.method_spec
    stored = torch_dtype(config.dtype)
    stored = None if stored == "auto" else stored  # "auto": the model's own
    order = list(names)
    results, names = _shared_first(block, names, collector, config, stored)
    weightings = {}
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
        remaining[id(stats)] -= 1
        key = name if method.per_layer else id(stats)  # FWSVD weighs each layer, the others each input

        def weighting():
            if key not in weightings:
                weightings[key] = method.weighting(stats, config, fisher[name] if method.per_layer else None)
            return weightings[key]

        if name in sliced:
            result, layer = decompose_sliced(name, module, weight, sliced[name], stats, weighting, config, stored)
            results.append(result)
            if layer is not None:
                replace_module(block, rel, layer)
            if method.per_layer:
                weightings.pop(key, None)
            _release_if_done(collector, name, stats, remaining, weightings)
            continue
        rank, reason = rank_for(config, name, m, n)
        if rank is None:
            results.append(LayerResult(name, m, n, None, m * n, m * n, 1.0, 1.0, 0.0, dense_reason=reason))
            _release_if_done(collector, name, stats, remaining, weightings)
            continue
        if not 1 <= rank <= min(m, n):
            raise UsageError(f"rank {rank} for {name} is outside 1..{min(m, n)}")
        weighting()
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
    return sorted(results, key=lambda layer: order.index(layer.name))


def _shared_first(block, names, collector, config, stored):
    """--experts shared-basis: whole layers of experts first, each with one basis (shared_basis.py). Returns (their
    results, the names left)."""
    if config.experts != "shared-basis":
        return [], names
    from .shared_basis import decompose_shared

    return decompose_shared(block, names, collector, config, rank_for, stored, LayerResult)


def _cast(tensor, stored, dtype):
    """A factor rounded to the dtype that is written, held in the model's dtype (as LowRankLinear's copy_ does)."""
    return (tensor if stored is None else tensor.to(stored)).to(dtype)


def decompose_sliced(name, module, weight, layout, stats, weighting, config, stored):
    """A fused layer factorized per output slice: each slice's rows W_i at its own rank (`ranks` key
    LAYER:SLICE, or the uniform rule on the slice's shape), with the weighting the layer's input gives every
    slice (computed once by `weighting()`); a slice the ranks leave dense keeps its rows. Returns (LayerResult,
    the SlicedLowRankLinear or None when every slice stays dense). Errors are measured per slice and for the
    layer (the slices' output rows partition the layer's, so their errors add up), after the cast."""
    m, n, has_bias = linear_shape(module)
    rows = layout.slice_rows()
    chosen = {part: rank_for(config, slice_key(name, part), len(index), n) for part, index in rows.items()}
    if all(rank is None for rank, _ in chosen.values()):
        reasons = {why for _, why in chosen.values()}
        reason = reasons.pop() if len(reasons) == 1 else "allocation"
        parts = [{"name": part, "rows": len(index), "rank": None, "params_after": len(index) * n}
                 for part, index in rows.items()]  # so that the report counts each slice as dense
        return LayerResult(name, m, n, None, m * n, m * n, 1.0, 1.0, 0.0, dense_reason=reason,
                           info={"slices": parts}), None
    for part, (rank, _) in chosen.items():
        if rank is not None and not 1 <= rank <= min(len(rows[part]), n):
            raise UsageError(f"rank {rank} for {slice_key(name, part)} is outside 1..{min(len(rows[part]), n)}")
    weighted = weighting()
    paired, method = isinstance(stats, PairedStats), config.method_spec
    target = decompose.anchored_target(weight, stats, weighted) if config.anchor else weight
    layer = SlicedLowRankLinear(n, m, layout.names, layout.sizes, [chosen[p][0] for p in layout.names],
                                layout.groups, bias=has_bias, device=weight.device, dtype=weight.dtype)
    downs, parts, kept, total, err_sum, ref_sum, sigmas = [], [], 0.0, 0.0, 0.0, 0.0, {}
    for part, index in rows.items():
        rank, index = chosen[part][0], index.to(weight.device)
        w_part = weight[index]
        sigma = decompose.spectrum(target[index], weighted)[0]
        sigmas[part] = sigma.float().cpu()
        if rank is None:
            down = approx = _cast(w_part, stored, weight.dtype)
        else:
            factors = decompose.factorize(target[index], weighted, rank)
            up = decompose.refit_up(w_part, factors.down, stats, config.damp) if config.refit else factors.up
            down = _cast(factors.down, stored, weight.dtype)
            layer.up[part].weight.copy_(_cast(up, stored, weight.dtype))
            approx = layer.up[part].weight @ down
        downs.append(down)
        if has_bias:
            layer.up[part].bias.copy_(module.bias.detach()[index])
        sigma2 = sigma.square()
        kept += float(sigma2[:rank].sum() if rank is not None else sigma2.sum())
        total += float(sigma2.sum())
        entry = {"name": part, "rows": len(index), "rank": rank,
                 "params_after": factor_params(len(index), n, rank)}
        if not paired:  # with paired statistics only the layer's error is defined (its recorded output energy)
            err, ref = (decompose.whitened_error(w_part, approx, weighted, sigma) if method.whitened
                        else decompose.output_error(w_part, approx, stats.gram))
            err_sum, ref_sum = err_sum + err, ref_sum + ref
            entry["rel_error"] = round((err / ref) ** 0.5 if ref > 0 else 0.0, 6)
        parts.append(entry)
    layer.down.weight.copy_(torch.cat(downs))
    if paired:
        err_sum, ref_sum = decompose.anchored_error(weight, layer.weight.as_subclass(torch.Tensor), stats, name)
    total = ref_sum if config.anchor else total
    rel_error = (err_sum / ref_sum) ** 0.5 if ref_sum > 0 else 0.0
    info = {**weighted.info, "slices": parts, "sliced": layer.spec()}
    return LayerResult(name, m, n, layer.rank, m * n, sum(p["params_after"] for p in parts), 1.0 - rel_error**2,
                       kept / total if total > 0 else 1.0, rel_error, info=info, sigma=sigmas), layer


def empty_layer(name, module, config, layout=None):
    """The factorized layer `compress` would put in place of `module`, weights not filled in (None: it stays
    dense). The rule is deterministic, so a process that did not factorize a layer builds the same one."""
    m, n, has_bias = linear_shape(module)
    ref = dense_weight(module)
    if layout is not None:
        rows = layout.slice_rows()
        ranks = [rank_for(config, slice_key(name, part), len(rows[part]), n)[0] for part in layout.names]
        if all(rank is None for rank in ranks):
            return None
        layer = SlicedLowRankLinear(n, m, layout.names, layout.sizes, ranks, layout.groups, bias=has_bias,
                                    device=ref.device, dtype=ref.dtype)
        for part in layout.names:
            if has_bias:
                layer.up[part].bias.data.copy_(module.bias.detach()[rows[part].to(ref.device)])
        return layer
    rank, _ = rank_for(config, name, m, n)
    if rank is None:
        return None
    layer = LowRankLinear(n, m, rank, bias=has_bias, device=ref.device, dtype=ref.dtype)
    if has_bias:
        layer.up.bias.data.copy_(module.bias.detach())
    return layer


def stored_ranks(layers):
    """What config.json's lowrank block lists: ({name: rank} of the layers factorized whole, {name: slice spec}
    of the fused layers factorized per slice, {experts module: {tensor: spec}} of the shared-basis experts)."""
    from .shared_basis import stored_shared

    ranks = {layer.name: layer.rank for layer in layers
             if layer.rank is not None and "sliced" not in layer.info and "shared" not in layer.info}
    return ranks, {layer.name: layer.info["sliced"] for layer in layers if "sliced" in layer.info}, \
        stored_shared(layers)


def stored_layer(layer, m, n, has_bias, dtype):
    """The empty factorized module of a finished LayerResult (a resumed run reloads its weights into it)."""
    spec = layer.info.get("sliced")
    if spec is None:
        return LowRankLinear(n, m, layer.rank, bias=has_bias, dtype=dtype)
    return SlicedLowRankLinear(n, m, **spec, bias=has_bias, dtype=dtype)


def _release_if_done(collector, name, stats, remaining, weightings):
    """Free an input group's statistics and whitening as soon as its last layer is done (big Grams add up)."""
    if remaining[id(stats)] == 0:
        weightings.pop(id(stats), None)
        collector.release(name)


def decompose_block_distributed(block, names, collector, config, fisher, dist, sliced=None):
    """decompose_block across processes: statistics gathered to each group's owner, which factorizes that group's
    layers; factors broadcast to every rank; the layer results gathered on rank 0 (in `names` order)."""
    sliced = sliced or {}
    owner = dist.reduce_groups(collector.groups)
    owner_of = {name: owner[i] for i, group in enumerate(collector.groups) for name in group.names}
    mine = {name: rel for name, rel in names.items() if owner_of[name] == dist.rank}
    results = decompose_block(block, mine, collector, config, fisher, sliced)
    with torch.no_grad():
        for name, rel in names.items():
            module = block.get_submodule(rel)
            if owner_of[name] != dist.rank:
                layer = empty_layer(name, module, config, sliced.get(name))
                if layer is None:
                    continue  # the owner kept it dense too: the rule is deterministic
                replace_module(block, rel, layer)
                module = layer
            if isinstance(module, (LowRankLinear, SlicedLowRankLinear)):
                dist.broadcast_layer(module, owner_of[name])
    gathered = dist.gather_objects(results)
    if not dist.main:
        return []
    by_name = {layer.name: layer for part in gathered for layer in part}
    return [by_name[name] for name in names]


