"""Pass 2 of `lowrank squeeze`: write the squeezed adapter (atomically) in the input's format, with its report.

PEFT: a directory (written as a hidden staging sibling, renamed at the end); adapter_config.json is the input's
with r / lora_alpha / rank_pattern / alpha_pattern rewritten, every other file of the adapter directory is copied.
Single files: the .safetensors and <stem>.squeeze_report.json / .md beside it, each renamed into place when complete.
"""

import json
import os
import shutil
import time
from contextlib import closing

from .. import __version__
from ..errors import LowrankError
from ..io.publish import name_failed_write, new_staging_dir, publish
from .formats import CONFIG_NAME, LEGACY_NAME, SAFETENSORS_NAME, kohya_metadata, squeezed_config
from .plan import decompose, factor_dtype, module_rank, ordered_results, output_scale, rule_warnings
from .report import algorithm_info, build, rule_info, scaling_info, source_info, squeeze_layer_entry, write_report_files

OLD_REPORTS = ("squeeze_report.json", "squeeze_report.md")


def write_adapter(source, jobs, ranks, output, plan, notes, *, base, progress, command, timings, started):
    """Write the squeezed adapter. `ranks` None: each module is decomposed here and ranked by the per-module rule
    (one pass); else the ranks of pass 1 (--budget), with the modules' decompositions already made."""
    from ..io.shards import ShardWriter

    staging = new_staging_dir(output)
    start = time.perf_counter()
    try:
        target = os.path.join(staging, source.subfolder) if source.subfolder else staging
        os.makedirs(target, exist_ok=True)
        writer = ShardWriter(target, 2**62, prefix="adapter_model" if source.format == "peft" else "weights")
        layers = _write_modules(source, jobs, ranks, plan, notes, base, writer, progress)
        if ranks is None:  # ranked during this pass
            rule_warnings(plan, notes)
        if layers and all(not layer["sigma_1"] > 0 for layer in layers):
            notes.warnings.append("every module's update s·B·A is zero: the adapter looks untrained (PEFT starts B "
                                  "at zero), so the squeezed adapter changes nothing either")
        writer.metadata = _metadata(source, layers, plan)
        files = writer.finish()
        weights_path = os.path.join(target, files[0])
        timings["write" if "decompose" in timings else "decompose_and_write"] = time.perf_counter() - start
        timings["total"] = time.perf_counter() - started
        scaling = scaling_info(layers, plan, notes, source.format == "peft")
        if source.format == "peft":
            config = _write_config(source, jobs, layers, plan, target)
            scaling.update(r=config["r"], lora_alpha=config["lora_alpha"], use_rslora=bool(config.get("use_rslora")),
                           rank_pattern=len(config["rank_pattern"]), alpha_pattern=len(config["alpha_pattern"]))
            _copy_other_files(source, target)
            if source.weights.endswith(LEGACY_NAME):
                notes.warnings.append("the legacy adapter_model.bin was written as adapter_model.safetensors")
        report = build(command=command, source=source_info(source, jobs), rule=rule_info(plan),
                       algorithm=algorithm_info(plan), scaling=scaling, layers=layers,
                       output={"path": output, "format": source.format, "files": files, "dtype": plan.dtype},
                       bytes_before=os.path.getsize(source.weights), bytes_after=os.path.getsize(weights_path),
                       warnings=notes.warnings, timings=timings, dora=_dora_info(jobs, layers, base))
        for warning in notes.warnings:
            progress.log(f"warning: {warning}")
        _publish(report, staging, output, source.format, weights_path)
    except BaseException as error:
        name_failed_write(error, output)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report


