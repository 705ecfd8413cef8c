"""`lowrank.compress`: load a model, calibrate, factorize its block linears, write the checkpoint and report.

One flow for both ways of holding the model. In memory (any source) or streamed (a safetensors checkpoint:
a weightless skeleton filled one block at a time), the output is written the same way and in the same order:
the tensors before the blocks, each block as soon as it is compressed, the tensors after the blocks. So the
two produce the same bytes, and after every block a journal makes the work so far durable for `--resume`.
"""

import json
import os
import time
from dataclasses import asdict

from .. import __version__
from ..core.ranks import RATIO_DEFINITION
from ..device import resolve_device
from ..environment import invocation
from ..errors import Interrupted, UsageError
from ..io.checkpoint import CheckpointWriter, partition_keys, tied_names
from ..io.loading import load_model, load_tokenizer, resolve_model
from ..io.modeling_lowrank import LowRankLinear, linear_shape
from ..io.publish import check_output, staging_dir
from ..io.shards import parse_size
from ..methods import METHODS
from ..progress import SILENT
from ..report.compression import SPECTRA_FILE, build_report, human_bytes, spectra_bytes, to_markdown, worst_layers
from . import resume
from .pipeline import LayerResult, Settings, compress_model, keep_large_allocations_returnable
from .targets import select_targets


def validate(ratio, method):
    if not 0 < ratio <= 1:
        raise UsageError(f"--ratio must be in (0, 1] (the fraction of parameters kept), got {ratio}")
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


def weight_bytes(source):
    if source.kind != "dir":
        return None
    return sum(os.path.getsize(os.path.join(source.path, name)) for name in os.listdir(source.path)
               if name.endswith(".safetensors"))


def memory_bytes():
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def offload_limit(budget):
    """--offload-budget: None, a byte count, a size string, or "auto" (a quarter of this machine's memory)."""
    if budget is None or isinstance(budget, int):
        return budget
    if budget == "auto":
        return memory_bytes() // 4
    return parse_size(budget)


def resolve_alloc(alloc, method, streaming, distributed, model):
    """--alloc auto: the measured best (fisher, see BENCHMARKS.md) where it applies, else uniform.
    Returns (allocation, why it is not fisher or None)."""
    if alloc != "auto":
        return alloc, None
    from ..core.fisher import has_lm_head

    if method != "whiten":
        return "uniform", f"the Fisher-weighted allocation was measured with --method whiten, not {method}"
    if streaming or distributed:
        return "uniform", "the Fisher-weighted allocation needs the whole model in one process"
    if not has_lm_head(model):
        return "uniform", "the Fisher-weighted allocation needs a language-model head"
    return "fisher", None


def choose_streaming(stream, source, method, alloc, calib):
    """Stream when asked, or (auto) when a safetensors checkpoint outweighs a quarter of this machine's memory."""
    size = weight_bytes(source)
    why_not = None
    if not size:
        why_not = "only local safetensors checkpoints can be streamed"
    elif method == "fwsvd" or alloc in ("fisher", "sensitivity"):
        why_not = "--method fwsvd and --alloc fisher/sensitivity need the whole model at once"
    elif calib in ("self", "auto"):
        why_not = "streaming needs calibration text (--calib FILE or a dataset): --calib self runs the whole model"
    if stream == "on" and why_not:
        raise UsageError(f"--stream: {why_not}")
    if stream == "auto":
        return why_not is None and size > memory_bytes() / 4
    return stream == "on"


def _layer_from_dict(entry):
    return LayerResult(entry["name"], entry["shape"][0], entry["shape"][1], entry["rank"], entry["params_before"],
                       entry["params_after"], entry["energy_kept"], entry["predicted_energy_kept"],
                       entry["rel_error"], dense_reason=entry.get("dense_reason"), info=entry.get("info", {}))


