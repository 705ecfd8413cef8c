"""Extract a LoRA from a dense fine-tune: dW = W_finetuned - W_base for every linear layer (mergekit's extract-lora
job), by randomized SVD, reading one pair of tensors at a time.

The module types come from the fine-tuned model's architecture built on the meta device (no weights loaded):
nn.Linear and GPT-2's Conv1D (stored transposed, PEFT's fan_in_fan_out) become LoRA pairs, with a changed bias as
lora_B.bias (exact); any other module whose tensors changed (embeddings, norms, a new head) is saved whole in
modules_to_save, like PEFT does. Unchanged layers are left out. The output is a PEFT adapter directory with scale 1
(alpha = r per module), so consumers that ignore rank_pattern / alpha_pattern still scale it correctly.
"""

import json
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass

from ..errors import LowrankError, UsageError
from ..io.publish import check_output, staged
from .formats import peft_patterns
from .plan import Job, choose_ranks, error_if_nonfinite, factor_dtype, output_scale, rank_cap, rule_tag, with_budget
from .report import (
    algorithm_info,
    analysis_report,
    build,
    rule_info,
    scaling_info,
    squeeze_layer_entry,
    write_report_files,
)

TASK_TYPES = {"ForCausalLM": "CAUSAL_LM", "ForSequenceClassification": "SEQ_CLS",
              "ForTokenClassification": "TOKEN_CLS", "ForQuestionAnswering": "QUESTION_ANS",
              "ForConditionalGeneration": "SEQ_2_SEQ_LM", "ForSeq2SeqLM": "SEQ_2_SEQ_LM"}
PREFIX = "base_model.model."


@dataclass
class Delta:
    key: str  # the weight's key in the fine-tuned checkpoint
    base_key: str
    transpose: bool  # Conv1D stores (in, out)
    bias_key: str | None = None
    bias_changed: bool = False


def module_types(tensors, trust_remote_code):
    """{module path: "linear" | "conv1d" | other class name} from the architecture on the meta device."""
    import torch
    import transformers

    from ..io.loading import model_class

    model = getattr(tensors, "model", None)
    if model is None:
        try:
            config = transformers.AutoConfig.from_pretrained(tensors.source.path, trust_remote_code=trust_remote_code)
            cls = model_class(tensors.config, trust_remote_code)
            with torch.device("meta"):
                model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
        except (OSError, ValueError, KeyError) as error:
            raise LowrankError(f"cannot build the architecture of {tensors.spec} ({error})") from None
    types = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            types[name] = "linear"
        elif type(module).__name__ == "Conv1D":
            types[name] = "conv1d"
        else:
            types[name] = type(module).__name__
    return types


def _task_type(config):
    for arch in (config or {}).get("architectures") or []:
        for suffix, task in TASK_TYPES.items():
            if arch.endswith(suffix):
                return task
    return None


def _delta(base, finetuned, delta):
    import torch

    weight = finetuned.get(delta.key).to(torch.float32)
    difference = weight - base.get(delta.base_key).to(torch.float32)
    return difference.T if delta.transpose else difference


def extract(config, output, plan, notes, *, progress, command, started):
    """Extract a LoRA from config.finetuned - config.base_model and write it to `output` (a PEFT directory), or
    only report with config.analyze. Returns the report."""
    from ..io.tensors import CheckpointTensors

    base_spec, finetuned_spec = config.base_model, config.finetuned
    base = CheckpointTensors(base_spec, config.trust_remote_code)
    finetuned = CheckpointTensors(finetuned_spec, config.trust_remote_code)
    if not config.analyze:
        output = output or f"{os.path.normpath(finetuned_spec.removeprefix('pkg:'))}-lora-{rule_tag(plan)}"
        check_output(output, finetuned.source.local_dir, config.overwrite)
        check_output(output, base.source.local_dir, True)
    jobs, targeted = _linear_jobs(module_types(finetuned, config.trust_remote_code), base, finetuned)
    if not jobs:
        raise UsageError(f"{finetuned_spec} and {base_spec} share no linear layer of the same shape; are they the "
                         "same architecture?")
    timings = {}
    start = time.perf_counter()
    jobs = _decompose_changed(base, finetuned, jobs, targeted, plan, progress)
    if not jobs:
        raise UsageError(f"{finetuned_spec} has the same linear weights as {base_spec}: there is nothing to extract")
    saved = _changed_modules(base, finetuned, targeted)
    timings["decompose"] = time.perf_counter() - start
    info = {"path": finetuned_spec, "format": "dense delta", "base_model": base_spec, "modules": len(jobs),
            "rank_min": None, "rank_max": None, "modules_to_save": sorted(saved)}
    if config.analyze and plan.rule is None:
        return analysis_report(info, jobs, plan, command, timings, started)
    plan = with_budget(plan, sum(job.params_before for job in jobs))
    ranks = choose_ranks(jobs, plan, notes)
    return _write(base, finetuned, jobs, ranks, saved, output, plan, notes, info, analyze=config.analyze,
                  progress=progress, command=command, timings=timings, started=started, base_spec=base_spec)


