"""Rank allocation: which rank each matrix gets under the budget that `--ratio` sets.

uniform is the papers' rule (ranks.uniform_rank, applied as each layer is decomposed). The others choose every
rank before the layer-major loop starts, from a first pass over the ORIGINAL model:
  global       whitened spectra (exact calibration-loss curves), each matrix's losses relative to its energy
  fisher       the same spectra, each component weighted by the LM loss's output Fisher (a backward pass)
  sensitivity  ASVD's measured loss per layer and candidate ratio (sensitivity.py)
"""

import torch

from ..core import decompose
from ..core.fisher import output_importance
from ..core.ranks import allocate_global, component_losses, dropped_loss
from ..core import speed as speed_timings
from ..errors import UsageError
from ..methods.whiten import whiten_weighting
from ..progress import SILENT
from .experts import fill_unreached
from .fused import slice_key
from .sensitivity import sensitivity_ranks
from .sequential import WalkOptions, walk_blocks
from .targets import dense_weight


class LossCurve:
    """The allocation's loss estimate as a function of --ratio (what `compress`'s verdict scales to suggest a
    ratio): the ranks allocate_global would give at that ratio, and the summed cost of what they drop.
    `speed`: the --speed-aware profile (core/speed.py) whose ceilings the allocation obeyed, or None."""

    def __init__(self, spectra, shapes, weights, min_fraction, speed=None):
        self.shapes, self.min_fraction = shapes, min_fraction
        self.spectra, self.weights, self.speed = spectra, weights, speed
        self.losses = component_losses(spectra, weights)
        self.ceilings = None if speed is None else speed_timings.ceilings(speed, shapes)

    def allocate(self, ratio, notes=None):
        return allocate_global(self.spectra, self.shapes, ratio, self.min_fraction, self.weights, notes,
                               self.ceilings)

    def __call__(self, ratio):
        return dropped_loss(self.losses, self.allocate(ratio))


