"""`lowrank.squeeze`: compress a LoRA adapter to lower ranks (LoRA-Squeeze), or extract a LoRA from a dense delta.

One module at a time: read its factors (memory-mapped), take the exact SVD of its update s·B·A in factor space (or
a randomized SVD), pick its rank k, write the balanced rank-k factors with the scale policy's alpha, and move on;
every other tensor and file is copied through, then the report is written. The rank rules --rank and --energy
decide per module, so this is a single pass. --budget (and --analyze) first decompose every module to see all the
spectra (keeping only r x r matrices per module), allocate the ranks, then make the writing pass, which reads the
factors again rather than holding them.
"""

import json
import math
import os
import shutil
import time
from collections import deque
from contextlib import closing
from dataclasses import dataclass, field
from itertools import islice

from ..environment import invocation
from ..errors import LowrankError, UsageError
from ..progress import SILENT

ALGORITHMS = ("exact", "rsvd")
POLICIES = ("keep-scale", "unit", "keep-alpha")
DTYPES = ("auto", "float32", "bfloat16", "float16")
POLICY_TEXT = {
    "keep-scale": "every module keeps the adapter's scale (alpha / r, or alpha / sqrt(r) for rsLoRA; kohya "
                  "modules their own): alpha' = scale·k (scale·sqrt(k) for rsLoRA)",
    "unit": "scale 1 everywhere (alpha' = k, use_rslora off): the scaling is baked into the factors",
    "keep-alpha": "every module keeps its alpha, so its scale becomes alpha / k",
}


@dataclass
class Job:
    """One module to squeeze (an adapter's LoRA pair) or to extract (a dense weight delta)."""

    name: str
    kind: str
    shape: list
    cost: int  # parameters per unit of rank: out + in
    params_before: int
    rank_before: int | None = None  # None: a dense delta
    alpha_before: float | None = None
    scale_before: float | None = None
    module: object = None  # adapters.LoraModule
    delta: object = None  # extraction.Delta
    dora: bool = False
    decomposition: object = None
    cap: int = 0


@dataclass
class Settings:
    rule: str | None  # rank | energy | budget | None (analysis only)
    value: object
    max_rank: int | None
    min_rank: int
    min_energy: float | None
    allow_pad: bool
    algorithm: str
    oversample: int
    power_iters: int
    seed: int
    policy: str
    dtype: str
    workers: int = 1  # modules decomposed at once (threads, each running torch on one thread)
    warnings: list = field(default_factory=list)
    short: list = field(default_factory=list)  # modules that could not reach --energy within their cap


