"""The sequential engine: the walk over a model's blocks, in the manner of llm-compressor's sequential pipeline.

    capture_block_inputs    run the calibration batches up to the first block and keep that block's inputs
    then, block by block (walk_blocks):
      collect_statistics    run the block with hooks: Gram matrices of its target layers' inputs (float64)
      visit                 the caller's per-block work (decompose, profile, correct), which may change the block
      refine_block          optionally, Adam steps on the changed block's factors toward the original outputs
                            (refine.py)
      propagate             run the calibration states through the *changed* block: the next block's inputs
    several stacks (an encoder-decoder's) are walked in run order, each captured anew when the walk reaches it

This module knows nothing of methods or ranks: compress, rank allocation, sensitivity and EoRA all walk the model
here and differ only in their `visit`. Memory is one block plus the calibration hidden states. Where a block's
weights come from is a block source: `InMemoryBlocks` hands out the model's own blocks; io/streaming.py fills
them from disk.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from ..core.stats import InputsSeen, PairedCollector, StatsCollector
from ..errors import UsageError
from ..progress import SILENT
from .capture import capture_block_inputs
from .experts import pool_sparse_experts, statistics_passes
from .malloc import return_freed_memory
from .offload import SpilledSum, release_batch, spill_dir_for, states_factory
from .refine import hidden_states, micro_batch_sizes, refine_block
from .targets import block_prefixes, find_blocks, is_encoder_decoder, stack_names


@dataclass(frozen=True)
class WalkOptions:
    """How the walk runs: the engine's own options, set from a resolved CompressConfig or by another pass."""

    batch_size: int = 8
    device: str = "cpu"
    propagate: bool = True  # next block's inputs: the changed block's outputs (else the original outputs)
    anchored: bool = False  # an original stream runs alongside; statistics pair original and shifted inputs
    refine_steps: int = 0
    refine_lr: float = 1e-4
    refine_batch: int | None = None  # windows per refinement step (refine.py); None: a whole batch
    refine_target: str = "model"  # "block": the original block fed the compressed stream; "model": the original
    # model's own outputs at this depth (an original stream runs alongside; earlier blocks' errors are fitted too)
    abs_sums: bool = False  # collect the per-channel |x| sums too (ASVD's statistic)
    offload_budget: int | None = None  # bytes of hidden states in memory per stream (offload.py); None: all
    offload_dir: str | None = None

    @classmethod
    def of(cls, config, **overrides) -> "WalkOptions":
        """The options of a resolved CompressConfig (device and offload budget already resolved)."""
        values = dict(batch_size=config.batch_size, device=config.device, propagate=config.propagate,
                      anchored=config.anchor or config.refit, refine_steps=config.refine_steps,
                      refine_lr=config.refine_lr, refine_target=config.refine_target,
                      refine_batch=config.refine_batch,
                      abs_sums=config.method_spec.abs_sums,
                      offload_budget=config.offload_budget, offload_dir=config.offload_dir)
        values.update(overrides)
        return cls(**values)

    @property
    def original_stream(self) -> bool:
        """Whether the original model's stream runs beside the compressed one (anchored fitting, or refinement
        toward the original model's outputs)."""
        return self.anchored or (self.propagate and self.refine_steps > 0 and self.refine_target == "model")


@dataclass(frozen=True)
class Resume:
    """Blocks before `start` were finished by an earlier run: `replay(index, block)` turns the freshly loaded
    block into its compressed form, and the walk only runs the calibration states through it."""

    start: int = 0
    replay: Callable | None = None


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

    def open_capture(self, model, device, stack):
        """Make the modules outside the blocks of `stack` usable on `device` (embedding the windows needs them;
        a decoder's capture runs the encoder too)."""
        move_outside_blocks(model, stack, device)

    def close_capture(self, model, stack):
        move_outside_blocks(model, stack, "cpu")


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


def run_block(block, states, extras, device, collector=None, keep=True, new_states=list, consume=False):
    """Run `block` on every batch of `states`; returns the outputs if `keep`. With `consume`, each input batch
    is released once used, so that the stream is never held twice (at 128 x 2048 tokens of a 576-wide model
    one copy is 0.6 GB)."""
    outputs = new_states()
    with torch.no_grad():
        for index in range(len(states)):
            hidden = states[index]
            args, kwargs = extras.of(index, hidden.shape[0], device)
            try:
                out = hidden_states(block(hidden.to(device), *args, **kwargs))
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


