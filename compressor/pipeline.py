"""The layer-major compression loop, in the manner of llm-compressor's sequential pipeline.

    capture_block_inputs    run the calibration batches up to the first block and keep that block's inputs
    then, block by block:
      collect_statistics    run the block with hooks: Gram matrices of its linear layers' inputs (float64)
      decompose_block       factorize each target layer and swap in a LowRankLinear
      propagate             run the calibration states through the *compressed* block: the next block's inputs

Memory is one block plus the calibration hidden states. Where a block's weights come from is `BlockSource`:
this module's in-memory source hands out the model's own blocks; a streaming source can fill them from disk.
"""

import time
from dataclasses import dataclass, field

import torch

from . import decompose
from .errors import LowrankError, UsageError
from .fisher import input_importance
from .methods import METHODS
from .modeling_lowrank import LowRankLinear, linear_shape
from .progress import SILENT
from .ranks import factor_params, uniform_rank
from .stats import StatsCollector
from .targets import dense_weight, select_targets



@dataclass
class Settings:
    """What to compress and how. `ratio` is the kept fraction of the targeted layers' parameters."""

    ratio: float = 0.5
    method: str = "whiten"
    targets: list | None = None
    ignore: list | None = None
    ranks: dict | None = None  # explicit {module name: rank}, overriding the ratio (e.g. full rank)
    propagate: bool = True
    damp: float = 1e-4  # relative to mean(diag G), for whiten
    alpha: float = 0.5  # asvd exponent
    batch_size: int = 8
    device: str = "cpu"


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


@dataclass
class Result:
    blocks_name: str
    layers: list
    timings: dict
    calibration_tokens: int


class InMemoryBlocks:
    """Blocks that are already in memory: materialize returns the model's block, release does nothing."""

    def __init__(self, blocks):
        self.blocks = blocks

    def __len__(self):
        return len(self.blocks)

    def materialize(self, index):
        return self.blocks[index]

    def release(self, index, block):
        pass


class _StopForward(Exception):
    pass


