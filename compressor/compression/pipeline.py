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
from dataclasses import dataclass, field, replace

import torch

from ..core import decompose
from ..core.fisher import input_importance
from ..core.ranks import factor_params, uniform_rank
from ..core.stats import InputsSeen, PairedCollector, PairedStats, StatsCollector
from ..errors import LowrankError, UsageError
from ..io.modeling_lowrank import LowRankLinear, linear_shape
from ..methods import METHODS
from ..progress import SILENT
from .offload import release_batch, states_factory
from .targets import dense_weight, select_targets


@dataclass
class Settings:
    """What to compress and how. `ratio` is the kept fraction of the targeted layers' parameters."""

    ratio: float = 0.5
    method: str = "whiten"
    alloc: str = "uniform"  # "global": heterogeneous ranks from whitened spectra, same parameter budget;
    # "fisher": the same, each component's loss weighted by the LM loss's output Fisher;
    # "sensitivity": ASVD's measured-loss search (slow reference)
    min_rank_fraction: float = 0.1  # global/fisher: every matrix keeps at least this share of its break-even rank
    anchor: bool = False  # fit W' x' to the ORIGINAL model's outputs W x (needs propagation)
    refit: bool = False  # after truncation, refit `up` by least squares to the original outputs
    refine_steps: int = 0  # gradient steps on each block's factors against its original outputs
    refine_lr: float = 1e-4
    targets: list | None = None
    ignore: list | None = None
    ranks: dict | None = None  # explicit {module name: rank}, overriding the ratio (e.g. full rank)
    propagate: bool = True
    damp: float = 1e-4  # relative to mean(diag G), for whiten
    alpha: float = 0.5  # asvd exponent
    batch_size: int = 8
    device: str = "cpu"
    offload_budget: int | None = None  # bytes of calibration hidden states kept in memory per stream; None: all
    offload_dir: str | None = None  # where states beyond the budget are spilled (default: the temp directory)


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

    def open_capture(self, model, device):
        """Make the modules before the first block usable on `device` (embedding the windows needs them)."""
        move_outside_blocks(model, self.blocks, device)

    def close_capture(self, model):
        move_outside_blocks(model, self.blocks, "cpu")


def move_outside_blocks(model, blocks, device):
    """Move every tensor of `model` that is not in `blocks` to `device`, in place (tied weights stay tied)."""
    inside = {id(t) for t in list(blocks.parameters()) + list(blocks.buffers())}
    with torch.no_grad():
        for param in model.parameters():
            if id(param) not in inside and param.device != torch.device(device):
                param.data = param.data.to(device)
        for module in model.modules():
            for key, buffer in module._buffers.items():
                if buffer is not None and id(buffer) not in inside and buffer.device != torch.device(device):
                    module._buffers[key] = buffer.to(device)


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


