"""lowrank: post-training low-rank compression of Hugging Face models.

The public API is imported lazily, so `import lowrank` (and `lowrank --help`) stays fast:

    lowrank.compress(model, output, ratio=0.5, method="whiten", ...)   factorize and write a checkpoint
    lowrank.load_pretrained(path, **from_pretrained_kwargs)            load a factorized checkpoint
    lowrank.decode_layout(model)                                       faster decode on CPU, batch 1-16 (any model)
    lowrank.group_downs(model)                                         q/k/v, gate/up first GEMMs as one (factorized)
    lowrank.evaluate(model, baseline=..., data=...)                    perplexity, agreement, speed (a dict)
    lowrank.record_evaluation(evaluation, report_path)                append it to a report's evaluations
    lowrank.read_report(path)                                          a validated report (ReportError if not)
    lowrank.densify(checkpoint, output)                                factors multiplied back, plain checkpoint
    lowrank.env_info()                                                 versions, device, platform
    lowrank.compensate(original, compressed, output, rank=32)          EoRA repair adapter
    lowrank.squeeze(adapter, output, rank=8)                           LoRA-Squeeze an adapter (or energy=, budget=)
    lowrank.SqueezeCallback(target_rank=8)                             in-tuning squeeze (transformers Trainer)
"""

__version__ = "0.1.0"

_API = {
    "compress": ("lowrank.compression.api", "compress"),
    "load_pretrained": ("lowrank.io.checkpoint", "load_pretrained"),
    "compensate": ("lowrank.repair.eora", "compensate"),
    "compress_model": ("lowrank.compression.model", "compress_model"),
    "CompressConfig": ("lowrank.compression.config", "CompressConfig"),
    "LowRankLinear": ("lowrank.io.modeling_lowrank", "LowRankLinear"),
    "decode_layout": ("lowrank.io.modeling_lowrank", "decode_layout"),
    "group_downs": ("lowrank.io.modeling_lowrank", "group_downs"),
    "evaluate": ("lowrank.evaluation.api", "evaluate"),
    "record_evaluation": ("lowrank.evaluation.api", "record"),
    "read_report": ("lowrank.report.files", "read_report"),
    "densify": ("lowrank.repair.densify", "densify"),
    "env_info": ("lowrank.environment", "env_info"),
    "squeeze": ("lowrank.squeezing.api", "squeeze"),
    "SqueezeConfig": ("lowrank.squeezing.config", "SqueezeConfig"),
    "squeeze_peft_model": ("lowrank.squeezing.callback", "squeeze_peft_model"),
    "SqueezeCallback": ("lowrank.squeezing.callback", "SqueezeCallback"),
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
