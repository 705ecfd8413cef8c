"""`lowrank.compress`: load a model, calibrate, factorize its block linears, write the checkpoint and report."""

import json
import os
import shlex
import sys
import time

from . import __version__
from .checkpoint import check_output, write_checkpoint
from .errors import UsageError
from .loading import load_model, resolve_model
from .methods import METHODS
from .pipeline import Settings, compress_model
from .progress import SILENT
from .ranks import RATIO_DEFINITION
from .report import build_report, human_bytes, to_markdown, worst_layers
from .shards import parse_size
from .targets import select_targets

DEFAULT_SEQ_LEN = 2048


def resolve_device(device):
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise UsageError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    return device


def validate(ratio, method):
    if not 0 < ratio <= 1:
        raise UsageError(f"--ratio must be in (0, 1] (the fraction of parameters kept), got {ratio}")
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


def _unique_params(model):
    from .checkpoint import unique_state_dict

    return sum(t.numel() for t in unique_state_dict(model).values())


def compress(
    model,
    output,
    *,
    ratio=0.5,
    method="whiten",
    targets=None,
    ignore=None,
    calib="auto",
    num_samples=128,
    seq_len=None,
    batch_size=8,
    seed=0,
    device="auto",
    dtype="auto",
    propagate=True,
    damp=1e-4,
    alpha=0.5,
    text_column="text",
    calib_split="train",
    max_shard_size="5GB",
    overwrite=False,
    trust_remote_code=False,
    progress=SILENT,
    command=None,
):
    """Compress `model` (a directory, .gguf file, hub id or pkg:NAME) and write a factorized checkpoint to `output`.

    `ratio` is the fraction of the targeted linear layers' parameters that is kept. Returns the report (a dict,
    also written as compression_report.json).
    """
    import torch

    from lowrank.calibration import load_calibration

    validate(ratio, method)
    max_shard_bytes = parse_size(max_shard_size)
    device = resolve_device(device)
    source = resolve_model(model)
    check_output(output, source.local_dir, overwrite)
    timings = {}
    torch.manual_seed(seed)

    start = time.perf_counter()
    progress.log(f"loading {model}")
    net, tokenizer = load_model(source, dtype=dtype, trust_remote_code=trust_remote_code)
    timings["load"] = time.perf_counter() - start
    select_targets(net, targets, ignore)  # bad patterns fail here, before any calibration work
    params_before = _unique_params(net)
    model_dtype = str(next(net.parameters()).dtype).removeprefix("torch.")

    start = time.perf_counter()
    if seq_len is None:
        seq_len = min(DEFAULT_SEQ_LEN, getattr(net.config, "max_position_embeddings", None) or DEFAULT_SEQ_LEN)
    calibration = load_calibration(calib, net, tokenizer, num_samples, seq_len, seed=seed, split=calib_split,
                                   text_column=text_column, progress=progress)
    timings["calibration_data"] = time.perf_counter() - start

    settings = Settings(ratio=ratio, method=method, targets=targets, ignore=ignore, propagate=propagate, damp=damp,
                        alpha=alpha, batch_size=batch_size, device=device)
    result = compress_model(net, calibration.input_ids, settings, progress=progress)

    block = {
        "format_version": 1,
        "tool_version": __version__,
        "method": method,
        "ratio": ratio,
        "ratio_definition": RATIO_DEFINITION,
        "ranks": {layer.name: layer.rank for layer in result.layers if layer.rank is not None},
        "dense": [layer.name for layer in result.layers if layer.rank is None],
        "base_model": source.spec,
        "base_model_type": net.config.model_type,
        "base_architectures": [type(net).__name__],
        "calibration": calibration.provenance,
        "settings": {"propagate": propagate, "damp": damp, "alpha": alpha, "targets": targets, "ignore": ignore},
    }
    command = command or "lowrank compress " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    report = build_report(
        result=result, settings=settings, calibration=calibration.provenance, source=source,
        model_params_before=params_before, model_params_after=_unique_params(net),
        bytes_dense=params_before * next(net.parameters()).element_size(), bytes_after=0, files=[],
        dtype=model_dtype, command=command, extra_timings=timings,
    )

    def extra_files(bytes_after, files, seconds):
        report["size"].update(bytes_after=bytes_after, files=files)
        report["timings_s"]["write_weights"] = round(seconds, 3)
        return {
            "compression_report.json": json.dumps(report, indent=2) + "\n",
            "compression_report.md": to_markdown(report),
            "README.md": model_card(report, output),
        }

    write_checkpoint(net, output, source=source, tokenizer=tokenizer, block=block, extra_files=extra_files,
                     max_shard_bytes=max_shard_bytes)
    return report


def model_card(report, output):
    name = os.path.basename(os.path.abspath(output))
    t = report["ratio"]["targets"]
    worst = worst_layers(report, 5)
    worst_text = ", ".join(f"{layer['name']} ({layer['rel_error']:.3f})" for layer in worst) or "none"
    return f"""# {name}

A low-rank factorized version of `{report['model']['source']}`, made with
[lowrank](https://pypi.org/project/lowrank/) {report['versions']['lowrank']}:

`{report['command']}`

- method: `{report['method']['name']}`; ratio {report['ratio']['requested']:g} = {RATIO_DEFINITION}
- targeted layers: {t['params_before']:,} -> {t['params_after']:,} parameters (removed {t['removed']:.1%})
- size: {human_bytes(report['size']['bytes_after'])} ({report['model']['dtype']})
- worst layers by relative calibration output error: {worst_text}

## Load it

```python
import lowrank
model = lowrank.load_pretrained("{name}")            # with lowrank installed

from transformers import AutoModelForCausalLM     # without lowrank: bundled modeling_lowrank.py
model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)
```

Evaluate: `lm_eval --model hf --model_args pretrained={name},trust_remote_code=True --tasks wikitext`

Each factorized linear `X` is stored as `X.down.weight` (rank x in) and `X.up.weight` (out x rank, with the
bias); `lowrank densify` turns the checkpoint back into the original dense architecture. The full report is
in `compression_report.json`.
"""