def collect_statistics(block, names, states, extras, device, keep_outputs, new_states=list, abs_sums=True,
                       budget=None, spill_dir=None):
    """A pass of the original block with hooks. Returns the collector and, if asked, the block's outputs.
    Without `keep_outputs` each batch stops at the last target's input; `abs_sums`: see InputStats.

    A mixture-of-experts block whose statistics would exceed `budget` bytes (--offload-budget) takes several
    passes, each over every batch of the unchanged block, with hooks on one group of experts (the first pass
    also on every other target; experts.statistics_passes). Each finished group but the last is parked on disk
    under `spill_dir` (offload.SpilledSum) and read back one expert at a time. An expert sees the same tokens
    in any pass, so the statistics, and the bytes written, are those of a single pass; the cost is one extra
    block forward per group. `collector.passes` says how many there were."""
    modules = {name: block.get_submodule(rel) for name, rel in names.items()}
    passes, resident = statistics_passes(modules, budget, abs_sums)
    collector = outputs = spill_to = None
    for number, part in enumerate(passes):
        keep = keep_outputs and number == 0
        with StatsCollector({name: modules[name] for name in part}, abs_sums=abs_sums, stop_early=not keep) as one:
            out = run_block(block, states, extras, device, one, keep=keep, new_states=new_states)
        if collector is None:
            collector, outputs = one, out
        else:
            collector.absorb(one)
        if number < len(passes) - 1:  # park this group's experts (the last group stays, as do the other targets)
            spill_to = spill_to or spill_dir_for(collector, spill_dir)
            spilled = {id(collector.stats_of(name)): collector.stats_of(name) for name in part
                       if name not in resident and name in collector}
            for stats in spilled.values():
                stats.spill(partial(SpilledSum, spill_dir=spill_to))
            del spilled
            return_freed_memory()
    collector.passes = len(passes)
    collector.expert_tokens = pool_sparse_experts(collector, modules)  # MoE: experts few tokens reached (experts.py)
    return collector, (outputs if keep_outputs else None)


def collect_paired_statistics(block, names, original, shifted, extras, device, new_states=list, abs_sums=True):
    """Two passes of the original block per batch, on the original stream and on the compressed stream, with
    hooks pairing each layer's inputs token by token. Returns the collector and the original stream's outputs."""
    modules = {name: block.get_submodule(rel) for name, rel in names.items()}
    outputs = new_states()
    with PairedCollector(modules, abs_sums) as collector, torch.no_grad():
        for index, (x, x_shifted) in enumerate(zip(original, shifted)):
            args, kwargs = extras.of(index, x.shape[0], device)
            collector.record()
            outputs.append(hidden_states(block(x.to(device), *args, **kwargs)).to("cpu"))
            collector.pair()
            block(x_shifted.to(device), *args, **kwargs)
            collector.end_batch()
    return collector, outputs


def walk_blocks(model, input_ids, targets, blocks_name, visit, options=WalkOptions(), *, source=None,
                progress=SILENT, stage="blocks", on_block_done=None, resume=Resume(), dist=None, timings=None):
    """The layer-major loop. For each block: collect statistics of its targets' inputs with the block as it is,
    call visit(index, block, names, collector) -> [per-layer results] (which may change the block), optionally
    refine the changed block against the original block's outputs, then feed the next block (see WalkOptions).
    `targets` maps block index -> target names; `source` gives the blocks (default: the model's own, in memory);
    `on_block_done(index, block, results)` sees each finished block before it is released. Returns every
    block's results, in order.

    Several stacks (an encoder-decoder's, targets.find_blocks) are walked one after the other, blocks numbered
    across them; each stack's inputs are captured when the walk reaches it, by a forward pass of the model as
    the earlier stacks have left it. So a decoder is calibrated with the output of the *compressed* encoder,
    both in its own stream and in its cross-attention memory: that is what it will read once the model is
    compressed, and the walk fits each block to the inputs it will really see, as propagation does within a
    stack (the original encoder's output would calibrate the decoder for an encoder it no longer has). With
    `anchored`, the decoder's original stream starts from the same capture, memory included."""
    timings = timings if timings is not None else {}
    for key in ("capture", "statistics", "decomposition", "propagation"):
        timings.setdefault(key, 0.0)
    if options.anchored and not options.propagate:
        raise UsageError("anchored fitting compares the compressed stream with the original one: it needs propagation")
    prefixes = block_prefixes(model, blocks_name)
    starts = {prefixes.index(f"{name}.0."): name for name in stack_names(blocks_name)}
    if source is not None and len(starts) > 1:
        raise UsageError("several stacks of blocks are walked with the whole model in memory only (not streamed)")
    source = source or InMemoryBlocks(find_blocks(model, blocks_name)[1])
    device = torch.device(options.device)

    progress.start(stage, len(source))
    results = []
    for index in range(len(source)):
        if index in starts:
            stack = source.blocks if len(starts) == 1 else model.get_submodule(starts[index])
            streams = extras = None  # the previous stack's: not held while the next one is captured
            streams, extras = _capture(model, source, stack, input_ids, options, dist, timings)
            first = index
        block = source.materialize(index).to(device)
        arguments = extras[index - first]
        if index < resume.start:
            begin = time.perf_counter()
            _replay_block(block, index, resume.replay, streams, arguments, device, options, streams.new_states)
            source.release(index, block.to("cpu"))
            timings["propagation"] += time.perf_counter() - begin
            progress.advance(stage, f"block {index + 1}/{len(source)} · done by an earlier run")
            continue
        names = {name: name[len(prefixes[index]):] for name in targets.get(index, [])}
        block_results = _visit_block(block, index, names, visit, streams, arguments, device, options,
                                     streams.new_states, timings)
        results.extend(block_results)

        block = block.to("cpu")
        if on_block_done is not None:
            on_block_done(index, block, block_results)
        source.release(index, block)
        return_freed_memory()
        status = f"block {index + 1}/{len(source)}"
        if block_results:  # passes that only profile the blocks have no errors to show
            status += f" · worst rel. error {max(r.rel_error for r in block_results):.3f}"
        progress.advance(stage, status)
    return results


