"""The one rule for `--device`: what "auto" means and which names are refused."""

from .errors import UsageError


def resolve_device(device: str | None) -> str:
    """"auto" (or None) is CUDA when torch sees a GPU, else the CPU; "cuda[:N]" without CUDA and unknown names are
    usage errors."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise UsageError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    return device