def _layer_to_dict(layer):
    from ..report.compression import layer_entry

    return layer_entry(layer)


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
    alloc="auto",
    min_rank_fraction=0.1,
    anchor=False,
    refit=False,
    refine_steps=0,
    refine_lr=1e-4,
    damp=1e-4,
    alpha=0.5,
    text_column="text",
    calib_split="train",
    max_shard_size="5GB",
    stream="auto",
    offload_budget="auto",
    offload_dir=None,
    resume_run=False,
    overwrite=False,
    trust_remote_code=False,
    progress=SILENT,
    command=None,
):
    """Compress `model` (a directory, .gguf file, hub id or pkg:NAME) and write a factorized checkpoint to `output`.

    `ratio` is the fraction of the targeted linear layers' parameters that is kept. `stream` ("auto", "on",
    "off") holds one block in memory at a time; `resume_run` continues an interrupted run into the same output.
    `offload_budget` (bytes, a size such as "8GB", "auto" = a quarter of this machine's memory, or None) caps
    the calibration hidden states kept in memory per stream; the rest go to files in `offload_dir`.
    Returns the report (a dict, also written as compression_report.json).
    """
    import torch

    from lowrank.calibration import load_calibration

    from .distributed import from_environment

    validate(ratio, method)
    if stream not in ("auto", "on", "off"):
        raise UsageError(f"--stream must be auto, on or off, got {stream!r}")
    max_shard_bytes = parse_size(max_shard_size)
    offload_bytes = offload_limit(offload_budget)
    device = resolve_device(device)
    dist = from_environment(device)  # torchrun: several processes share the work, rank 0 writes
    main = dist is None or dist.main
    if not main:
        progress = SILENT
    source = resolve_model(model)
    check_output(output, source.local_dir, overwrite)
    timings = {}
    torch.manual_seed(seed)

    start = time.perf_counter()
    streaming = choose_streaming(stream, source, method, alloc, calib)
    if streaming:  # flat memory over any depth; costs ~30% on the block passes (page faults), so only here
        keep_large_allocations_returnable()
    progress.log(f"loading {model}" + (" (streaming: one block in memory at a time)" if streaming else ""))
    blocks_source = skeleton = None
    if streaming:
        from ..io.loading import read_config
        from ..io.streaming import Skeleton, StreamingBlocks

        config = read_config(source) or {}
        if str(config.get("model_type", "")).startswith("lowrank_"):
            raise UsageError(f"{model} is already a lowrank factorized checkpoint; compress the original model")
        skeleton = Skeleton(source, dtype, trust_remote_code)
        net, tokenizer = skeleton.model, load_tokenizer(source, trust_remote_code)
    else:
        net, tokenizer = load_model(source, dtype=dtype, trust_remote_code=trust_remote_code)
    timings["load"] = time.perf_counter() - start
    blocks_name, _, _ = select_targets(net, targets, ignore)  # bad patterns fail here, before any calibration
    alloc_requested = alloc
    alloc, why = resolve_alloc(alloc, method, streaming, dist is not None, net)
    if alloc_requested == "auto":
        progress.log(f"--alloc auto: {alloc} (" + (why or "Fisher-weighted global ranks; --alloc uniform gives the "
                                                    "papers' one rank rule") + ")")
    tied = tied_names(net)
    before, after = partition_keys(net, blocks_name, tied)
    if streaming:
        skeleton.prefix_keys = before
        blocks_source = StreamingBlocks(skeleton, blocks_name)
    params_before = sum(t.numel() for name, t in net.state_dict().items() if name not in tied)
    model_dtype = str(next(net.parameters()).dtype).removeprefix("torch.")
    element_size = next(net.parameters()).element_size()

    start = time.perf_counter()
    calibration = load_calibration(calib, net, tokenizer, num_samples, seq_len, seed=seed, split=calib_split,
                                   text_column=text_column, progress=progress)
    timings["calibration_data"] = time.perf_counter() - start

    settings = Settings(ratio=ratio, method=method, targets=targets, ignore=ignore, propagate=propagate, damp=damp,
                        alpha=alpha, batch_size=batch_size, device=device, alloc=alloc,
                        min_rank_fraction=min_rank_fraction, anchor=anchor, refit=refit, refine_steps=refine_steps,
                        refine_lr=refine_lr, offload_budget=offload_bytes, offload_dir=offload_dir)
    expected = resume.fingerprint(
        version=__version__, source=source.spec, config=net.config.to_dict(), dtype=model_dtype,
        settings={k: v for k, v in asdict(settings).items() if k not in ("device", "offload_budget", "offload_dir")},
        calibration=resume.tensor_digest(calibration.input_ids), max_shard_bytes=max_shard_bytes,
    )
    staging = staging_dir(output)
    journal = None
    if resume_run:
        journal = resume.check(resume.load(staging), expected, staging)
        if journal is None:
            progress.log(f"--resume: no interrupted run to continue in {staging}; starting from the beginning")
    elif resume.load(staging) is not None:
        progress.log(f"discarding the partial output of an earlier run in {staging} (pass --resume to continue it)")
    if dist is not None:
        dist.barrier()  # every rank has read the journal before rank 0 may start a fresh staging directory

    writer = CheckpointWriter(output, max_shard_bytes, state=journal["writer"] if journal else None) if main else None
    done = journal["blocks_done"] if journal else 0
    layers = [_layer_from_dict(entry) for entry in journal["layers"]] if journal else []
    if journal and journal.get("ranks") is not None:
        settings.ranks = journal["ranks"]

    # only what lies outside the blocks: a reference to a block's weights would keep them alive beside the factors
    outside = set(before) | set(after)
    state = None if streaming else {k: v for k, v in net.state_dict().items() if k in outside}

    def tensor(name):
        return skeleton.load(name) if streaming else state[name]

    def block_done(index, block, block_layers):
        if not main:
            return
        prefix = f"{blocks_name}.{index}."
        for name, value in block.state_dict().items():
            writer.add(prefix + name, value)
        layers.extend(block_layers)
        state = writer.state()
        resume.save(staging, {"fingerprint": expected, "blocks_done": index + 1, "writer": state,
                              "layers": [_layer_to_dict(layer) for layer in layers], "ranks": settings.ranks})
        writer.shards.commit()

    def replay(index, block):
        """Rebuild block `index` as the earlier run left it, from the factors already written."""
        staged = resume.StagedTensors(staging, journal["writer"])
        prefix = f"{blocks_name}.{index}."
        for layer in layers:
            if layer.name.startswith(prefix) and layer.rank is not None:
                rel = layer.name[len(prefix):]
                module = block.get_submodule(rel)
                m, n, has_bias = linear_shape(module)
                parent, _, child = rel.rpartition(".")
                setattr(block.get_submodule(parent) if parent else block, child,
                        LowRankLinear(n, m, layer.rank, bias=has_bias, dtype=next(block.parameters()).dtype))
        block.load_state_dict({name: staged.get(prefix + name) for name in block.state_dict()}, assign=True)

    try:
        if main and not journal:
            for name in before:
                writer.add(name, tensor(name))
        result = compress_model(net, calibration.input_ids, settings, progress=progress, source=blocks_source,
                                on_block_done=block_done, start=done, replay=replay, dist=dist)
        if not main:
            return None
        for name in after:
            writer.add(name, tensor(name))
    except BaseException as error:
        if not main:
            raise
        journal = resume.load(staging)
        if journal is None:  # nothing durable yet: leave nothing behind
            writer.abort()
            raise
        if isinstance(error, KeyboardInterrupt):
            raise Interrupted(f"interrupted after block {journal['blocks_done']}; the work so far is kept in "
                              f"{staging}: run the same command with --resume to continue") from None
        raise
    result.layers = layers

    block = {
        "format_version": 1,
        "tool_version": __version__,
        "method": method,
        "ratio": ratio,
        "ratio_definition": RATIO_DEFINITION,
        "ranks": {layer.name: layer.rank for layer in layers if layer.rank is not None},
        "dense": [layer.name for layer in layers if layer.rank is None],
        "base_model": source.spec,
        "base_model_type": net.config.model_type,
        "base_architectures": [type(net).__name__],
        "calibration": calibration.provenance,
        "settings": {"propagate": propagate, "alloc": alloc, "alloc_requested": alloc_requested, "anchor": anchor,
                     "refit": refit,
                     "refine_steps": refine_steps, "damp": damp, "alpha": alpha, "targets": targets, "ignore": ignore},
    }
    params_after = params_before - sum(layer.params_before - layer.params_after for layer in layers)
    command = command or invocation()
    report = build_report(
        result=result, settings=settings, calibration=calibration.provenance, source=source,
        model_params_before=params_before, model_params_after=params_after,
        bytes_dense=params_before * element_size, bytes_after=0, files=[],
        dtype=model_dtype, command=command, extra_timings=timings,
    )
    report["streamed"] = streaming
    report["offload_budget_bytes"] = offload_bytes
    report["processes"] = dist.world if dist else 1
    report["resumed_at_block"] = done or None

    def extra_files(bytes_after, files, seconds):
        report["size"].update(bytes_after=bytes_after, files=files)
        report["timings_s"]["write_weights"] = round(seconds, 3)
        extra = {
            "compression_report.json": json.dumps(report, indent=2) + "\n",
            "compression_report.md": to_markdown(report),
            "README.md": model_card(report, output),
        }
        spectra = spectra_bytes(layers)  # optional: read by `lowrank report --plot`
        if spectra is not None:
            extra[SPECTRA_FILE] = spectra
        return extra

    writer.finish(net, source=source, tokenizer=tokenizer, block=block, extra_files=extra_files)
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
