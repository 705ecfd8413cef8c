"""Decisions taken once the model is known: which allocation `--alloc auto` means, whether to stream, and the
resolved config the engine runs with. Each rule is written here once."""

import math
import os

from ..device import resolve_device
from ..errors import UsageError
from ..io.gguf import output_dtype as gguf_output_dtype
from .config import CompressConfig, memory_bytes


def resolve_alloc(config: CompressConfig, model, *, streaming: bool, distributed: bool) -> tuple[str, str | None]:
    """--alloc auto: the measured best (fisher, see BENCHMARKS.md; for an encoder the Fisher of its final hidden
    states, measured too) where it applies, else uniform.
    Returns (allocation, why it is not fisher or None)."""
    if config.alloc != "auto":
        return config.alloc, None
    from ..core.fisher import has_lm_head, is_encoder

    if not config.method_spec.whitened:
        return "uniform", f"the Fisher-weighted allocation was measured with --method whiten, not {config.method}"
    if streaming or distributed:
        return "uniform", "the Fisher-weighted allocation needs the whole model in one process"
    if not has_lm_head(model) and not is_encoder(model):
        return "uniform", "the Fisher-weighted allocation needs a language-model head, or an encoder"
    return "fisher", None  # an encoder's: of its final hidden states (BENCHMARKS.md, "Encoders")


# Block refinement by default, measured on the protocol (SmolLM2-135M, 16 x 512 calibration tokens, BENCHMARKS.md
# "Refinement steps" and "Spectra from every window"): the windows of 6 whole batches, read one a step (48 steps
# at lr 6e-4) and fitted to the original model's outputs (--refine-target model, config.py), take keep 0.8 from
# 47.94 unrefined to 39.89 for 2.65x the time of the unrefined run before this default (issue 19's rule: 3x).
# 64 steps gave 39.85 for 3.1x, 56 steps 39.86; 8 whole-batch steps toward the original block, an earlier
# default, cost as much as 64 and gave 47.09 (with the allocation of that time). Measured with --method whiten
# only; torchrun cannot run it (one process holds the block's backward pass): elsewhere it is off.
# A step reads at least AUTO_REFINE_TOKENS tokens (one 512-token window on the protocol): with short windows a
# step of one window costs nearly as much time as a step of 512 tokens and learns less (the README's 128-token
# quick start: BENCHMARKS.md, "Refinement steps").
AUTO_REFINE_PASSES = 6
AUTO_REFINE_TOKENS = 512