def _linear_jobs(types, base, finetuned):
    """A job for every linear / Conv1D layer in both checkpoints with the same shape, and the keys they cover."""
    jobs, targeted = [], set()
    for name, kind in types.items():
        key = name + ".weight"
        if kind not in ("linear", "conv1d") or key not in finetuned or key not in base:
            continue
        if finetuned.shapes[key] != base.shapes[key] or len(finetuned.shapes[key]) != 2:
            continue  # a resized layer: saved whole (_changed_modules)
        shape = finetuned.shapes[key][::-1] if kind == "conv1d" else finetuned.shapes[key]
        delta = Delta(key=key, base_key=key, transpose=kind == "conv1d")
        bias = name + ".bias"
        if bias in finetuned and bias in base and finetuned.shapes[bias] == base.shapes[bias]:
            delta.bias_key = bias
        jobs.append(Job(name=name, kind="linear", shape=list(shape), cost=sum(shape),
                        params_before=shape[0] * shape[1], delta=delta))
        targeted.update({key, bias})
    return jobs, targeted


def _decompose_changed(base, finetuned, jobs, targeted, plan, progress):
    """The jobs whose weight changed, each with the SVD of its delta (randomized, or dense with --algorithm exact).
    An unchanged layer is dropped from `targeted`, so that a changed bias alone is saved in modules_to_save."""
    import torch

    from ..core.factor_svd import DenseOperator, dense_svd, module_seed, randomized_svd

    progress.start("decompose", len(jobs))
    kept = []
    for job in jobs:
        difference = _delta(base, finetuned, job.delta)
        error_if_nonfinite(job.delta.key, difference)
        if job.delta.bias_key:
            job.delta.bias_changed = not torch.equal(finetuned.get(job.delta.bias_key), base.get(job.delta.bias_key))
        if not bool(difference.any()):
            if job.delta.bias_changed:
                targeted.discard(job.delta.bias_key)  # the bias alone changed: saved in modules_to_save
            targeted.discard(job.delta.key)
            progress.advance("decompose", f"{job.name} (unchanged)")
            continue
        job.cap = rank_cap(job, plan)
        if plan.algorithm == "rsvd":
            job.decomposition = randomized_svd(DenseOperator(difference), job.cap + plan.oversample,
                                               plan.power_iters, module_seed(plan.seed, job.name), keep=job.cap)
        else:
            job.decomposition = dense_svd(difference, keep=job.cap)
        kept.append(job)
        progress.advance("decompose", job.name)
    return kept


def _changed_modules(base, finetuned, targeted):
    """{module path: [keys]} of the non-LoRA modules whose tensors differ from the base (or are new)."""
    import torch

    changed = {}
    for key in finetuned.names():
        if key in targeted:
            continue
        module = key.rpartition(".")[0]
        if key not in base or base.shapes[key] != finetuned.shapes[key] or not torch.equal(base.get(key),
                                                                                            finetuned.get(key)):
            changed.setdefault(module, [])
    for key in finetuned.names():
        module = key.rpartition(".")[0]
        if module in changed and key not in targeted:
            changed[module].append(key)
    return changed


