"""How many components each squeezed module keeps: uniform rank, per-module energy, or a global parameter budget.

Energy kept at rank k: E(k) = (sigma_1^2 + ... + sigma_k^2) / (sum of all sigma_i^2) of the module's scaled update
s·B·A, i.e. the fraction of ||dW||_F^2 retained; the relative error of the truncation is sqrt(1 - E(k)).
This is not kohya's `sv_fro` (a Frobenius-norm ratio, sqrt(E): its 0.9 is an energy of 0.81) nor its
`sv_cumulative` (a fraction of the sum of sigma_i).
"""

import heapq
import re
from dataclasses import dataclass

from ..errors import UsageError

ENERGY_DEFINITION = ("energy kept = sum of the kept sigma_i^2 / sum of all sigma_i^2 of the module's scaled update "
                     "s·B·A (the fraction of its squared Frobenius norm); rel_error = sqrt(1 - energy kept). "
                     "Not kohya's sv_fro, which is the square root of this")
BUDGET_DEFINITION = ("parameter budget over the squeezed modules (k·(out + in) each), filled greedily by the largest "
                     "gain in per-module energy fraction per parameter, after the floors")
TOLERANCE = 1e-12  # E(k) computed in float64 may miss an exactly-met threshold by rounding


@dataclass
class Candidate:
    """What the rules need to know about one module."""

    name: str
    rank: int  # source rank r
    cost: int  # parameters per rank: out + in (flattened)
    sigma: list  # singular values found (float), descending
    total: float  # ||dW||_F^2
    cap: int  # largest rank this module may get (source rank, --max-rank, the sketch size)


def energy_curve(sigma, total):
    """[E(0), E(1), ..., E(len(sigma))]; a module whose update is zero keeps everything at any rank."""
    if not total > 0:
        return [1.0] * (len(sigma) + 1)
    curve, acc = [0.0], 0.0
    for value in sigma:
        acc += value * value
        curve.append(min(acc / total, 1.0))
    return curve


def rank_for_energy(curve, threshold):
    """Smallest k >= 1 with E(k) >= threshold, or the last k when the spectrum found never reaches it."""
    for k in range(1, len(curve)):
        if curve[k] >= threshold - TOLERANCE:
            return k
    return max(len(curve) - 1, 1)


def parse_budget(value, total_params):
    """--budget: a fraction (0, 1] of the source parameters, or a count such as 2000000, 2.5M, 800K."""
    text = str(value).strip()
    match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*([kmg]?)", text.lower())
    if not match:
        raise UsageError(f"cannot read --budget {value!r}; give a fraction like 0.25 or a parameter count like 2M")
    number, unit = float(match.group(1)), match.group(2)
    if unit:
        return int(number * {"k": 1e3, "m": 1e6, "g": 1e9}[unit])
    if 0 < number <= 1:
        return int(number * total_params)
    if number > 1 and number == int(number):
        return int(number)
    raise UsageError(f"--budget must be a fraction in (0, 1] or a whole parameter count, got {value}")


def uniform_ranks(candidates, rank, allow_pad):
    above = [c for c in candidates if rank > c.rank]
    if above and not allow_pad:
        worst = max(above, key=lambda c: c.rank)
        raise UsageError(
            f"--rank {rank} is above the source rank of {len(above)} module(s) (e.g. {worst.name} has rank "
            f"{worst.rank}): there is nothing to squeeze; choose --rank <= {min(c.rank for c in candidates)} or pass "
            "--allow-pad to pad with zeros"
        )
    return [rank if allow_pad else min(rank, c.rank) for c in candidates]


def energy_ranks(candidates, energy, min_rank):
    ranks = []
    for c in candidates:
        k = rank_for_energy(energy_curve(c.sigma, c.total), energy)
        ranks.append(max(min(k, c.cap), min(min_rank, c.cap)))
    return ranks


def budget_ranks(candidates, budget, min_rank, min_energy):
    """Greedy fill: floors first (min_rank, and min_energy if given), then one component at a time to the module
    whose next component adds the most energy fraction per parameter, skipping any that no longer fits."""
    curves = [energy_curve(c.sigma, c.total) for c in candidates]
    ranks = []
    for c, curve in zip(candidates, curves):
        floor = min_rank
        if min_energy:
            floor = max(floor, rank_for_energy(curve, min_energy))
        ranks.append(min(floor, c.cap))
    used = sum(k * c.cost for k, c in zip(ranks, candidates))
    if used > budget:
        raise UsageError(
            f"the floors alone (--min-rank {min_rank}" + (f", --min-energy {min_energy}" if min_energy else "")
            + f") need {used:,} parameters, more than the budget of {budget:,}; lower the floors or raise --budget"
        )
    heap = []

    def push(index):
        c, k = candidates[index], ranks[index]
        if k < min(c.cap, len(c.sigma)):
            gain = curves[index][k + 1] - curves[index][k]
            if gain > 0:
                heapq.heappush(heap, (-gain / c.cost, index))

    for index in range(len(candidates)):
        push(index)
    while heap:
        _, index = heapq.heappop(heap)
        cost = candidates[index].cost
        if used + cost > budget:
            continue  # this module can no longer grow; smaller ones still may
        ranks[index] += 1
        used += cost
        push(index)
    return ranks
