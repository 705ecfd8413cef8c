"""What squeezing and extraction share: the jobs (one per module), the run's resolved plan, each module's SVD, its
rank under the rule and its output scale.

A `Plan` is fixed for the run; what the run learns on the way (warnings, modules short of --energy) goes to its
`Notes`. The writing passes (writer.py, extract.py) and `squeeze()` (api.py) import from here, never the reverse.
"""

import math
from collections import deque
from dataclasses import dataclass, field, replace
from itertools import islice

from ..errors import LowrankError
from .config import SqueezeConfig
from .formats import clean_number, peft_scale
from .ranks import Candidate, budget_ranks, energy_curve, parse_budget, rank_for_energy, uniform_ranks


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
    module: object = None  # formats.LoraModule
    delta: object = None  # extract.Delta
    dora: bool = False
    decomposition: object = None
    cap: int = 0


@dataclass(frozen=True)
class Plan:
    """The run's settings, resolved from its SqueezeConfig: the rule and its value, the algorithm, the scale
    policy, how many modules are decomposed at once."""

    rule: str | None  # rank | energy | budget | None (analysis only)
    value: object  # K, E, or the budget (as given; a parameter count once resolved by with_budget)
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

    @classmethod
    def of(cls, config: SqueezeConfig) -> "Plan":
        # an extraction's dense deltas are large matrices: one at a time, on torch's threads (api.squeeze)
        return cls(rule=config.rule, value=getattr(config, config.rule) if config.rule else None,
                   max_rank=config.max_rank, min_rank=config.min_rank, min_energy=config.min_energy,
                   allow_pad=config.allow_pad, algorithm=config.svd_algorithm, oversample=config.oversample,
                   power_iters=config.power_iters, seed=config.seed, policy=config.scale_policy, dtype=config.dtype,
                   workers=1 if config.extracting else config.thread_count)


@dataclass
class Notes:
    """What a run finds out as it goes, for its report."""

    warnings: list = field(default_factory=list)
    short: list = field(default_factory=list)  # modules that could not reach --energy within their cap


def rule_tag(plan):
    """The rule as a name suffix: -r8, -e0.95, -b0.25 (default output names)."""
    return {"rank": "r{}", "energy": "e{}", "budget": "b{}"}[plan.rule].format(plan.value)


def factor_dtype(name, fallback):
    import torch

    return fallback if name == "auto" else getattr(torch, name)


def error_if_nonfinite(name, tensor):
    import torch

    if not bool(torch.isfinite(tensor).all()):
        raise LowrankError(f"{name} contains NaN or Inf values; the adapter is damaged")


# --- spectra and ranks --------------------------------------------------------------------------------------------


def rank_cap(job, plan):
    """The largest rank a module may get under the rule (and the randomized SVD's target size)."""
    source = job.rank_before if job.rank_before is not None else min(job.shape[0], job.cost - job.shape[0])
    if plan.rule == "rank":
        return plan.value if plan.allow_pad else min(plan.value, source)
    return min(plan.max_rank or source, source)


def decompose(job, b, a, plan):
    """The module's SVD: exact in factor space (default), or randomized with cap + oversample columns. A NaN or
    Inf anywhere in B or A shows up in their r x r Gram matrices, which are checked instead of every entry."""
    from ..core.factor_svd import FactorOperator, FactorSVD, NonFinite, module_seed, randomized_svd

    damaged = f"the LoRA factors of {job.name} contain NaN or Inf values; the adapter is damaged"
    try:
        if plan.algorithm == "exact":
            result = FactorSVD.of(b, a, job.scale_before)
        else:
            if not (bool(b.isfinite().all()) and bool(a.isfinite().all())):
                raise NonFinite(damaged)
            size = min(job.cap + plan.oversample, job.rank_before)
            result = randomized_svd(FactorOperator(b, a, job.scale_before), size, plan.power_iters,
                                    module_seed(plan.seed, job.name), keep=min(job.cap, job.rank_before))
    except NonFinite:
        raise LowrankError(damaged) from None
    if not (math.isfinite(result.total) and bool(result.sigma.isfinite().all())):  # overflow in the products
        raise LowrankError(damaged)
    return result


def module_rank(job, plan, notes):
    """The rank of one module under a per-module rule (--rank, --energy); --budget is global (choose_ranks)."""
    if plan.rule == "rank":
        return plan.value if plan.allow_pad else min(plan.value, job.rank_before)
    curve = energy_curve([float(x) for x in job.decomposition.sigma], job.decomposition.total)
    k = max(min(rank_for_energy(curve, plan.value), job.cap), min(plan.min_rank, job.cap))
    if curve[min(k, len(curve) - 1)] < plan.value - 1e-12:
        notes.short.append(job.name)
    return k


def with_budget(plan, total_params):
    """The plan with --budget as a parameter count (a fraction is of the source's `total_params`)."""
    if plan.rule != "budget":
        return plan
    return replace(plan, value=parse_budget(plan.value, total_params))


def choose_ranks(jobs, plan, notes):
    """Every module's rank, from the spectra of all of them (pass 1 done; --budget resolved by with_budget)."""
    if plan.rule == "rank":
        if jobs and jobs[0].rank_before is None:  # dense deltas: K, or the full rank of a smaller layer
            return [job.cap for job in jobs]
        candidates = [Candidate(name=j.name, rank=j.rank_before, cost=j.cost, sigma=[], total=0.0, cap=j.cap)
                      for j in jobs]
        return uniform_ranks(candidates, plan.value, plan.allow_pad)
    if plan.rule == "energy":
        return [module_rank(job, plan, notes) for job in jobs]
    candidates = [Candidate(name=j.name, rank=j.rank_before or j.cap, cost=j.cost,
                            sigma=[float(s) for s in j.decomposition.sigma], total=j.decomposition.total, cap=j.cap)
                  for j in jobs]
    return budget_ranks(candidates, plan.value, plan.min_rank, plan.min_energy)


def rule_warnings(plan, notes):
    if notes.short:
        notes.warnings.append(f"{len(notes.short)} module(s) keep less than --energy {plan.value:g} "
                              f"because of the rank cap (e.g. {sorted(notes.short)[0]})")


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


def output_scale(job, k, plan, adapter, alpha_dtype=None):
    """(alpha to store, scale the consumer will compute from it, use_rslora) for a module squeezed to rank k.
    The scale is recomputed from the alpha as stored (rounded JSON number or cast alpha tensor), so that the
    factors absorb any rounding and s'·B'·A' stays exactly the truncated update."""
    import torch

    rslora = bool(adapter is not None and adapter.use_rslora)
    if plan.policy == "unit":
        alpha, rslora = k, False
    elif plan.policy == "keep-alpha":
        alpha = clean_number(job.alpha_before)
    else:
        target = adapter.global_scale if adapter is not None and adapter.format == "peft" else job.scale_before
        alpha = clean_number(target * (math.sqrt(k) if rslora else k))
    if alpha_dtype is not None:  # kohya / diffusers: alpha is a tensor of this dtype
        alpha = clean_number(float(torch.tensor(alpha, dtype=alpha_dtype)))
    return alpha, peft_scale(alpha, k, rslora), rslora