def _write(base, finetuned, jobs, ranks, saved, output, plan, notes, info, *, analyze, progress, command, timings,
           started, base_spec):
    """Write the PEFT adapter of the extracted modules (or, with analyze, only compute the report of the plan)."""
    from ..io.shards import ShardWriter

    layers = []
    bias_lora = any(job.delta.bias_changed for job in jobs)
    with (nullcontext() if analyze else staged(output)) as staging:  # analyze: staging None, nothing written
        if staging:
            writer = ShardWriter(staging, 2**62, prefix="adapter_model")
        progress.start("write", len(jobs))
        start = time.perf_counter()
        for job, k in zip(jobs, ranks):
            tensors, entry = _extracted_tensors(base, finetuned, job, k, plan, bias_lora)
            layers.append(entry)
            if staging:
                for name, tensor in tensors:
                    writer.add(name, tensor)
            progress.advance("write", job.name)
        names = [job.name for job in jobs]
        alphas, out_ranks = [layer["alpha"] for layer in layers], [layer["rank"] for layer in layers]
        r, alpha, rank_pattern, alpha_pattern = peft_patterns(names, out_ranks, alphas)
        scaling = scaling_info(layers, plan, notes)
        scaling.update(r=r, lora_alpha=alpha, rank_pattern=len(rank_pattern), alpha_pattern=len(alpha_pattern))
        if staging:
            for module in sorted(saved):
                for key in saved[module]:
                    writer.add(PREFIX + key, finetuned.get(key))
            writer.metadata = {"lowrank_extract": json.dumps({"base_model": base_spec, "rule": plan.rule,
                                                              "value": plan.value}, sort_keys=True)}
            files = writer.finish()
            config = {
                "peft_type": "LORA", "task_type": _task_type(finetuned.config), "base_model_name_or_path": base_spec,
                "r": r, "lora_alpha": alpha, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
                "target_modules": sorted(names), "modules_to_save": sorted(saved) or None, "lora_dropout": 0.0,
                "bias": "none", "lora_bias": bias_lora, "use_rslora": False, "use_dora": False,
                "fan_in_fan_out": any(job.delta.transpose for job in jobs), "init_lora_weights": True,
                "inference_mode": True,
            }
            _write_json(os.path.join(staging, "adapter_config.json"), config)
        timings["write"] = time.perf_counter() - start
        timings["total"] = time.perf_counter() - started
        params_dense = sum(job.params_before for job in jobs)
        report = build(command=command, source=info, rule=rule_info(plan), algorithm=algorithm_info(plan),
                       scaling=scaling, layers=layers,
                       output=None if analyze else {"path": output, "format": "peft", "files": files,
                                                    "dtype": plan.dtype},
                       bytes_before=None,
                       bytes_after=None if analyze else os.path.getsize(os.path.join(staging, files[0])),
                       warnings=notes.warnings, timings=timings,
                       extra={"mode": "plan" if analyze else "extract", "dense_params": params_dense})
        if staging:
            write_report_files(report, staging)
    return report


def _write_json(path, data):
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def _extracted_tensors(base, finetuned, job, k, plan, bias_lora):
    """[(key, tensor)] of one extracted module at rank k, and its report line."""
    import torch

    from ..core.factor_svd import F64, stored_error

    alpha, scale, _ = output_scale(job, k, plan, None)
    difference = _delta(base, finetuned, job.delta)
    dtype = factor_dtype(plan.dtype, finetuned.get(job.delta.key).dtype)
    up, down = job.decomposition.factors(None, None, k, scale)
    up, down = up.to(dtype), down.to(dtype)
    error_sq = stored_error(lambda x: difference @ x.to(torch.float32), job.decomposition.total, up, down, scale)
    tensors = [(f"{PREFIX}{job.name}.lora_A.weight", down.contiguous()),
               (f"{PREFIX}{job.name}.lora_B.weight", up.contiguous())]
    if bias_lora:  # PEFT creates lora_B's bias for every module: unchanged ones get zeros, not noise
        if job.delta.bias_changed:
            bias = (finetuned.get(job.delta.bias_key).to(F64) - base.get(job.delta.bias_key).to(F64)) / scale
        else:
            bias = torch.zeros(job.shape[0], dtype=F64)
        tensors.append((f"{PREFIX}{job.name}.lora_B.bias", bias.to(dtype)))
    return tensors, squeeze_layer_entry(job, k, scale, alpha, error_sq)