def _hidden_states(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _check_uniform_attention(blocks):
    kinds = {getattr(block, "attention_type", None) for block in blocks}
    if len(kinds) > 1:
        raise UsageError(
            f"this model mixes attention layer types {sorted(map(str, kinds))}: per-layer attention masks are "
            "not supported yet"
        )


def capture_block_inputs(model, first_block, input_ids, batch_size, device):
    """Run every calibration batch up to the first block. Returns the hidden states per batch and, per batch
    size, the block's other arguments (mask, position embeddings, ...).

    Calibration windows are full-length and unpadded, so those arguments depend only on the batch shape:
    they are kept once per shape and replayed for every block.
    """
    states, extras = [], {}

    def catch(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        states.append(hidden.detach().to("cpu"))
        if hidden.shape[0] not in extras:
            extras[hidden.shape[0]] = (args[1:], kwargs)
        raise _StopForward

    handle = first_block.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in input_ids.split(batch_size):
                try:
                    model(input_ids=batch.to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    return states, extras


def _run_block(block, states, extras, device, collector=None, keep=True):
    outputs = []
    with torch.no_grad():
        for hidden in states:
            args, kwargs = extras[hidden.shape[0]]
            out = _hidden_states(block(hidden.to(device), *args, **kwargs))
            if keep:
                outputs.append(out.to("cpu"))
            if collector is not None:
                collector.end_batch()
    return outputs


def collect_statistics(block, names, states, extras, device, keep_outputs):
    """One pass of the original block with hooks. Returns the collector and, if asked, the block's outputs."""
    modules = {name: block.get_submodule(rel) for name, rel in names.items()}
    with StatsCollector(modules) as collector:
        outputs = _run_block(block, states, extras, device, collector, keep=keep_outputs)
    return collector, (outputs if keep_outputs else None)


def _weighting(settings, stats, name, fisher):
    if settings.method == "svd":
        return decompose.identity_weighting()
    if settings.method == "whiten":
        return decompose.whiten_weighting(stats, settings.damp)
    if settings.method == "asvd":
        return decompose.asvd_weighting(stats, settings.alpha)
    if settings.method == "corda":
        return decompose.corda_weighting(stats)
    if settings.method == "fwsvd":
        return decompose.fisher_weighting(fisher[name])
    raise UsageError(f"unknown method {settings.method!r}; choose one of {', '.join(METHODS)}")


def _rank_for(settings, name, m, n):
    if settings.ranks and name in settings.ranks:
        return int(settings.ranks[name]), None
    rank = uniform_rank(m, n, settings.ratio)
    return rank, (None if rank is not None else "break-even")


@torch.no_grad()
def decompose_block(block, names, collector, settings, fisher=None):
    """Factorize the block's target layers in place. Returns one LayerResult per target."""
    results, weightings = [], {}
    for name, rel in names.items():
        module = block.get_submodule(rel)
        m, n, has_bias = linear_shape(module)
        weight = dense_weight(module)
        stats = collector.stats_of(name)
        if not torch.isfinite(weight).all():
            raise LowrankError(f"{name} has NaN or Inf weights; the checkpoint is damaged")
        rank, reason = _rank_for(settings, name, m, n)
        if rank is None:
            results.append(LayerResult(name, m, n, None, m * n, m * n, 1.0, 1.0, 0.0, dense_reason=reason))
            continue
        if not 1 <= rank <= min(m, n):
            raise UsageError(f"rank {rank} for {name} is outside 1..{min(m, n)}")
        key = name if settings.method == "fwsvd" else id(stats)  # FWSVD weighs each layer, the others each input
        if key not in weightings:
            weightings[key] = _weighting(settings, stats, name, fisher)
        factors = decompose.factorize(weight, weightings[key], rank)
        layer = LowRankLinear(n, m, rank, bias=has_bias, device=weight.device, dtype=weight.dtype)
        layer.down.weight.data.copy_(factors.down)
        layer.up.weight.data.copy_(factors.up)
        if has_bias:
            layer.up.bias.data.copy_(module.bias.detach())
        # Errors are measured on what will be stored: the factors after the cast to the model's dtype.
        err, ref = decompose.output_error(weight, layer.up.weight @ layer.down.weight, stats.gram)
        sigma2 = factors.sigma.square()
        predicted = float(sigma2[:rank].sum() / sigma2.sum()) if sigma2.sum() > 0 else 1.0
        rel_error = (err / ref) ** 0.5 if ref > 0 else 0.0
        results.append(
            LayerResult(
                name, m, n, rank, m * n, factor_params(m, n, rank), 1.0 - rel_error**2, predicted, rel_error,
                info=dict(weightings[key].info), sigma=factors.sigma.float().cpu(),
            )
        )
        parent_rel, _, child = rel.rpartition(".")
        setattr(block.get_submodule(parent_rel) if parent_rel else block, child, layer)
    return results


def walk_blocks(model, input_ids, targets, blocks_name, visit, *, batch_size, device, propagate=True,
                source=None, progress=SILENT, on_block_done=None, timings=None):
    """The layer-major loop. For each block: collect statistics of its targets' inputs with the block as it is,
    call visit(index, block, names, collector) -> [LayerResult] (which may change the block), then feed the next
    block either the changed block's outputs (propagate) or the first pass's outputs."""
    timings = timings if timings is not None else {}
    for key in ("capture", "statistics", "decomposition", "propagation"):
        timings.setdefault(key, 0.0)
    source = source or InMemoryBlocks(find_blocks_of(model, blocks_name))
    device = torch.device(device)

    start = time.perf_counter()
    states, extras = capture_block_inputs(model, source.materialize(0).to(device), input_ids, batch_size, device)
    timings["capture"] += time.perf_counter() - start

    progress.start("blocks", len(source))
    layers = []
    for index in range(len(source)):
        block = source.materialize(index).to(device)
        prefix = f"{blocks_name}.{index}."
        names = {name: name[len(prefix) :] for name in targets.get(index, [])}

        start = time.perf_counter()
        collector, outputs = collect_statistics(block, names, states, extras, device, not propagate)
        timings["statistics"] += time.perf_counter() - start

        start = time.perf_counter()
        block_layers = visit(index, block, names, collector)
        layers.extend(block_layers)
        del collector
        timings["decomposition"] += time.perf_counter() - start

        start = time.perf_counter()
        states = _run_block(block, states, extras, device) if propagate else outputs
        timings["propagation"] += time.perf_counter() - start

        block = block.to("cpu")
        if on_block_done is not None:
            on_block_done(index, block, block_layers)
        source.release(index, block)
        worst = max((layer.rel_error for layer in block_layers), default=0.0)
        progress.advance("blocks", f"block {index + 1}/{len(source)} · worst rel. error {worst:.3f}")
    return layers


def find_blocks_of(model, blocks_name):
    return model.get_submodule(blocks_name)


def compress_model(model, input_ids, settings, progress=SILENT, source=None, on_block_done=None):
    """Factorize `model` in place with calibration `input_ids` ([samples, seq_len]). Returns a Result."""
    if settings.method not in METHODS:
        raise UsageError(f"unknown method {settings.method!r}; choose one of {', '.join(METHODS)}")
    blocks_name, blocks, targets = select_targets(model, settings.targets, settings.ignore)
    _check_uniform_attention(blocks)
    timings = {}
    fisher = None
    if settings.method == "fwsvd":
        start = time.perf_counter()
        names = [name for block_names in targets.values() for name in block_names]
        batches = -(-input_ids.shape[0] // settings.batch_size)
        progress.start("fisher", batches)
        fisher = input_importance(model, input_ids, names, settings.batch_size, settings.device,
                                  progress=lambda: progress.advance("fisher", "gradients of the LM loss"))
        timings["fisher"] = time.perf_counter() - start

    def visit(index, block, names, collector):
        return decompose_block(block, names, collector, settings, fisher)

    layers = walk_blocks(model, input_ids, targets, blocks_name, visit, batch_size=settings.batch_size,
                         device=settings.device, propagate=settings.propagate, source=source, progress=progress,
                         on_block_done=on_block_done, timings=timings)
    return Result(blocks_name=blocks_name, layers=layers, timings=timings, calibration_tokens=int(input_ids.numel()))
