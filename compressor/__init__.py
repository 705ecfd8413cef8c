"""lowrank: post-training low-rank compression of Hugging Face models.

The public API is imported lazily, so `import lowrank` (and `lowrank --help`) stays fast:

    lowrank.compress(model, output, ratio=0.5, method="whiten", ...)   factorize and write a checkpoint
    lowrank.load_pretrained(path, **from_pretrained_kwargs)            load a factorized checkpoint
"""

__version__ = "0.1.0"

_API = {
    "compress": ("lowrank.compression", "compress"),
    "load_pretrained": ("lowrank.checkpoint", "load_pretrained"),
    "compress_model": ("lowrank.pipeline", "compress_model"),
    "Settings": ("lowrank.pipeline", "Settings"),
    "LowRankLinear": ("lowrank.modeling_lowrank", "LowRankLinear"),
    "LowrankError": ("lowrank.errors", "LowrankError"),
}

__all__ = ["__version__", *_API]


def __getattr__(name):
    if name in _API:
        import importlib

        module, attribute = _API[name]
        value = getattr(importlib.import_module(module), attribute)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lowrank' has no attribute {name!r}")
