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

from ..errors import LowrankError
from ..io.publish import publish, staging_dir
from .api import (
    algorithm_info,
    decompose,
    error_if_nonfinite,
    factor_dtype,
    module_rank,
    ordered_results,
    output_scale,
    remove_quietly,
    rule_info,
    rule_warnings,
    scaling_info,
    source_info,
    write_report_files,
)

OLD_REPORTS = ("squeeze_report.json", "squeeze_report.md")


def _squeezed_tensors(source, job, k, settings, base, fan_in_fan_out):
    """[(key, tensor)] of one module after the squeeze, and its report line. k None: decompose the module here
    and pick its rank by the (per-module) rule."""
    import torch

    from ..core.factor_svd import F64, as_float64, stored_error
    from .report import layer_entry

    module = job.module
    b_raw, a_raw = source.tensor(module.keys["b"]), source.tensor(module.keys["a"])
    b, a = module.flat(b_raw, a_raw)
    b64, a64 = as_float64(b), a.to(F64)
    if job.decomposition is None:
        job.decomposition = decompose(job, b64, a64, settings)
    if k is None:
        k = module_rank(job, settings)
    alpha_dtype = None
    if source.format != "peft":
        alpha_dtype = source.tensor(module.keys["alpha"]).dtype if "alpha" in module.keys else torch.float32
    alpha, scale, _ = output_scale(job, k, settings, source if source.format == "peft" else None, alpha_dtype)
    up, down = job.decomposition.factors(b64, a64, k, scale)
    up = up.to(factor_dtype(settings.dtype, b_raw.dtype))
    down = down.to(factor_dtype(settings.dtype, a_raw.dtype))
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
    return out, layer_entry(job, k, scale, alpha, error_sq, true_error)


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


def _provenance(source, out_ranks, settings):
    info = {"source_rank": sorted({m.rank for m in source.modules}), "rank": sorted(set(out_ranks)),
            "rule": settings.rule, "value": settings.value, "algorithm": settings.algorithm,
            "alpha_policy": settings.policy}
    from .. import __version__

    return {"lowrank_squeeze": json.dumps({"lowrank": __version__, **info}, sort_keys=True)}


def write_adapter(source, jobs, ranks, output, settings, *, base, progress, command, timings, started):
    """Write the squeezed adapter. `ranks` None: each module is decomposed here and ranked by the per-module rule
    (one pass); else the ranks of pass 1 (--budget), with the modules' decompositions already made."""
    from ..io.shards import ShardWriter
    from .formats import LEGACY_NAME, kohya_metadata, squeezed_config
    from .report import build

    by_key = {key: job for job in jobs for role, key in job.module.keys.items() if role in ("a", "b", "bias", "alpha")}
    rank_of = {job.name: k for job, k in zip(jobs, ranks or [None] * len(jobs))}
    fan_in_fan_out = bool((source.config or {}).get("fan_in_fan_out"))
    staging = staging_dir(output)
    remove_quietly(staging)
    os.makedirs(staging)
    start = time.perf_counter()
    try:
        target = os.path.join(staging, source.subfolder) if source.subfolder else staging
        os.makedirs(target, exist_ok=True)
        prefix = "adapter_model" if source.format == "peft" else "weights"
        writer = ShardWriter(target, 2**62, prefix=prefix)
        layers, done = [], set()
        progress.start("write", len(jobs))
        results = ordered_results(lambda job: _squeezed_tensors(source, job, rank_of[job.name], settings, base,
                                                                fan_in_fan_out), jobs, settings.workers)
        with closing(results):  # modules come in file order (jobs are), computed a few ahead by the workers
            for key in source.keys:  # every other tensor is copied where it was
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
                    error_if_nonfinite(name, tensor)
                    writer.add(name, tensor)
                layers.append(entry)
                progress.advance("write", job.name)
        if ranks is None:  # ranked during this pass
            rule_warnings(settings)
        alphas = [layer["alpha"] for layer in layers]
        names = [layer["name"] for layer in layers]
        out_ranks = [layer["rank"] for layer in layers]
        if source.format == "peft":
            writer.metadata = {**source.metadata, **_provenance(source, out_ranks, settings)}
        elif source.format == "kohya":
            comment = (f"squeezed by lowrank from rank {sorted({m.rank for m in source.modules})} to "
                       f"{sorted(set(out_ranks))} ({settings.rule} {settings.value})")
            writer.metadata = {**kohya_metadata(source.metadata, out_ranks, alphas, comment),
                               **_provenance(source, out_ranks, settings)}
        else:
            writer.metadata = {**source.metadata, **_provenance(source, out_ranks, settings)}
        files = writer.finish()
        weights_path = os.path.join(target, files[0])
        timings["write" if "decompose" in timings else "decompose_and_write"] = time.perf_counter() - start
        timings["total"] = time.perf_counter() - started
        rule = rule_info(settings)
        scaling = scaling_info(layers, settings, source.format == "peft")
        if source.format == "peft":
            _, _, rslora = output_scale(jobs[0], out_ranks[0], settings, source)
            config = squeezed_config(source.config, names, out_ranks, alphas, rslora)
            scaling.update(r=config["r"], lora_alpha=config["lora_alpha"], use_rslora=bool(config.get("use_rslora")),
                           rank_pattern=len(config["rank_pattern"]), alpha_pattern=len(config["alpha_pattern"]))
            with open(os.path.join(target, "adapter_config.json"), "w") as f:
                json.dump(config, f, indent=2)
                f.write("\n")
            _copy_other_files(source, target)
            if source.weights.endswith(LEGACY_NAME):
                settings.warnings.append("the legacy adapter_model.bin was written as adapter_model.safetensors")
        dora = None
        if any(job.dora for job in jobs):
            measured = [layer["dora_true_rel_error"] for layer in layers if "dora_true_rel_error" in layer]
            dora = {"modules": sum(job.dora for job in jobs), "base_model": base.spec if base else None,
                    "note": ("magnitudes kept; energy and errors are of the direction update s·B·A. "
                             + (f"True DoRA weight error vs the base model: mean {sum(measured) / len(measured):.4g}, "
                                f"max {max(measured):.4g}" if measured else
                                "The true error of the DoRA weights needs the base weights: pass --base-model"))}
        report = build(command=command, source=source_info(source, jobs), rule=rule,
                       algorithm=algorithm_info(settings), scaling=scaling, layers=layers,
                       output={"path": output, "format": source.format, "files": files, "dtype": settings.dtype},
                       bytes_before=os.path.getsize(source.weights), bytes_after=os.path.getsize(weights_path),
                       warnings=settings.warnings, timings=timings, dora=dora)
        for warning in settings.warnings:
            progress.log(f"warning: {warning}")
        if source.format == "peft":
            write_report_files(report, staging)
            publish(staging, output)
        else:
            stem = os.path.abspath(output)[: -len(".safetensors")]
            write_report_files(report, staging, "report")
            for suffix in ("json", "md"):
                os.replace(os.path.join(staging, f"report.{suffix}"), f"{stem}.squeeze_report.{suffix}")
            os.replace(weights_path, os.path.abspath(output))  # the weights last: they are what users load
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report


def _copy_other_files(source, target):
    """README, tokenizer files... of the adapter directory, unchanged (not its weights, config or old reports)."""
    from .formats import CONFIG_NAME, LEGACY_NAME, SAFETENSORS_NAME

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