def _write_modules(source, jobs, ranks, plan, notes, base, writer, progress):
    """Every tensor of the source in file order: the squeezed modules' new ones, every other tensor copied where
    it was. Returns the modules' report lines."""
    by_key = {key: job for job in jobs for role, key in job.module.keys.items() if role in ("a", "b", "bias", "alpha")}
    rank_of = {job.name: k for job, k in zip(jobs, ranks or [None] * len(jobs))}
    fan_in_fan_out = bool((source.config or {}).get("fan_in_fan_out"))
    layers, done = [], set()
    progress.start("write", len(jobs))
    results = ordered_results(lambda job: _squeezed_tensors(source, job, rank_of[job.name], plan, notes, base,
                                                            fan_in_fan_out), jobs, plan.workers)
    with closing(results):  # modules come in file order (jobs are), computed a few ahead by the workers
        for key in source.keys:
            job = by_key.get(key)
            if job is None:
                writer.add(key, source.tensor(key))
                continue
            if job.name in done:
                continue
            done.add(job.name)
            tensors, entry = next(results)
            assert entry["name"] == job.name
            for name, tensor in tensors:
                writer.add(name, tensor)  # which refuses NaN or Inf
            layers.append(entry)
            progress.advance("write", job.name)
    return layers


def _squeezed_tensors(source, job, k, plan, notes, base, fan_in_fan_out):
    """[(key, tensor)] of one module after the squeeze, and its report line. k None: decompose the module here
    and pick its rank by the (per-module) rule."""
    import torch

    from ..core.factor_svd import F64, as_float64, stored_error

    module = job.module
    b_raw, a_raw = source.tensor(module.keys["b"]), source.tensor(module.keys["a"])
    b, a = module.flat(b_raw, a_raw)
    b64, a64 = as_float64(b), a.to(F64)
    if job.decomposition is None:
        job.decomposition = decompose(job, b64, a64, plan)
    if k is None:
        k = module_rank(job, plan, notes)
    alpha_dtype = None
    if source.format != "peft":
        alpha_dtype = source.tensor(module.keys["alpha"]).dtype if "alpha" in module.keys else torch.float32
    alpha, scale, _ = output_scale(job, k, plan, source if source.format == "peft" else None, alpha_dtype)
    up, down = job.decomposition.factors(b64, a64, k, scale)
    up = up.to(factor_dtype(plan.dtype, b_raw.dtype))
    down = down.to(factor_dtype(plan.dtype, a_raw.dtype))
    error_sq = stored_error(lambda x: job.scale_before * ((a64 @ x).T @ b64.T).T, job.decomposition.total, up, down,
                            scale)
    new_b, new_a = module.unflat(up, down)
    out = [(module.keys["a"], new_a.contiguous()), (module.keys["b"], new_b.contiguous())]
    if "bias" in module.keys:  # PEFT multiplies lora_B's bias by the scale too: keep scale·bias
        bias = source.tensor(module.keys["bias"])
        out.append((module.keys["bias"], (bias.to(F64) * (job.scale_before / scale)).to(bias.dtype)))
    if alpha_dtype is not None and ("alpha" in module.keys or scale != 1.0):
        out.append((module.keys.get("alpha", module.prefix + ".alpha"), torch.tensor(alpha, dtype=alpha_dtype)))
    true_error = None
    if base is not None and job.dora:
        true_error = dora_true_error(source, job, base, b64 @ a64 * job.scale_before,
                                     scale * (up.to(F64) @ down.to(F64)), fan_in_fan_out)
    return out, squeeze_layer_entry(job, k, scale, alpha, error_sq, true_error)


def dora_true_error(source, job, base, delta_before, delta_after, fan_in_fan_out):
    """Relative error of the effective DoRA weight m ⊙ (W0 + dW) / ||W0 + dW||_row after the squeeze, measured
    against the effective update before it (W_dora - W0). None for embeddings (PEFT normalises them differently)."""
    from ..core.factor_svd import F64

    module = job.module
    if module.kind == "embedding":
        return None
    w0 = base.get(base.find(module.name + ".weight")).to(F64)
    if fan_in_fan_out and module.kind == "linear":
        w0 = w0.T
    w0 = w0.reshape(w0.shape[0], -1)
    if tuple(w0.shape) != tuple(delta_before.shape):
        raise LowrankError(f"the base weight of {module.name} has shape {list(w0.shape)}, the adapter's update "
                           f"{list(delta_before.shape)}; --base-model is not this adapter's base")
    magnitude = source.tensor(module.keys["magnitude"]).to(F64).reshape(-1, 1)

    def effective(delta):
        weight = w0 + delta
        return magnitude * weight / weight.norm(dim=1, keepdim=True)

    before = effective(delta_before)
    reference = (before - w0).norm()
    return float((effective(delta_after) - before).norm() / reference) if reference > 0 else 0.0


