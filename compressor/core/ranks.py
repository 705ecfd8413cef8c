"""How many components each matrix keeps.

`--ratio R` is the fraction of the targeted layers' parameters that is KEPT. An m x n matrix stored as a rank-r
pair holds r(m + n) parameters, so the uniform rule gives r = floor(R m n / (m + n)); a rank that reaches the
break-even floor(m n / (m + n)) saves nothing, and that layer stays dense.
"""

from fractions import Fraction

from ..errors import UsageError

RATIO_DEFINITION = "fraction of the targeted linear layers' parameters that is kept (1 - ratio is removed)"


def exact_ratio(ratio):
    # Fraction(repr(0.3)) == 3/10: floor() must not lose a rank to binary rounding of the ratio.
    return Fraction(repr(float(ratio)))


def break_even_rank(m, n):
    return (m * n) // (m + n)


def uniform_rank(m, n, ratio):
    """Rank for keep-fraction `ratio` of an m x n matrix, at least 1; None when the layer should stay dense."""
    rank = max(1, int(exact_ratio(ratio) * m * n / (m + n)))
    return None if rank >= break_even_rank(m, n) else rank


def factor_params(m, n, rank):
    return m * n if rank is None else rank * (m + n)


def allocate_global(spectra, shapes, ratio, min_fraction=0.1, weights=None, notes=None, ceilings=None):
    """Heterogeneous ranks under the same parameter budget as the uniform rule at `ratio`.

    spectra: {name: whitened singular values, descending}; dropping component i of matrix j costs sigma_ji^2
    of calibration output error (exact for whitening). Without `weights`, each matrix's losses are normalised
    by its total energy, so a layer with a large output scale does not starve the rest: a component's score is
    its share of its matrix's energy per parameter it costs, (sigma^2 / sum sigma^2) / (m + n). With
    `weights` ({name: one factor per component}), a component's loss is sigma^2 * weight, already in common
    units (the estimated rise of the LM loss, see `--alloc fisher`), and is not normalised.
    Components are taken greedily by score (the best next step of any matrix first) until the budget is spent.
    A matrix has two next steps at every rank r: its next component (m + n parameters, recovers loss r), or
    dense (what remains up to m n, recovers all the rest). It offers the one with the better score. With
    decreasing losses that walks the upper concave hull of the matrix's loss-recovered-per-parameter curve,
    whose last vertex is dense: a layer near break-even whose tail of small components adds up is better
    stored whole, before its rank reaches break-even (measured: SmolLM2 keep 0.8, BENCHMARKS.md "Dense
    when it pays"). Every matrix keeps at least `min_fraction` of its break-even rank (and at
    least 1), unless those floors alone would overspend the budget: then the floor yields (the largest fraction
    that fits, said in `notes`), and a budget below rank 1 everywhere is refused with the numbers.
    `ceilings` ({name: rank}, --speed-aware): a matrix never gets a factorized rank above its ceiling (the speed
    break-even, core/speed.py); its next step is to dense, which costs what remains up to m n.
    Returns {name: rank, or None for dense}.
    """
    import heapq

    budget = int(exact_ratio(ratio) * sum(m * n for m, n in shapes.values()))
    ranks, heap = {}, []

    def top(name):  # the first rank that is stored dense instead
        m, n = shapes[name]
        even = break_even_rank(m, n)
        return even if ceilings is None else min(even, ceilings[name] + 1)

    def push(name, whole=True):  # whole=False: only the next component (the whole layer did not fit)
        m, n = shapes[name]
        rank, loss = ranks[name], losses[name]
        if rank is None or rank >= min(m, n):
            return
        steps = []  # (score, cost, dense); on a tie the next component wins (max keeps the first)
        if rank + 1 < top(name):
            steps.append((float(loss[rank]) / (m + n), m + n, False))
        if whole:  # pay up to m n, recover the rest
            cost = m * n - rank * (m + n)
            steps.append((float(loss[rank:].sum()) / max(cost, 1), cost, True))
        if steps:
            score, cost, dense = max(steps, key=lambda step: step[0])
            heapq.heappush(heap, (-score, name, cost, dense))

    fraction = _floor_that_fits(shapes, budget, min_fraction, notes)
    spent = 0
    losses = component_losses(spectra, weights)
    for name in spectra:
        m, n = shapes[name]
        floor = int(fraction * break_even_rank(m, n))
        ranks[name] = max(1, floor if ceilings is None else min(floor, ceilings[name]))  # a floor under a ceiling
        spent += ranks[name] * (m + n)
    for name in ranks:
        push(name)
    while heap:
        _, name, cost, dense = heapq.heappop(heap)
        if spent + cost > budget:
            if dense:  # the whole layer does not fit in what is left: its next component still may
                push(name, whole=False)
            continue  # too big for what is left; a cheaper step elsewhere may still fit
        spent += cost
        ranks[name] = None if dense else ranks[name] + 1
        push(name)
    return ranks


def component_losses(spectra, weights=None):
    """{name: what dropping each component costs}, in allocate_global's units: sigma^2 * weight, or without
    weights sigma^2 as a share of the matrix's energy."""
    losses = {}
    for name, sigma in spectra.items():
        loss = sigma.double().square()
        losses[name] = loss / (float(loss.sum()) or 1.0) if weights is None else loss * weights[name].double()
    return losses


def dropped_loss(losses, ranks):
    """The allocation's estimate of what `ranks` lose: the summed cost of every dropped component."""
    return sum(float(losses[name][rank:].sum()) for name, rank in ranks.items() if rank is not None)


def _floor_that_fits(shapes, budget, min_fraction, notes):
    """min_fraction, or the largest fraction below it whose floors fit in `budget` (1e-3 steps)."""
    def cost(fraction):
        return sum(max(1, int(fraction * break_even_rank(m, n))) * (m + n) for m, n in shapes.values())

    if cost(min_fraction) <= budget:
        return min_fraction
    if cost(0.0) > budget:
        raise UsageError(f"the ratio leaves a budget of {budget:,} parameters, but rank 1 for each of the "
                         f"{len(shapes)} targeted matrices already costs {cost(0.0):,}; use a larger --ratio or "
                         "fewer --targets")
    low, high = 0, int(min_fraction * 1000)
    while low < high:  # the largest step whose floors fit
        middle = (low + high + 1) // 2
        low, high = (middle, high) if cost(middle / 1000) <= budget else (low, middle - 1)
    if notes is not None:
        notes.append(f"--min-rank-fraction {min_fraction:g} would spend {cost(min_fraction):,} of the "
                     f"{budget:,}-parameter budget on floors alone; the floor is {low / 1000:g} instead")
    return low / 1000
