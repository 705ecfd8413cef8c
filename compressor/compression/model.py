"""`compress_model`: factorize a model held in memory (or streamed) with calibration token ids, in place.

The orchestration of one compression: what the method needs first (FWSVD's gradients), the ranks (allocation.py
for anything but the uniform rule), then the sequential walk with layers.py's decomposition as its visit. No I/O:
api.py loads, calibrates and writes around it.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..core.fisher import input_importance
from ..errors import UsageError
from ..progress import SILENT, Progress
from .allocation import allocate_ranks
from .config import CompressConfig
from .experts import check_supported, fill_unreached, repack_untargeted, unpack_model_experts
from .fused import sliced_layers
from .layers import decompose_block, decompose_block_distributed
from .plan import resolve
from .sequential import Resume, WalkOptions, walk_blocks
from .targets import is_encoder_decoder, select_targets


@dataclass
class Result:
    blocks_name: str
    layers: list
    timings: dict
    calibration_tokens: int
    config: CompressConfig  # as resolved: the allocation used and the ranks it chose


def prepare_targets(model: Any, config: CompressConfig, distributed: bool = False,
                    streaming: bool = False) -> tuple[str, dict, list]:
    """Check that `model` can be compressed with `config` and make its targets plain modules: (blocks name,
    {block index: target names}, the expert tensors left stacked). Refusals come first (one line each); then MoE
    expert tensors are unpacked into per-expert linears, the targets chosen, and the experts no target names
    packed back. Safe to call twice on the same model (compress calls it early, to fail before calibrating)."""
    check_supported(model, distributed, config.anchor or config.refit, config.experts, streaming)
    reads = getattr(model, "main_input_name", "input_ids")
    if reads not in ("input_ids", "input_features"):  # ViT's pixel_values: calibration is text or speech
        raise UsageError(f"this model reads {reads}, not token ids or audio features: lowrank calibrates with text "
                         "or speech only, so it cannot compress this model")
    if reads == "input_features" and config.calib in ("auto", "self"):  # Whisper: log-mel spectra of speech
        raise UsageError("this model reads audio (input_features): pass --calib with a folder of speech "
                         "recordings (.wav; .flac/.ogg/.mp3 with soundfile installed)")
    unpack_model_experts(model)  # MoE: 3-D expert tensors become per-expert linears (experts.py)
    blocks_name, _, targets = select_targets(model, config.targets, config.ignore, config.blocks)
    return blocks_name, targets, repack_untargeted(model, targets)


def compress_model(model: Any, input_ids: Any, config: CompressConfig, progress: Progress = SILENT,
                   source: Any = None, on_block_done: Callable | None = None, on_planned: Callable | None = None,
                   resume: Resume = Resume(), dist: Any = None) -> Result:
    """Factorize `model` in place with calibration `input_ids` ([samples, seq_len]). Returns a Result.

    `config` may still hold requests ("auto"): they are resolved here. `source` says where blocks come from
    (default: the model's own, in memory); `on_block_done(index, block, layers)` sees each compressed block
    before it is released; `on_planned(config, loss_curve)` sees the config as resolved, allocated ranks included (and
    the allocation's loss curve, or None), before
    the first block; `resume` skips blocks an earlier run did (see sequential.walk_blocks)."""
    if (config.alloc == "auto" or config.device == "auto" or isinstance(config.offload_budget, str)
            or config.refine_steps is None or (config.refine_steps and config.refine_batch is None)):
        config, _ = resolve(config, model, streaming=source is not None, distributed=dist is not None,
                            window=input_ids.shape[-1])
    if config.speed_aware and config.alloc not in ("fisher", "global"):
        raise UsageError(f"--speed-aware caps the ranks of --alloc fisher or global, and --alloc auto chose "
                         f"{config.alloc} here (streaming, torchrun or another method): pass --alloc global")
    if dist is not None and (config.whole_model_reason() or config.refine_steps):
        raise UsageError("fwsvd, --alloc fisher/sensitivity and --refine-steps run in a single process only")
    if is_encoder_decoder(model) and (config.method_spec.gradients or config.alloc in ("fisher", "sensitivity")):
        raise UsageError("the gradients of --method fwsvd and --alloc fisher/sensitivity are taken from a causal "
                         "language model's loss; for an encoder-decoder use --alloc uniform or global")
    blocks_name, targets, _ = prepare_targets(model, config, dist is not None, source is not None)
    timings = {}
    fisher, curve = None, None
    if config.method_spec.gradients:
        begin = time.perf_counter()
        names = [name for block_names in targets.values() for name in block_names]
        # one window per backward pass (it holds every layer's activations and the logits at once); the
        # per-sample gradients, and so the importance, are the same as with bigger batches
        progress.start("fisher", input_ids.shape[0])
        fisher = input_importance(model, input_ids, names, 1, config.device,
                                  progress=lambda: progress.advance("fisher", "gradients of the LM loss"))
        fill_unreached(fisher, names)  # MoE: experts the pass routed no token to (experts.py)
        timings["fisher"] = time.perf_counter() - begin

    all_names = [name for block_names in targets.values() for name in block_names]
    if config.alloc != "uniform" and not config.ranks:
        begin = time.perf_counter()
        ranks, curve = allocate_ranks(model, input_ids, targets, blocks_name, config, progress, source, dist,
                                      sliced_layers(model, all_names, config))
        config = config.resolved(ranks=ranks)
        timings["allocation"] = time.perf_counter() - begin
    sliced = sliced_layers(model, all_names, config)  # fused layers factorized per slice (fused.py)
    if on_planned is not None:
        on_planned(config, curve)

    def visit(index, block, names, collector):
        if dist is not None:
            return decompose_block_distributed(block, names, collector, config, fisher, dist, sliced)
        results = decompose_block(block, names, collector, config, fisher, sliced)
        tokens = getattr(collector, "expert_tokens", {})  # (paired collectors: no MoE, refused above)
        passes = getattr(collector, "passes", 1)  # > 1: expert statistics over --offload-budget (sequential.py)
        for layer in results:  # MoE: the tokens the router sent to each expert, and what was pooled in
            if layer.name in tokens:
                layer.info["tokens"], layer.info["pooled_tokens"] = tokens[layer.name]
                if passes > 1:
                    layer.info["statistics_passes"] = passes
        return results

    layers = walk_blocks(model, input_ids, targets, blocks_name, visit, WalkOptions.of(config), source=source,
                         progress=progress, on_block_done=on_block_done, resume=resume, dist=dist, timings=timings)
    return Result(blocks_name=blocks_name, layers=layers, timings=timings, calibration_tokens=int(input_ids.numel()),
                  config=config)