def _metadata(source, layers, plan):
    """The safetensors metadata: the source's (kohya's ss_* rewritten for the new ranks), plus our provenance."""
    alphas, out_ranks = [layer["alpha"] for layer in layers], [layer["rank"] for layer in layers]
    provenance = _provenance(source, out_ranks, plan)
    if source.format == "kohya":
        comment = (f"squeezed by lowrank from rank {sorted({m.rank for m in source.modules})} to "
                   f"{sorted(set(out_ranks))} ({plan.rule} {plan.value})")
        return {**kohya_metadata(source.metadata, out_ranks, alphas, comment), **provenance}
    return {**source.metadata, **provenance}


def _provenance(source, out_ranks, plan):
    info = {"source_rank": sorted({m.rank for m in source.modules}), "rank": sorted(set(out_ranks)),
            "rule": plan.rule, "value": plan.value, "algorithm": plan.algorithm, "alpha_policy": plan.policy}
    return {"lowrank_squeeze": json.dumps({"lowrank": __version__, **info}, sort_keys=True)}


def _write_config(source, jobs, layers, plan, target):
    """adapter_config.json: the input's, with r / lora_alpha / rank_pattern / alpha_pattern rewritten."""
    names, out_ranks = [layer["name"] for layer in layers], [layer["rank"] for layer in layers]
    alphas = [layer["alpha"] for layer in layers]
    _, _, rslora = output_scale(jobs[0], out_ranks[0], plan, source)
    config = squeezed_config(source.config, names, out_ranks, alphas, rslora)
    with open(os.path.join(target, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    return config


def _copy_other_files(source, target):
    """README, tokenizer files... of the adapter directory, unchanged (not its weights, config or old reports)."""
    skip = {CONFIG_NAME, SAFETENSORS_NAME, LEGACY_NAME, *OLD_REPORTS}
    for name in sorted(os.listdir(source.directory)):
        path = os.path.join(source.directory, name)
        if os.path.isfile(path) and name not in skip:
            shutil.copy2(path, os.path.join(target, name))
    if source.subfolder:  # the files beside the sub-folder (a README, a tokenizer) come too
        for name in sorted(os.listdir(source.path)):
            path = os.path.join(source.path, name)
            if os.path.isfile(path) and name not in OLD_REPORTS:
                shutil.copy2(path, os.path.join(os.path.dirname(target), name))


def _dora_info(jobs, layers, base):
    """The report's DoRA block (None without DoRA modules): the magnitudes are kept, so energy and errors are of
    the direction update; the true error of the DoRA weights is measured only with --base-model."""
    if not any(job.dora for job in jobs):
        return None
    measured = [layer["dora_true_rel_error"] for layer in layers if "dora_true_rel_error" in layer]
    return {"modules": sum(job.dora for job in jobs), "base_model": base.spec if base else None,
            "note": ("magnitudes kept; energy and errors are of the direction update s·B·A. "
                     + (f"True DoRA weight error vs the base model: mean {sum(measured) / len(measured):.4g}, "
                        f"max {max(measured):.4g}" if measured else
                        "The true error of the DoRA weights needs the base weights: pass --base-model"))}


def _publish(report, staging, output, source_format, weights_path):
    """PEFT: the staging directory, reports included, becomes the output. A single file: its reports go beside it
    as <stem>.squeeze_report.json / .md, then the weights."""
    if source_format == "peft":
        write_report_files(report, staging)
        publish(staging, output)
        return
    stem = os.path.abspath(output)[: -len(".safetensors")]
    write_report_files(report, staging, "report")
    for suffix in ("json", "md"):
        os.replace(os.path.join(staging, f"report.{suffix}"), f"{stem}.squeeze_report.{suffix}")
    os.replace(weights_path, os.path.abspath(output))  # the weights last: they are what users load
    shutil.rmtree(staging, ignore_errors=True)
