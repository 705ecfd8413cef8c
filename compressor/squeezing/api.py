"""`lowrank.squeeze`: compress a LoRA adapter to lower ranks (LoRA-Squeeze), or extract a LoRA from a dense delta.

One module at a time: read its factors (memory-mapped), take the exact SVD of its update s·B·A in factor space (or
a randomized SVD), pick its rank k, write the balanced rank-k factors with the scale policy's alpha, and move on;
every other tensor and file is copied through, then the report is written. The rank rules --rank and --energy
decide per module, so this is a single pass. --budget (and --analyze) first decompose every module to see all the
spectra (keeping only r x r matrices per module), allocate the ranks, then make the writing pass, which reads the
factors again rather than holding them.
"""

import os
import time
from contextlib import closing
from dataclasses import replace
from typing import Any

from ..environment import invocation
from ..errors import UsageError
from ..progress import SILENT, Progress
from .config import ANALYZE_WRITES_NOTHING, SqueezeConfig
from .extract import extract
from .formats import open_adapter
from .output import check_adapter_output, default_squeeze_output
from .plan import (
    Job,
    Notes,
    Plan,
    choose_ranks,
    decompose,
    ordered_results,
    output_scale,
    rank_cap,
    rule_warnings,
    with_budget,
)
from .report import algorithm_info, analysis_report, build, rule_info, scaling_info, source_info, squeeze_layer_entry
from .writer import write_adapter


def squeeze(
    adapter: str | None = None,
    output: str | None = None,
    config: SqueezeConfig | None = None,
    *,
    progress: Progress = SILENT,
    command: str | None = None,
    **options: Any,
) -> dict:
    """Squeeze a LoRA adapter (a PEFT directory, or a kohya / diffusers .safetensors file) to lower ranks and write
    it to `output` in the same format; or, with `finetuned` and `base_model`, extract a LoRA from their dense
    difference. The options are SqueezeConfig's, as a `config` or as keyword arguments (which override the
    config's fields). Exactly one rule: `rank` (uniform), `energy` (per module, fraction of sum sigma^2 kept) or
    `budget` (global parameter budget: a fraction of the source's LoRA parameters, or a count); `analyze=True`
    only reports. `algorithm`: "exact" (the default for adapters) or "rsvd" (the default for extraction).
    `threads`: how many modules are decomposed at once, each with torch on one thread (default: the CPU count, at
    most 8; extraction: torch's threads, one module at a time). Returns the report (a dict, also written as
    squeeze_report.json unless analyzing).
    """
    import torch

    config = replace(config, **options) if config is not None else SqueezeConfig(**options)
    previous = torch.get_num_threads()
    # One module's matrices are small (r x r cores, m x r factors): torch's own threads would split every small
    # operation and, on a CPU that other work also uses, mostly wait on each other (a 7B adapter took 10-57 s
    # with torch's 2 threads and 2.6-2.9 s with one on the shared 2-core development machine; on a quiet one,
    # 1.86 s with torch's threads, 1.13 s with two modules at once; BENCHMARKS.md).
    # Whole modules in parallel, each on one thread, do not synchronise at every small operation. Extraction's
    # dense deltas are large matrices: there the threads are torch's, one module at a time (Plan.workers).
    torch.set_num_threads(config.thread_count if config.extracting else 1)
    try:
        return _run(adapter, output, config, progress, command or invocation())
    finally:
        torch.set_num_threads(previous)


def _run(adapter, output, config, progress, command):
    started = time.perf_counter()
    plan, notes = Plan.of(config), Notes()
    if config.analyze and output is not None:
        raise UsageError(ANALYZE_WRITES_NOTHING)
    if config.extracting:
        if adapter is not None:
            raise UsageError("give either an ADAPTER to squeeze or --finetuned (with --base-model) to extract one")
        return extract(config, output, plan, notes, progress=progress, command=command, started=started)
    if adapter is None:
        raise UsageError("give the ADAPTER to squeeze (a PEFT directory or a .safetensors file)")
    return _squeeze_adapter(adapter, output, config, plan, notes, progress, command, started)


def _squeeze_adapter(adapter, output, config, plan, notes, progress, command, started):
    source = open_adapter(adapter)
    if not config.analyze:
        output = output or default_squeeze_output(adapter, plan)
        check_adapter_output(source, output, config.overwrite)
    base = None
    if config.base_model is not None:
        if not source.use_dora:
            raise UsageError("--base-model without --finetuned measures DoRA's true error; this adapter is not DoRA")
        from ..io.tensors import CheckpointTensors

        base = CheckpointTensors(config.base_model, trust_remote_code=config.trust_remote_code)
    jobs = adapter_jobs(source)
    for job in jobs:
        job.cap = rank_cap(job, plan)
    if plan.rule == "rank":  # refuse a rank above the source before any work
        choose_ranks(jobs, plan, notes)
    timings = {}
    ranks = None
    if config.analyze or plan.rule == "budget":  # these need every spectrum first
        decompose_every_module(source, jobs, plan, progress, timings)
        if plan.rule is None:
            return analysis_report(source_info(source, jobs), jobs, plan, command, timings, started)
        plan = with_budget(plan, sum(job.params_before for job in jobs))
        ranks = choose_ranks(jobs, plan, notes)
        rule_warnings(plan, notes)
        if config.analyze:
            return plan_report(source, jobs, ranks, plan, notes, command, timings, started)
    return write_adapter(source, jobs, ranks, output, plan, notes, base=base, progress=progress, command=command,
                         timings=timings, started=started)


def adapter_jobs(source):
    jobs = []
    for module in source.modules:
        jobs.append(Job(name=module.name, kind=module.kind, shape=module.shape,
                        cost=module.out_features + module.in_features,
                        params_before=module.rank * (module.out_features + module.in_features),
                        rank_before=module.rank, alpha_before=module.alpha, scale_before=module.scale,
                        module=module, dora="magnitude" in module.keys))
    return jobs


def decompose_every_module(source, jobs, plan, progress, timings):
    """Pass 1 of --budget and --analyze: every module's SVD (only r x r matrices are kept per module)."""
    start = time.perf_counter()
    progress.start("decompose", len(jobs))

    def decompose_module(job):
        b, a = job.module.flat(source.tensor(job.module.keys["b"]), source.tensor(job.module.keys["a"]))
        return decompose(job, b, a, plan)

    with closing(ordered_results(decompose_module, jobs, plan.workers)) as results:
        for job, decomposition in zip(jobs, results):
            job.decomposition = decomposition
            progress.advance("decompose", job.name)
    timings["decompose"] = time.perf_counter() - start


def plan_report(source, jobs, ranks, plan, notes, command, timings, started):
    """--analyze with a rule: the report the rule would give (ranks, energies, scales), nothing written."""
    layers = []
    for job, k in zip(jobs, ranks):
        alpha, scale, _ = output_scale(job, k, plan, source if source.format == "peft" else None)
        layers.append(squeeze_layer_entry(job, k, scale, alpha))
    timings["total"] = time.perf_counter() - started
    return build(command=command, source=source_info(source, jobs), rule=rule_info(plan),
                 algorithm=algorithm_info(plan), scaling=scaling_info(layers, plan, notes, source.format == "peft"),
                 layers=layers, output=None, bytes_before=os.path.getsize(source.weights), bytes_after=None,
                 warnings=notes.warnings, timings=timings, extra={"mode": "plan"})