def validate(*, rank, energy, budget, analyze, max_rank, min_rank, min_energy, algorithm, oversample, power_iters,
             allow_pad, alpha_policy, dtype, extracting, seed):
    rules = [name for name, value in (("rank", rank), ("energy", energy), ("budget", budget)) if value is not None]
    if len(rules) > 1:
        raise UsageError(f"choose one rank rule: --{rules[0]} or --{rules[1]}, not both")
    if not rules and not analyze:
        raise UsageError("give a rank rule: --rank K, --energy E or --budget B (or --analyze to only look)")
    rule = rules[0] if rules else None
    if rank is not None and rank < 1:
        raise UsageError(f"--rank must be at least 1, got {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise UsageError(f"--energy must be in (0, 1] (the fraction of sum sigma^2 kept), got {energy}")
    if max_rank is not None and max_rank < 1:
        raise UsageError(f"--max-rank must be at least 1, got {max_rank}")
    if min_rank < 1:
        raise UsageError(f"--min-rank must be at least 1, got {min_rank}")
    if max_rank is not None and min_rank > max_rank:
        raise UsageError(f"--min-rank {min_rank} is above --max-rank {max_rank}")
    if min_energy is not None and not 0 < min_energy <= 1:
        raise UsageError(f"--min-energy must be in (0, 1], got {min_energy}")
    # flags that would silently do nothing are refused (users of other tools lose hours to that)
    if rule == "rank" and max_rank is not None:
        raise UsageError("--max-rank caps --energy and --budget; with --rank K it does nothing (use --rank alone)")
    if rule != "budget" and min_energy is not None:
        raise UsageError("--min-energy is a floor for --budget; with other rules it does nothing")
    if rule not in ("energy", "budget") and min_rank != 1:
        raise UsageError("--min-rank is a floor for --energy and --budget; with other rules it does nothing")
    if allow_pad and rule != "rank":
        raise UsageError("--allow-pad only applies to --rank (the other rules never exceed the source rank)")
    if algorithm not in ALGORITHMS:
        raise UsageError(f"unknown algorithm {algorithm!r}; choose exact or rsvd")
    if algorithm != "rsvd" and (oversample != 10 or power_iters != 2):
        raise UsageError("--oversample and --power-iters only apply to --algorithm rsvd")
    if oversample < 0 or power_iters < 0:
        raise UsageError("--oversample and --power-iters must be >= 0")
    if alpha_policy is not None and alpha_policy not in POLICIES:
        raise UsageError(f"unknown alpha policy {alpha_policy!r}; choose {', '.join(POLICIES)}")
    if extracting and alpha_policy not in (None, "unit"):
        raise UsageError("an extracted LoRA has no source scale to keep: it uses --alpha-policy unit (alpha = r)")
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; choose {', '.join(DTYPES)}")
    if extracting and rule != "rank" and max_rank is None:
        raise UsageError("extracting from a dense delta needs --rank K or --max-rank R (the randomized SVD's "
                         "target size)")
    return Settings(rule=rule, value={"rank": rank, "energy": energy, "budget": budget}.get(rule), max_rank=max_rank,
                    min_rank=min_rank, min_energy=min_energy, allow_pad=allow_pad, algorithm=algorithm,
                    oversample=oversample, power_iters=power_iters, seed=seed,
                    policy=alpha_policy or ("unit" if extracting else "keep-scale"), dtype=dtype)


def factor_dtype(name, fallback):
    import torch

    return fallback if name == "auto" else getattr(torch, name)


def default_output(path, settings):
    tag = {"rank": "r{}", "energy": "e{}", "budget": "b{}"}[settings.rule].format(settings.value)
    base = os.path.normpath(path)
    if base.endswith(".safetensors"):
        return f"{base[: -len('.safetensors')]}-{tag}.safetensors"
    return f"{base}-{tag}"


# --- pass 1: spectra and ranks ------------------------------------------------------------------------------------


def rank_cap(job, settings):
    """The largest rank a module may get under the rule (and the randomized SVD's target size)."""
    source = job.rank_before if job.rank_before is not None else min(job.shape[0], job.cost - job.shape[0])
    if settings.rule == "rank":
        return settings.value if settings.allow_pad else min(settings.value, source)
    return min(settings.max_rank or source, source)


def decompose(job, b, a, settings):
    """The module's SVD: exact in factor space (default), or randomized with cap + oversample columns. A NaN or
    Inf anywhere in B or A shows up in their r x r Gram matrices, which are checked instead of every entry."""
    from ..core.factor_svd import FactorOperator, FactorSVD, NonFinite, module_seed, randomized_svd

    damaged = f"the LoRA factors of {job.name} contain NaN or Inf values; the adapter is damaged"
    try:
        if settings.algorithm == "exact":
            result = FactorSVD.of(b, a, job.scale_before)
        else:
            if not (bool(b.isfinite().all()) and bool(a.isfinite().all())):
                raise NonFinite(damaged)
            size = min(job.cap + settings.oversample, job.rank_before)
            result = randomized_svd(FactorOperator(b, a, job.scale_before), size, settings.power_iters,
                                    module_seed(settings.seed, job.name), keep=min(job.cap, job.rank_before))
    except NonFinite:
        raise LowrankError(damaged) from None
    if not (math.isfinite(result.total) and bool(result.sigma.isfinite().all())):  # overflow in the products
        raise LowrankError(damaged)
    return result


def module_rank(job, settings):
    """The rank of one module under a per-module rule (--rank, --energy); --budget is global (choose_ranks)."""
    from .ranks import energy_curve, rank_for_energy

    if settings.rule == "rank":
        return settings.value if settings.allow_pad else min(settings.value, job.rank_before)
    curve = energy_curve([float(x) for x in job.decomposition.sigma], job.decomposition.total)
    k = max(min(rank_for_energy(curve, settings.value), job.cap), min(settings.min_rank, job.cap))
    if curve[min(k, len(curve) - 1)] < settings.value - 1e-12:
        settings.short.append(job.name)
    return k


def choose_ranks(jobs, settings, total_params):
    """Every module's rank, from the spectra of all of them (pass 1 done)."""
    from .ranks import Candidate, budget_ranks, parse_budget, uniform_ranks

    if settings.rule == "rank":
        if jobs and jobs[0].rank_before is None:  # dense deltas: K, or the full rank of a smaller layer
            return [job.cap for job in jobs]
        candidates = [Candidate(name=j.name, rank=j.rank_before, cost=j.cost, sigma=[], total=0.0, cap=j.cap)
                      for j in jobs]
        return uniform_ranks(candidates, settings.value, settings.allow_pad)
    if settings.rule == "energy":
        return [module_rank(job, settings) for job in jobs]
    candidates = [Candidate(name=j.name, rank=j.rank_before or j.cap, cost=j.cost,
                            sigma=[float(s) for s in j.decomposition.sigma], total=j.decomposition.total, cap=j.cap)
                  for j in jobs]
    budget = parse_budget(settings.value, total_params)
    settings.value = budget
    return budget_ranks(candidates, budget, settings.min_rank, settings.min_energy)


def rule_warnings(settings):
    if settings.short:
        settings.warnings.append(f"{len(settings.short)} module(s) keep less than --energy {settings.value:g} "
                                 f"because of the rank cap (e.g. {sorted(settings.short)[0]})")


def ordered_results(function, items, workers):
    """function(item) for every item, yielded in order. With workers > 1 a pool of threads computes a few items
    ahead (torch's kernels release the GIL); close the generator (contextlib.closing) to stop the pool early."""
    if workers <= 1:
        for item in items:
            yield function(item)
        return
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lowrank-squeeze")
    try:
        iterator, pending = iter(items), deque()
        for item in islice(iterator, 2 * workers):
            pending.append(pool.submit(function, item))
        while pending:
            result = pending.popleft().result()
            for item in islice(iterator, 1):
                pending.append(pool.submit(function, item))
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# --- scale policy -------------------------------------------------------------------------------------------------


def output_scale(job, k, settings, adapter, alpha_dtype=None):
    """(alpha to store, scale the consumer will compute from it, use_rslora) for a module squeezed to rank k.
    The scale is recomputed from the alpha as stored (rounded JSON number or cast alpha tensor), so that the
    factors absorb any rounding and s'·B'·A' stays exactly the truncated update."""
    import torch

    from .formats import clean_number, peft_scale

    rslora = bool(adapter is not None and adapter.use_rslora)
    if settings.policy == "unit":
        alpha, rslora = k, False
    elif settings.policy == "keep-alpha":
        alpha = clean_number(job.alpha_before)
    else:
        target = adapter.global_scale if adapter is not None and adapter.format == "peft" else job.scale_before
        alpha = clean_number(target * (math.sqrt(k) if rslora else k))
    if alpha_dtype is not None:  # kohya / diffusers: alpha is a tensor of this dtype
        alpha = clean_number(float(torch.tensor(alpha, dtype=alpha_dtype)))
    return alpha, peft_scale(alpha, k, rslora), rslora


# --- the job ------------------------------------------------------------------------------------------------------


def _command(command):
    return command or invocation()


def squeeze(
    adapter=None,
    output=None,
    *,
    rank=None,
    energy=None,
    budget=None,
    analyze=False,
    max_rank=None,
    min_rank=1,
    min_energy=None,
    algorithm=None,
    oversample=10,
    power_iters=2,
    seed=0,
    allow_pad=False,
    alpha_policy=None,
    base_model=None,
    finetuned=None,
    dtype="auto",
    overwrite=False,
    trust_remote_code=False,
    threads=None,
    progress=SILENT,
    command=None,
):
    """Squeeze a LoRA adapter (a PEFT directory, or a kohya / diffusers .safetensors file) to lower ranks and write
    it to `output` in the same format; or, with `finetuned` and `base_model`, extract a LoRA from their dense
    difference. Exactly one rule: `rank` (uniform), `energy` (per module, fraction of sum sigma^2 kept) or `budget`
    (global parameter budget: a fraction of the source's LoRA parameters, or a count); `analyze=True` only
    reports. `algorithm`: "exact" (the default for adapters) or "rsvd" (the default for extraction). `threads`: how
    many modules are decomposed at once, each with torch on one thread (default: the CPU count, at most 8;
    extraction: torch's threads, one module at a time). Returns the report (a dict, also written as
    squeeze_report.json unless analyzing).
    """
    import torch

    if threads is None:
        threads = min(os.cpu_count() or 1, 8)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise UsageError(f"--threads must be a whole number >= 1, got {threads}")
    previous = torch.get_num_threads()
    # One module's matrices are small (r x r cores, m x r factors): torch's own threads would split every small
    # operation and, on a CPU that other work also uses, mostly wait on each other (a 7B adapter took 10-57 s
    # with torch's 2 threads and 2.6-2.9 s with one on the shared 2-core development machine; on a quiet one,
    # 1.86 s with torch's threads, 1.13 s with two modules at once; BENCHMARKS.md).
    # Whole modules in parallel, each on one thread, do not synchronise at every small operation. Extraction's
    # dense deltas are large matrices: there the threads are torch's, one module at a time.
    torch.set_num_threads(threads if finetuned is not None else 1)
    try:
        return _squeeze(adapter, output, workers=1 if finetuned is not None else threads, rank=rank, energy=energy,
                        budget=budget, analyze=analyze, max_rank=max_rank, min_rank=min_rank, min_energy=min_energy,
                        algorithm=algorithm, oversample=oversample, power_iters=power_iters, seed=seed,
                        allow_pad=allow_pad, alpha_policy=alpha_policy, base_model=base_model, finetuned=finetuned,
                        dtype=dtype, overwrite=overwrite, trust_remote_code=trust_remote_code, progress=progress,
                        command=command)
    finally:
        torch.set_num_threads(previous)


def _squeeze(adapter, output, *, workers, rank, energy, budget, analyze, max_rank, min_rank, min_energy, algorithm,
             oversample, power_iters, seed, allow_pad, alpha_policy, base_model, finetuned, dtype, overwrite,
             trust_remote_code, progress, command):
    started = time.perf_counter()
    extracting = finetuned is not None
    algorithm = algorithm or ("rsvd" if extracting else "exact")
    settings = validate(rank=rank, energy=energy, budget=budget, analyze=analyze, max_rank=max_rank,
                        min_rank=min_rank, min_energy=min_energy, algorithm=algorithm, oversample=oversample,
                        power_iters=power_iters, allow_pad=allow_pad, alpha_policy=alpha_policy, dtype=dtype,
                        extracting=extracting, seed=seed)
    settings.workers = workers
    command = _command(command)
    if analyze and (output is not None or overwrite):
        raise UsageError("--analyze writes nothing; drop -o/--output and --overwrite")
    if analyze and base_model is not None and not extracting:
        raise UsageError("--base-model measures DoRA's true error while writing; --analyze writes nothing")
    if extracting:
        if adapter is not None:
            raise UsageError("give either an ADAPTER to squeeze or --finetuned (with --base-model) to extract one")
        if base_model is None:
            raise UsageError("--finetuned needs --base-model: the LoRA is extracted from their difference")
        from .extract import extract

        return extract(base_model, finetuned, output, settings, analyze=analyze, overwrite=overwrite,
                       trust_remote_code=trust_remote_code, progress=progress, command=command, started=started)
    if adapter is None:
        raise UsageError("give the ADAPTER to squeeze (a PEFT directory or a .safetensors file)")
    from .formats import open_adapter

    source = open_adapter(adapter)
    if not analyze:
        output = output or default_output(adapter, settings)
        check_adapter_output(source, output, overwrite)
    base = None
    if base_model is not None:
        if not source.use_dora:
            raise UsageError("--base-model without --finetuned measures DoRA's true error; this adapter is not DoRA")
        from ..io.tensors import CheckpointTensors

        base = CheckpointTensors(base_model, trust_remote_code=trust_remote_code)
    jobs = adapter_jobs(source)
    for job in jobs:
        job.cap = rank_cap(job, settings)
    if settings.rule == "rank":  # refuse a rank above the source before any work
        choose_ranks(jobs, settings, 0)
    timings = {}
    ranks = None
    if analyze or settings.rule == "budget":  # these need every spectrum first
        start = time.perf_counter()
        progress.start("decompose", len(jobs))

        def decompose_module(job):
            b, a = job.module.flat(source.tensor(job.module.keys["b"]), source.tensor(job.module.keys["a"]))
            return decompose(job, b, a, settings)

        with closing(ordered_results(decompose_module, jobs, settings.workers)) as results:
            for job, decomposition in zip(jobs, results):
                job.decomposition = decomposition
                progress.advance("decompose", job.name)
        timings["decompose"] = time.perf_counter() - start
        if analyze and settings.rule is None:
            return analysis_report(source_info(source, jobs), jobs, settings, energy, command, timings, started)
        ranks = choose_ranks(jobs, settings, sum(job.params_before for job in jobs))
        rule_warnings(settings)
        if analyze:
            return plan_report(source, jobs, ranks, settings, command, timings, started)
    from .writer import write_adapter

    return write_adapter(source, jobs, ranks, output, settings, base=base, progress=progress, command=command,
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


def check_adapter_output(source, output, overwrite):
    """PEFT: an output directory (checkpoint.check_output). Single files: a .safetensors path that is not the input."""
    from ..io.publish import check_output

    if source.format == "peft":
        check_output(output, source.path, overwrite)
        return
    out = os.path.abspath(output)
    if not output.endswith(".safetensors"):
        raise UsageError(f"{output}: the output of a single-file adapter is a .safetensors file")
    if out == os.path.abspath(source.path):
        raise UsageError(f"{output} is the input file; write the output somewhere else")
    if os.path.isdir(out):
        raise UsageError(f"{output} is a directory; give a .safetensors file name")
    if os.path.exists(out) and not overwrite:
        raise UsageError(f"{output} already exists; pass --overwrite to replace it")
    if not os.path.isdir(os.path.dirname(out)):
        raise UsageError(f"the parent directory of {output} does not exist")


def source_info(source, jobs):
    ranks = [job.rank_before for job in jobs]
    info = {"path": source.path, "format": source.format, "modules": len(jobs), "rank_min": min(ranks),
            "rank_max": max(ranks), "weights": os.path.basename(source.weights),
            "dora_modules": sum(job.dora for job in jobs)}
    if source.format == "peft":
        info.update(r=source.config["r"], lora_alpha=source.config["lora_alpha"], use_rslora=source.use_rslora,
                    use_dora=source.use_dora, subfolder=source.subfolder,
                    rank_pattern=bool(source.config.get("rank_pattern")),
                    alpha_pattern=bool(source.config.get("alpha_pattern")))
    return info


def rule_info(settings):
    return {"name": settings.rule, "value": settings.value, "max_rank": settings.max_rank,
            "min_rank": settings.min_rank, "min_energy": settings.min_energy, "allow_pad": settings.allow_pad}


def algorithm_info(settings):
    import torch

    info = {"name": settings.algorithm, "threads": settings.workers, "torch_threads": torch.get_num_threads()}
    if settings.algorithm == "rsvd":
        info.update(oversample=settings.oversample, power_iters=settings.power_iters, seed=settings.seed)
    else:
        info["method"] = "QR (CholeskyQR, float64 Gram) of B and A^T, SVD of the r x r core in float64"
    return info


def analysis_report(info, jobs, settings, energy, command, timings, started):
    from ..report.compression import versions
    from .report import SCHEMA, SCHEMA_VERSION, analysis

    thresholds = sorted({0.5, 0.8, 0.9, 0.95, 0.99} | ({energy} if energy else set()))
    timings["total"] = time.perf_counter() - started
    return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "kind": "squeeze", "mode": "analyze",
            "versions": versions(), "command": command, "source": info, "algorithm": algorithm_info(settings),
            "analysis": analysis(jobs, thresholds), "output": None,
            "timings_s": {k: round(v, 3) for k, v in timings.items()}, "evaluations": []}


def plan_report(source, jobs, ranks, settings, command, timings, started):
    """--analyze with a rule: the report the rule would give (ranks, energies, scales), nothing written."""
    from .report import build, layer_entry

    layers = []
    for job, k in zip(jobs, ranks):
        alpha, scale, _ = output_scale(job, k, settings, source if source.format == "peft" else None)
        layers.append(layer_entry(job, k, scale, alpha))
    timings["total"] = time.perf_counter() - started
    return build(command=command, source=source_info(source, jobs), rule=rule_info(settings),
                 algorithm=algorithm_info(settings), scaling=scaling_info(layers, settings, source.format == "peft"),
                 layers=layers, output=None, bytes_before=os.path.getsize(source.weights), bytes_after=None,
                 warnings=settings.warnings, timings=timings, extra={"mode": "plan"})


def scaling_info(layers, settings, peft=True):
    scales = {layer["scale"] for layer in layers}
    uniform = len(scales) == 1
    info = {"policy": settings.policy, "definition": POLICY_TEXT[settings.policy], "uniform": uniform,
            "scale": next(iter(scales)) if uniform else None,
            "description": settings.policy + (f": scale {next(iter(scales)):g} in every module" if uniform
                                              else ": the scale differs between modules")}
    if peft and not uniform and not any("scale differs" in w for w in settings.warnings):
        settings.warnings.append("the scale differs between modules: consumers that ignore rank_pattern / "
                                 "alpha_pattern (vLLM) will mis-scale some of them; the default keep-scale or unit "
                                 "policies keep it uniform")
    return info


def write_text(path, text):
    with open(path, "w") as f:
        f.write(text)


def write_report_files(report, directory, stem="squeeze_report"):
    from .report import to_markdown

    write_text(os.path.join(directory, f"{stem}.json"), json.dumps(report, indent=2) + "\n")
    write_text(os.path.join(directory, f"{stem}.md"), to_markdown(report))


def remove_quietly(path):
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.remove(path)


def error_if_nonfinite(name, tensor):
    import torch

    if not bool(torch.isfinite(tensor).all()):
        raise LowrankError(f"{name} contains NaN or Inf values; the adapter is damaged")