def allocate_ranks(model, input_ids, targets, blocks_name, config, progress=SILENT, source=None, dist=None,
                   sliced=None):
    """({module name: rank, or None for dense}, LossCurve or None) for config.alloc in global, fisher,
    sensitivity. `sliced` ({name: FusedLayout}): fused layers whose slices are candidates of their own, named
    LAYER:SLICE (fused.py); sensitivity ranks whole layers only."""
    if config.alloc == "sensitivity":
        return sensitivity_ranks(model, input_ids, targets, blocks_name, config, progress)[0], None
    output_fisher = None
    if config.alloc == "fisher":
        # The Fisher weights are a rough per-channel scale: a quarter of the windows (>= 4) gives them, at a
        # quarter of the cost of this backward pass. The spectra come from every window: "dense when it pays"
        # weighs each matrix's whole tail, which a quarter of the tokens estimates worse (SmolLM2 keep 0.8,
        # refined: 40.74 -> 40.17 for ~16 s more; the gradients from every window too: 40.00 for ~31 s more,
        # alone 40.39; BENCHMARKS.md, "Spectra from every window").
        names = [name for block_names in targets.values() for name in block_names]
        fisher_ids = input_ids[: max(4, input_ids.shape[0] // 4)]
        # one window per backward pass: it holds every layer's activations and the logits at once
        progress.start("fisher", fisher_ids.shape[0])
        output_fisher = output_importance(model, fisher_ids, names, 1, config.device,
                                          progress=lambda: progress.advance("fisher", "output gradients"))
        fill_unreached(output_fisher, names)  # MoE: experts the pass routed no token to (experts.py)
    spectra, weights, shapes = profile_spectra(model, input_ids, targets, blocks_name, config, progress, source,
                                               dist, output_fisher, sliced)
    ranks, curve = None, None
    if dist is None or dist.main:
        notes = []
        speed = speed_profile(model, shapes, config, progress) if config.speed_aware else None
        curve = LossCurve(spectra, shapes, weights, config.min_rank_fraction, speed)
        ranks = curve.allocate(config.ratio, notes)
        for note in notes:
            progress.log(note)
    return (dist.broadcast_object(ranks), curve) if dist else (ranks, curve)


def speed_entry(curve, ranks):
    """The report's `speed` ({} unless the allocation was --speed-aware): the timings and the speed-up they predict."""
    if curve is None or curve.speed is None or not ranks:
        return {}
    return {"speed": speed_timings.summary(curve.speed, curve.shapes, {name: ranks[name] for name in curve.shapes})}


def speed_profile(model, shapes, config, progress=SILENT):
    """--speed-aware: the profile in --speed-profile FILE, or measured now (core/speed.py) on the device the model
    runs on, in the dtype the output is written in (what it will be served in); it must cover every shape the
    allocation ranks."""
    from ..io.loading import torch_dtype
    from ..io.modeling_lowrank import decode_linear  # the kernel load_pretrained runs the model on

    if config.speed_profile is not None:
        profile = speed_timings.read_profile(config.speed_profile)
        timed = profile.get("rows", 1)
        if config.speed_batch not in (1, timed):
            raise UsageError(f"the speed profile {config.speed_profile} was timed at {timed} rows, not the "
                             f"--speed-batch {config.speed_batch} asked: drop one of the two options")
    else:
        progress.log(f"--speed-aware: timing {config.speed_batch}-row matrix products of each layer shape (dense "
                     "and factorized)")
        dtype = next(model.parameters()).dtype if config.dtype == "auto" else torch_dtype(config.dtype)
        profile = speed_timings.measure_profile(shapes, config.device, dtype, decode_linear, config.speed_batch)
    missing = sorted({speed_timings.shape_key(m, n) for m, n in shapes.values()} - set(profile["shapes"]))
    if missing:
        raise UsageError(f"the speed profile {config.speed_profile} has no timings for the shapes {', '.join(missing)}"
                         " of this model: run --speed-aware without --speed-profile to measure them")
    return profile


@torch.no_grad()
def profile_spectra(model, input_ids, targets, blocks_name, config, progress=SILENT, source=None, dist=None,
                    output_fisher=None, sliced=None):
    """Whitened singular values of every target on the original model's own inputs (no change to the model):
    sigma_i^2 is exactly what dropping component i costs, which is what rank allocation needs.
    With `output_fisher` ({name: D}), also each component's loss weight D^T u_i^2 (u_i its output direction).
    A layer in `sliced` contributes one candidate per slice (its rows, the same whitening, D's rows).
    Returns (spectra, weights or None, shapes {candidate: (rows, columns)})."""
    spectra, weights, shapes = {}, {}, {}
    sliced = sliced or {}

    def visit(index, block, names, collector):
        whitenings = {}
        if dist is not None:  # each group's owner computes its spectra
            owner = dist.reduce_groups(collector.groups)
            owned = {n for i, group in enumerate(collector.groups) if owner[i] == dist.rank for n in group.names}
            names = {name: rel for name, rel in names.items() if name in owned}
        left = {}  # layers still to profile per input: a whitening goes after its last one (a MoE block has many)
        for name in names:
            left[id(collector.stats_of(name))] = left.get(id(collector.stats_of(name)), 0) + 1
        for name, rel in names.items():
            stats = collector.stats_of(name)
            if id(stats) not in whitenings:
                whitenings[id(stats)] = whiten_weighting(stats, config.damp, consume=True)
            left[id(stats)] -= 1
            whitening = whitenings[id(stats)] if left[id(stats)] else whitenings.pop(id(stats))
            weight = dense_weight(block.get_submodule(rel))
            rows = sliced[name].slice_rows() if name in sliced else {None: None}
            for part, index in rows.items():
                key = name if part is None else slice_key(name, part)
                matrix = weight if index is None else weight[index.to(weight.device)]
                spectra[key], u = decompose.spectrum(matrix, whitening, output_fisher is not None)
                shapes[key] = tuple(matrix.shape)
                if output_fisher is not None:
                    fisher = output_fisher[name] if index is None else output_fisher[name][index]
                    weights[key] = fisher.to(u.device) @ u.square()
        return []

    options = WalkOptions(batch_size=config.batch_size, device=config.device, propagate=False,
                          offload_budget=config.offload_budget, offload_dir=config.offload_dir)
    walk_blocks(model, input_ids, targets, blocks_name, visit, options, source=source, progress=progress,
                stage="profile", dist=dist)
    if dist is not None:
        merged, merged_weights, merged_shapes = {}, {}, {}
        for part, part_weights, part_shapes in dist.gather_objects((spectra, weights, shapes)) or []:
            merged.update(part)
            merged_weights.update(part_weights)
            merged_shapes.update(part_shapes)
        spectra, weights, shapes = merged, merged_weights, merged_shapes
    return spectra, (weights if output_fisher is not None else None), shapes
