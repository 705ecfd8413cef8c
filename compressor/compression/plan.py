"""Decisions taken once the model is known: which allocation `--alloc auto` means, whether to stream, and the
resolved config the engine runs with. Each rule is written here once."""

import os

from ..device import resolve_device
from ..errors import UsageError
from .config import CompressConfig, memory_bytes


def resolve_alloc(config: CompressConfig, model, *, streaming: bool, distributed: bool) -> tuple[str, str | None]:
    """--alloc auto: the measured best (fisher, see BENCHMARKS.md) where it applies, else uniform.
    Returns (allocation, why it is not fisher or None)."""
    if config.alloc != "auto":
        return config.alloc, None
    from ..core.fisher import has_lm_head

    if not config.method_spec.whitened:
        return "uniform", f"the Fisher-weighted allocation was measured with --method whiten, not {config.method}"
    if streaming or distributed:
        return "uniform", "the Fisher-weighted allocation needs the whole model in one process"
    if not has_lm_head(model):
        return "uniform", "the Fisher-weighted allocation needs a language-model head"
    return "fisher", None


def resolve(config: CompressConfig, model, *, streaming: bool = False, distributed: bool = False):
    """(the config the engine runs with, why --alloc auto did not choose fisher or None)."""
    alloc, why = resolve_alloc(config, model, streaming=streaming, distributed=distributed)
    device = resolve_device(config.device)
    return config.resolved(alloc=alloc, device=device, offload_budget=config.offload_bytes), why


def weight_bytes(source) -> int | None:
    """Bytes of a local safetensors checkpoint's weights (None for other sources)."""
    if source.kind != "dir":
        return None
    return sum(os.path.getsize(os.path.join(source.path, name)) for name in os.listdir(source.path)
               if name.endswith(".safetensors"))


def choose_streaming(config: CompressConfig, source) -> bool:
    """Stream when asked, or (auto) when a safetensors checkpoint outweighs a quarter of this machine's memory."""
    size = weight_bytes(source)
    why_not = None
    if not size:
        why_not = "only local safetensors checkpoints can be streamed"
    elif config.whole_model_reason():
        why_not = config.whole_model_reason()
    elif config.calib in ("self", "auto"):
        why_not = "streaming needs calibration text (--calib FILE or a dataset): --calib self runs the whole model"
    if config.stream == "on" and why_not:
        raise UsageError(f"--stream: {why_not}")
    if config.stream == "auto":
        return why_not is None and size > memory_bytes() / 4
    return config.stream == "on"