def _capture(model, source, stack, input_ids, options, dist, timings):
    """The calibration batches at the first block of `stack`, and every block's other arguments: the streams the
    walk starts the stack with."""
    begin = time.perf_counter()
    device = torch.device(options.device)
    new_states = states_factory(options.offload_budget, options.offload_dir)
    source.open_capture(model, device, stack)
    try:
        mine = dist.my_batches(-(-input_ids.shape[0] // options.batch_size)) if dist else None
        # Blocks run for real only where a block's output feeds the next one's arguments (T5's position bias, an
        # encoder-decoder's stacks): elsewhere the stubs give the same arguments (the matrix's Gram test checks it)
        # for free, where real blocks cost half a forward pass (61 s of SmolLM2's 16 x 512 default run).
        real = isinstance(source, InMemoryBlocks) and is_encoder_decoder(model)
        sizes = [chunk.shape[0] for chunk in input_ids.split(options.batch_size)]
        micro = micro_batch_sizes(sizes, options.refine_batch) if options.refine_steps and options.refine_batch else ()
        states, extras = capture_block_inputs(model, stack, input_ids, options.batch_size, device, mine, new_states,
                                              run_blocks=real, also_sizes=micro)
    finally:
        source.close_capture(model, stack)
    # The original model's stream (only where WalkOptions.original_stream: held otherwise, it would keep the
    # captured states alive for the whole run): identical to the compressed one before the first block.
    streams = _Streams(states, states if options.original_stream else None, new_states)
    timings["capture"] += time.perf_counter() - begin
    return streams, extras


@dataclass
class _Streams:
    """The calibration states the next block reads, and (anchored only) the original model's stream beside it."""

    states: object
    original: object = None
    new_states: object = list  # how the walk stores a stream (offload.states_factory)


def _visit_block(block, index, names, visit, streams, extras, device, options, new_states, timings):
    """Statistics, the caller's visit, optional refinement, propagation: one block of the walk."""
    begin = time.perf_counter()
    if options.anchored:
        collector, reference = collect_paired_statistics(block, names, streams.original, streams.states, extras,
                                                         device, new_states, options.abs_sums)
    else:
        keep = not options.propagate or (options.refine_steps > 0 and not options.original_stream)
        collector, reference = collect_statistics(block, names, streams.states, extras, device, keep, new_states,
                                                  options.abs_sums, options.offload_budget, options.offload_dir)
        if options.original_stream:  # the original block, before visit changes it, on the original stream
            reference = run_block(block, streams.original, extras, device, new_states=new_states)
    timings["statistics"] += time.perf_counter() - begin

    begin = time.perf_counter()
    results = visit(index, block, names, collector)
    del collector
    timings["decomposition"] += time.perf_counter() - begin

    produced = None  # the refined block's outputs, from refinement's last pass: propagation without a forward
    if options.refine_steps:
        begin = time.perf_counter()
        outputs = new_states() if options.propagate else None
        refined = refine_block(block, streams.states, reference, extras, options.refine_steps, options.refine_lr,
                               device, seed=index, batch=options.refine_batch, outputs=outputs)
        for result in results:
            result.info["refine"] = refined
        produced = outputs if refined is not None and refined["kept"] else None
        del outputs  # (not kept: the closed form's outputs are computed below, without these in memory)
        timings["refinement"] = timings.get("refinement", 0.0) + time.perf_counter() - begin

    begin = time.perf_counter()
    if produced is not None:
        streams.states = produced
    elif options.propagate:
        streams.states = run_block(block, streams.states, extras, device, new_states=new_states, consume=True)
    else:
        streams.states = reference
    if options.original_stream:
        streams.original = reference
    timings["propagation"] += time.perf_counter() - begin
    return results


def _replay_block(block, index, replay, streams, extras, device, options, new_states):
    """A block an earlier run finished: rebuild it, and run the streams through it as the walk would have."""
    reference = None
    if options.original_stream or not options.propagate:
        reference = run_block(block, streams.original if options.original_stream else streams.states, extras,
                              device, new_states=new_states)
    replay(index, block)
    streams.states = run_block(block, streams.states, extras, device, new_states=new_states, consume=True) \
        if options.propagate else reference
    if options.original_stream:
        streams.original = reference
