"""`lowrank env`: what a bug report needs (versions, device, platform, relevant settings), like `hf env`.

Package versions come from the installed distributions' metadata (nothing is imported for them); only torch is
imported, to ask it about devices.
"""

import importlib.metadata
import os
import platform
import sys

PACKAGES = ("lowrank", "torch", "transformers", "safetensors", "tokenizers", "huggingface-hub", "datasets",
            "accelerate", "peft", "gguf", "lm-eval", "matplotlib", "numpy", "typer", "rich")
SETTINGS = ("HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT",
            "HF_HUB_CACHE", "CUDA_VISIBLE_DEVICES", "PYTORCH_CUDA_ALLOC_CONF", "OMP_NUM_THREADS", "LOWRANK_DEBUG")


def package_version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _memory_bytes():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _devices():
    try:
        import torch
    except ImportError:
        return {"torch": "not installed"}
    cuda = torch.cuda.is_available()
    devices = {"cuda_available": cuda, "cuda_version": torch.version.cuda, "cudnn_version":
               torch.backends.cudnn.version() if cuda else None, "torch_threads": torch.get_num_threads(),
               "mps_available": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())}
    if cuda:
        devices["cuda_devices"] = [
            {"name": torch.cuda.get_device_name(i), "memory_bytes": torch.cuda.get_device_properties(i).total_memory,
             "capability": ".".join(map(str, torch.cuda.get_device_capability(i)))}
            for i in range(torch.cuda.device_count())]
    devices["default_device"] = "cuda" if cuda else "cpu"
    return devices


def env_info() -> dict:
    """{"versions", "platform", "device", "settings"} of this installation."""
    from . import __version__

    versions = {name: package_version(name) for name in PACKAGES}
    versions["lowrank"] = versions["lowrank"] or __version__
    return {
        "versions": {"python": platform.python_version(), **{k: v or "not installed" for k, v in versions.items()}},
        "platform": {"system": platform.platform(), "machine": platform.machine(),
                     "python_implementation": platform.python_implementation(), "executable": sys.executable,
                     "cpu_count": os.cpu_count(), "memory_bytes": _memory_bytes()},
        "device": _devices(),
        "settings": {name: os.environ[name] for name in SETTINGS if name in os.environ},
    }


def invocation():
    """The command line that started this process, as one would type it again (for reports and model cards)."""
    import shlex

    program = os.path.basename(sys.argv[0]) if sys.argv else ""
    args = " ".join(shlex.quote(a) for a in sys.argv[1:])
    if program in ("lowrank", "__main__.py"):  # the console script or python -m lowrank
        return f"lowrank {args}".strip()
    return f"python {' '.join(shlex.quote(a) for a in sys.argv)}".strip()  # the Python API, from a script