def resolve_refine(config: CompressConfig, *, distributed: bool,
                   window: int | None = None) -> tuple[int | None, int | None, str | None]:
    """--refine-steps unset: with --method whiten in one process, as many steps as read AUTO_REFINE_PASSES
    batches' worth of windows, else 0. --refine-batch unset: enough `window`-token windows a step to read
    AUTO_REFINE_TOKENS tokens (at most a batch). Returns (steps, windows a step or None when there are no steps,
    why the default is off or None); (None, None, None) while the automatic choice waits for the window length."""
    batch = config.refine_batch or (min(config.batch_size, math.ceil(AUTO_REFINE_TOKENS / window)) if window
                                    else None)
    if config.refine_steps is not None:  # (batch stays None while the windows are not known)
        return config.refine_steps, batch if config.refine_steps else None, None
    if not config.method_spec.whitened:
        return 0, None, None  # the other methods are the papers' baselines: kept as published
    if config.experts == "shared-basis":
        return 0, None, "block refinement trains each layer's own factors, not a basis shared by experts: skipped"
    if distributed:
        return 0, None, "block refinement runs in one process only; torchrun skips it (--refine-steps 0)"
    if batch is None:
        return None, None, None
    return max(1, AUTO_REFINE_PASSES * config.batch_size // batch), batch, None


def resolve(config: CompressConfig, model, *, streaming: bool = False, distributed: bool = False,
            window: int | None = None):
    """(the config the engine runs with, [lines that say what the automatic choices chose and why]). `window`:
    the calibration windows' length, once known; until then refinement's automatic choices stay unresolved, and
    resolving again with it settles them (an already resolved field is kept as it is)."""
    alloc, why = resolve_alloc(config, model, streaming=streaming, distributed=distributed)
    steps, refine_batch, why_not_refined = resolve_refine(config, distributed=distributed, window=window)
    notes = [] if config.alloc != "auto" else [f"--alloc auto: {alloc} (" + (
        why or "Fisher-weighted global ranks; --alloc uniform gives the papers' one rank rule") + ")"]
    notes += [why_not_refined] if why_not_refined else []
    device = resolve_device(config.device)
    return config.resolved(alloc=alloc, device=device, offload_budget=config.offload_bytes,
                           refine_steps=steps, refine_batch=refine_batch), notes


def weight_bytes(source) -> int | None:
    """Bytes of a local safetensors checkpoint's weights (None for other sources)."""
    if source.kind != "dir":
        return None
    return sum(os.path.getsize(os.path.join(source.path, name)) for name in os.listdir(source.path)
               if name.endswith(".safetensors"))


def compute_dtype(config: CompressConfig, source) -> str:
    """The dtype the model is loaded and run in: the output dtype (--dtype, default the checkpoint's), except
    float32 for a GGUF (dequantized) and with --compute-dtype float32. Half-precision checkpoints thus run in
    their dtype unless the user asks (issue 16: no silent upcast): on a CPU without bf16 hardware float32 is
    several times faster (BENCHMARKS.md, "bfloat16 checkpoints"), at twice the model's memory. The upcast is
    exact, and the factors are still rounded to the output dtype with their errors measured after it."""
    if source.kind == "gguf" or config.compute_dtype == "float32":
        return "float32"
    return config.dtype


def output_dtype(config: CompressConfig, source, model, streaming=False) -> str:
    """The dtype of the output: --dtype, else the checkpoint's (read from its files when the model was upcast
    for --compute-dtype float32), else for a GGUF its recorded float type or bfloat16 (io/gguf.py)."""
    if config.dtype != "auto":
        return config.dtype
    if source.kind == "gguf":
        return gguf_output_dtype(os.path.join(source.path, source.gguf_file))
    if config.compute_dtype == "float32" and not streaming:
        return source.stored_dtype or "float32"
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def _element_size(dtype):
    return 2 if dtype in ("bfloat16", "float16") else 4


def choose_streaming(config: CompressConfig, source, progress=None) -> bool:
    """Stream when asked, or (auto) when a safetensors checkpoint outweighs a quarter of this machine's memory.

    Streaming needs calibration text: `--calib self` samples from the whole model. With the default `--calib
    auto`, that is only the case offline (online it is WikiText-2), so a model that needs streaming streams
    online; offline it is loaded whole if it fits in memory (said in the log), and refused with what to pass
    if it does not."""
    size = weight_bytes(source)
    memory = memory_bytes()
    why_not = None
    if size and config.compute_dtype == "float32":
        size = size * 4 // _element_size(source.stored_dtype)  # the bytes the model takes in float32
    if not size:
        why_not = "only local safetensors checkpoints can be streamed"
    elif config.compute_dtype == "float32":
        why_not = "--compute-dtype float32 holds the whole model in memory in float32"
    elif config.whole_model_reason():
        why_not = config.whole_model_reason()
    elif config.calib == "self" or (config.calib == "auto" and size > memory / 4 and not _hub_reachable()):
        why_not = "streaming needs calibration text (--calib FILE or a dataset): --calib self runs the whole model"
    if config.stream == "on" and why_not:
        raise UsageError(f"--stream: {why_not}")
    if config.stream != "auto":
        return config.stream == "on"
    if why_not is None:
        return size > memory / 4
    if size and size > memory / 4:
        if size > 0.8 * memory:
            raise UsageError(f"the weights ({size / 2**30:.1f} GiB) do not fit in this machine's memory "
                             f"({memory / 2**30:.1f} GiB) and cannot be streamed: {why_not}")
        if progress is not None:
            progress.log(f"not streaming although the weights take {size / memory:.0%} of memory: {why_not}")
    return False


def _hub_reachable() -> bool:
    from lowrank.calibration.text import hub_reachable

    return hub_reachable()