def capture_block_inputs(model, first_block, input_ids, batch_size, device, batches=None, new_states=list):
    """Run every calibration batch up to the first block. Returns the hidden states per batch and, per batch
    size, the block's other arguments (mask, position embeddings, ...).

    Calibration windows are full-length and unpadded, so those arguments depend only on the batch shape:
    they are kept once per shape and replayed for every block.
    """
    states, extras = new_states(), {}

    def catch(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        states.append(hidden.detach().to("cpu"))
        if hidden.shape[0] not in extras:
            extras[hidden.shape[0]] = (args[1:], kwargs)
        raise _StopForward

    handle = first_block.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with torch.no_grad():
            chunks = input_ids.split(batch_size)
            for batch in chunks if batches is None else [chunks[i] for i in batches]:
                try:
                    model(input_ids=batch.to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    return states, extras


def _run_block(block, states, extras, device, collector=None, keep=True, new_states=list, consume=False):
    """Run `block` on every batch of `states`; returns the outputs if `keep`. With `consume`, each input batch
    is released once used, so that the stream is never held twice (at 128 x 2048 tokens of a 576-wide model
    one copy is 0.6 GB)."""
    outputs = new_states()
    with torch.no_grad():
        for index in range(len(states)):
            hidden = states[index]
            args, kwargs = extras[hidden.shape[0]]
            try:
                out = _hidden_states(block(hidden.to(device), *args, **kwargs))
            except InputsSeen:  # the collector has what it needs from this batch (never when keep)
                out = None
            if consume:
                hidden = None
                release_batch(states, index)
            if keep:
                outputs.append(out.to("cpu"))
            if collector is not None:
                collector.end_batch()
    return outputs


def collect_statistics(block, names, states, extras, device, keep_outputs, new_states=list, abs_sums=True):
    """One pass of the original block with hooks. Returns the collector and, if asked, the block's outputs.
    Without `keep_outputs` each batch stops at the last target's input; `abs_sums`: see InputStats."""
    modules = {name: block.get_submodule(rel) for name, rel in names.items()}
    with StatsCollector(modules, abs_sums=abs_sums, stop_early=not keep_outputs) as collector:
        outputs = _run_block(block, states, extras, device, collector, keep=keep_outputs, new_states=new_states)
    return collector, (outputs if keep_outputs else None)


def _weighting(settings, stats, name, fisher):
    if settings.method == "svd":
        return decompose.identity_weighting()
    if settings.method == "whiten":  # the whitening replaces the Gram matrix (errors are measured through it)
        return decompose.whiten_weighting(stats, settings.damp, consume=not isinstance(stats, PairedStats))
    if settings.method == "asvd":
        return decompose.asvd_weighting(stats, settings.alpha)
    if settings.method == "corda":
        return decompose.corda_weighting(stats)
    if settings.method == "fwsvd":
        return decompose.fisher_weighting(fisher[name])
    raise UsageError(f"unknown method {settings.method!r}; choose one of {', '.join(METHODS)}")


def _rank_for(settings, name, m, n):
    if settings.ranks and name in settings.ranks:
        rank = settings.ranks[name]
        return (None, "allocation") if rank is None else (int(rank), None)
    rank = uniform_rank(m, n, settings.ratio)
    return rank, (None if rank is not None else "break-even")


@torch.no_grad()
def decompose_block(block, names, collector, settings, fisher=None):
    """Factorize the block's target layers in place. Returns one LayerResult per target."""
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
        rank, reason = _rank_for(settings, name, m, n)
        remaining[id(stats)] -= 1
        if rank is None:
            results.append(LayerResult(name, m, n, None, m * n, m * n, 1.0, 1.0, 0.0, dense_reason=reason))
            _release_if_done(collector, name, stats, remaining, weightings)
            continue
        if not 1 <= rank <= min(m, n):
            raise UsageError(f"rank {rank} for {name} is outside 1..{min(m, n)}")
        key = name if settings.method == "fwsvd" else id(stats)  # FWSVD weighs each layer, the others each input
        if key not in weightings:
            weightings[key] = _weighting(settings, stats, name, fisher)
        paired = isinstance(stats, PairedStats)
        target = decompose.anchored_target(weight, stats, weightings[key]) if settings.anchor else weight
        factors = decompose.factorize(target, weightings[key], rank)
        up = decompose.refit_up(weight, factors.down, stats, settings.damp) if settings.refit else factors.up
        layer = LowRankLinear(n, m, rank, bias=has_bias, device=weight.device, dtype=weight.dtype)
        layer.down.weight.data.copy_(factors.down)
        layer.up.weight.data.copy_(up)
        if has_bias:
            layer.up.bias.data.copy_(module.bias.detach())
        # Errors are measured on what will be stored: the factors after the cast to the model's dtype. With
        # paired statistics the error is against the original model's outputs W x, else against W x'.
        approx = layer.up.weight @ layer.down.weight
        if paired:
            err, ref = decompose.anchored_error(weight, approx, stats, name)
        elif settings.method == "whiten":
            err, ref = decompose.whitened_error(weight, approx, weightings[key], factors.sigma)
        else:
            err, ref = decompose.output_error(weight, approx, stats.gram)
        sigma2 = factors.sigma.square()
        total = ref if settings.anchor else float(sigma2.sum())
        predicted = float(sigma2[:rank].sum() / total) if total > 0 else 1.0
        rel_error = (err / ref) ** 0.5 if ref > 0 else 0.0
        results.append(
            LayerResult(
                name, m, n, rank, m * n, factor_params(m, n, rank), 1.0 - rel_error**2, predicted, rel_error,
                info=dict(weightings[key].info), sigma=factors.sigma.float().cpu(),
            )
        )
        parent_rel, _, child = rel.rpartition(".")
        setattr(block.get_submodule(parent_rel) if parent_rel else block, child, layer)
        if settings.method == "fwsvd":
            weightings.pop(key)
        _release_if_done(collector, name, stats, remaining, weightings)
    return results


def _release_if_done(collector, name, stats, remaining, weightings):
    """Free an input group's statistics and whitening as soon as its last layer is done (big Grams add up)."""
    if remaining[id(stats)] == 0:
        weightings.pop(id(stats), None)
        collector.release(name)


def decompose_block_distributed(block, names, collector, settings, fisher, dist):
    """decompose_block across processes: statistics gathered to each group's owner, which factorizes that group's
    layers; factors broadcast to every rank; the layer results gathered on rank 0 (in `names` order)."""
    owner = dist.reduce_groups(collector.groups)
    owner_of = {name: owner[i] for i, group in enumerate(collector.groups) for name in group.names}
    mine = {name: rel for name, rel in names.items() if owner_of[name] == dist.rank}
    results = decompose_block(block, mine, collector, settings, fisher)
    with torch.no_grad():
        for name, rel in names.items():
            module = block.get_submodule(rel)
            if owner_of[name] != dist.rank:
                m, n, has_bias = linear_shape(module)
                rank, _ = _rank_for(settings, name, m, n)
                if rank is None:
                    continue  # the owner kept it dense too: the rule is deterministic
                weight = dense_weight(module)
                layer = LowRankLinear(n, m, rank, bias=has_bias, device=weight.device, dtype=weight.dtype)
                if has_bias:
                    layer.up.bias.data.copy_(module.bias.detach())
                parent, _, child = rel.rpartition(".")
                setattr(block.get_submodule(parent) if parent else block, child, layer)
                module = layer
            if isinstance(module, LowRankLinear):
                dist.broadcast_layer(module, owner_of[name])
    gathered = dist.gather_objects(results)
    if not dist.main:
        return []
    by_name = {layer.name: layer for part in gathered for layer in part}
    return [by_name[name] for name in names]


def collect_paired_statistics(block, names, original, shifted, extras, device, new_states=list, abs_sums=True):
    """Two passes of the original block per batch, on the original stream and on the compressed stream, with
    hooks pairing each layer's inputs token by token. Returns the collector and the original stream's outputs."""
    modules = {name: block.get_submodule(rel) for name, rel in names.items()}
    outputs = new_states()
    with PairedCollector(modules, abs_sums) as collector, torch.no_grad():
        for x, x_shifted in zip(original, shifted):
            args, kwargs = extras[x.shape[0]]
            collector.record()
            outputs.append(_hidden_states(block(x.to(device), *args, **kwargs)).to("cpu"))
            collector.pair()
            block(x_shifted.to(device), *args, **kwargs)
            collector.end_batch()
    return collector, outputs


def refine_block(block, states, targets, extras, steps, lr, device, seed=0):
    """A few Adam steps on the block's factors so that, fed `states`, it reproduces `targets` (the original
    block's outputs): AA-SVD's block refinement. Only factor weights move; batches are drawn in a seeded order."""
    factors = [p for m in block.modules() if isinstance(m, LowRankLinear) for p in (m.down.weight, m.up.weight)]
    if not factors or steps <= 0:
        return None
    flags = {p: p.requires_grad for p in block.parameters()}
    for p in block.parameters():
        p.requires_grad_(False)
    for p in factors:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(factors, lr=lr)
    order = torch.randperm(len(states), generator=torch.Generator().manual_seed(seed)).tolist()
    first = last = None
    try:
        with torch.enable_grad():
            for step in range(steps):
                index = order[step % len(order)]
                args, kwargs = extras[states[index].shape[0]]
                target = targets[index].to(device).float()
                out = _hidden_states(block(states[index].to(device), *args, **kwargs)).float()
                loss = (out - target).square().mean() / target.square().mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                first = loss.item() if first is None else first
                last = loss.item()
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return {"loss_first": first, "loss_last": last}


def walk_blocks(model, input_ids, targets, blocks_name, visit, *, batch_size, device, propagate=True,
                anchored=False, refine_steps=0, refine_lr=1e-4, source=None, progress=SILENT, on_block_done=None,
                timings=None, stage="blocks", start=0, replay=None, dist=None, new_states=list, abs_sums=False):
    """The layer-major loop. For each block: collect statistics of its targets' inputs with the block as it is,
    call visit(index, block, names, collector) -> [LayerResult] (which may change the block), optionally refine
    the changed block against the original block's outputs, then feed the next block either the changed block's
    outputs (propagate) or the first pass's outputs. With `anchored`, an original stream runs alongside and the
    statistics pair each layer's original and compressed inputs. Blocks before `start` were done by an earlier
    run: `replay(index, block)` turns the freshly loaded block into its compressed form and the loop only runs
    the calibration states through it. `new_states()` makes each stream's container (see offload.py);
    `abs_sums`: collect the per-channel |x| sums too (ASVD's statistic)."""
    timings = timings if timings is not None else {}
    for key in ("capture", "statistics", "decomposition", "propagation"):
        timings.setdefault(key, 0.0)
    if anchored and not propagate:
        raise UsageError("anchored fitting compares the compressed stream with the original one: it needs propagation")
    source = source or InMemoryBlocks(find_blocks_of(model, blocks_name))
    device = torch.device(device)

    begin = time.perf_counter()
    source.open_capture(model, device)
    try:
        mine = dist.my_batches(-(-input_ids.shape[0] // batch_size)) if dist else None
        states, extras = capture_block_inputs(model, source.blocks[0], input_ids, batch_size, device, mine,
                                              new_states)
    finally:
        source.close_capture(model)
    # The original model's stream (anchored mode only: held otherwise, it would keep the captured states alive
    # for the whole run): identical to the compressed one before the first block.
    original = states if anchored else None
    timings["capture"] += time.perf_counter() - begin

    progress.start(stage, len(source))
    layers = []
    for index in range(len(source)):
        block = source.materialize(index).to(device)
        if index < start:
            begin = time.perf_counter()
            reference = _run_block(block, original if anchored else states, extras, device, new_states=new_states) \
                if anchored or not propagate else None
            replay(index, block)
            states = _run_block(block, states, extras, device, new_states=new_states, consume=True) \
                if propagate else reference
            original = reference if anchored else original
            source.release(index, block.to("cpu"))
            timings["propagation"] += time.perf_counter() - begin
            progress.advance(stage, f"block {index + 1}/{len(source)} · done by an earlier run")
            continue
        prefix = f"{blocks_name}.{index}."
        names = {name: name[len(prefix) :] for name in targets.get(index, [])}

        begin = time.perf_counter()
        if anchored:
            collector, reference = collect_paired_statistics(block, names, original, states, extras, device,
                                                             new_states, abs_sums)
        else:
            keep = not propagate or refine_steps > 0
            collector, reference = collect_statistics(block, names, states, extras, device, keep, new_states,
                                                      abs_sums)
        timings["statistics"] += time.perf_counter() - begin

        begin = time.perf_counter()
        block_layers = visit(index, block, names, collector)
        layers.extend(block_layers)
        del collector
        timings["decomposition"] += time.perf_counter() - begin

        if refine_steps:
            begin = time.perf_counter()
            refined = refine_block(block, states, reference, extras, refine_steps, refine_lr, device, seed=index)
            for layer in block_layers:
                layer.info["refine"] = refined
            timings["refinement"] = timings.get("refinement", 0.0) + time.perf_counter() - begin

        begin = time.perf_counter()
        states = _run_block(block, states, extras, device, new_states=new_states, consume=True) \
            if propagate else reference
        if anchored:
            original = reference
        timings["propagation"] += time.perf_counter() - begin

        block = block.to("cpu")
        if on_block_done is not None:
            on_block_done(index, block, block_layers)
        source.release(index, block)
        return_freed_memory()
        status = f"block {index + 1}/{len(source)}"
        if block_layers:  # passes that only profile the blocks have no errors to show
            status += f" · worst rel. error {max(layer.rel_error for layer in block_layers):.3f}"
        progress.advance(stage, status)
    return layers


def keep_large_allocations_returnable():
    """Fix glibc's mmap threshold at 1 MiB. By default it rises (up to 32 MiB) each time a large block is freed,
    after which tensors of a few MiB come from the heap, fragment it and are never given back: resident memory
    then creeps up block after block. Measured on a streamed 2-block model: peak RSS 1.63 -> 1.38 GiB. The
    price: every activation above 1 MiB is a fresh mapping, page-faulted in on each use: the block passes of
    SmolLM2 take ~30% longer (20 -> 26 s over 16 x 512 tokens), so `compress` sets it for streaming only, where
    memory is the point."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        except (OSError, AttributeError):
            pass


def return_freed_memory():
    """Give memory freed during a block back to the system (glibc keeps big freed chunks otherwise), so that
    resident memory stays at one block's worth."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def find_blocks_of(model, blocks_name):
    return model.get_submodule(blocks_name)


def compress_model(model, input_ids, settings, progress=SILENT, source=None, on_block_done=None, start=0,
                   replay=None, dist=None):
    """Factorize `model` in place with calibration `input_ids` ([samples, seq_len]). Returns a Result.

    `source` says where blocks come from (default: the model's own, in memory); `on_block_done(index, block,
    layers)` sees each compressed block before it is released; `start`/`replay` skip blocks an earlier run did
    (see walk_blocks)."""
    if settings.method not in METHODS:
        raise UsageError(f"unknown method {settings.method!r}; choose one of {', '.join(METHODS)}")
    if (settings.anchor or settings.refit) and settings.method != "whiten":
        raise UsageError("anchored fitting and refit are defined for --method whiten")
    if settings.alloc not in ("uniform", "global", "fisher", "sensitivity"):
        raise UsageError(f"unknown allocation {settings.alloc!r}; choose uniform, global, fisher or sensitivity")
    whole_model = settings.method == "fwsvd" or settings.alloc in ("fisher", "sensitivity")
    if dist is not None and (whole_model or settings.refine_steps):
        raise UsageError("fwsvd, --alloc fisher/sensitivity and --refine-steps run in a single process only")
    blocks_name, blocks, targets = select_targets(model, settings.targets, settings.ignore)
    _check_uniform_attention(blocks)
    timings = {}
    fisher = None
    if settings.method == "fwsvd":
        begin = time.perf_counter()
        names = [name for block_names in targets.values() for name in block_names]
        # one window per backward pass (it holds every layer's activations and the logits at once); the
        # per-sample gradients, and so the importance, are the same as with bigger batches
        progress.start("fisher", input_ids.shape[0])
        fisher = input_importance(model, input_ids, names, 1, settings.device,
                                  progress=lambda: progress.advance("fisher", "gradients of the LM loss"))
        timings["fisher"] = time.perf_counter() - begin

    if settings.alloc != "uniform" and not settings.ranks:
        from .allocation import allocate_ranks

        begin = time.perf_counter()
        settings = replace(settings, ranks=allocate_ranks(model, input_ids, targets, blocks_name, settings, progress,
                                                          source, dist))
        timings["allocation"] = time.perf_counter() - begin

    def visit(index, block, names, collector):
        if dist is not None:
            return decompose_block_distributed(block, names, collector, settings, fisher, dist)
        return decompose_block(block, names, collector, settings, fisher)

    layers = walk_blocks(model, input_ids, targets, blocks_name, visit, batch_size=settings.batch_size,
                         device=settings.device, propagate=settings.propagate,
                         anchored=settings.anchor or settings.refit, refine_steps=settings.refine_steps,
                         refine_lr=settings.refine_lr, source=source, progress=progress, on_block_done=on_block_done,
                         timings=timings, start=start, replay=replay, dist=dist,
                         new_states=states_factory(settings.offload_budget, settings.offload_dir),
                         abs_sums=settings.method == "asvd")
    return Result(blocks_name=blocks_name, layers=layers, timings=timings, calibration_tokens=int(input_ids.numel()))
