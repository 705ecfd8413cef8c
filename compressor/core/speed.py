"""Speed break-even ranks: above which rank a factor pair is slower than the dense matrix it replaces.

A rank-r pair of an m x n matrix holds r(m + n) numbers, so it saves parameters below r = mn / (m + n). But a
decode step multiplies one token's vector by each matrix, which costs about the bytes read plus a fixed cost per
call, and the pair makes two calls: near the parameter break-even it is slower than the dense layer, a waste
(issue 18). `--speed-aware` measures, for every matrix shape the model has, the batch-1 time (or, with
`--speed-batch N`, the time at N rows: a server's batched decode step) of the dense product and of the factorized
one (on the kernel it is given: compression passes decode_linear, what `load_pretrained` runs) at a few ranks on
the device and dtype the model runs in, fits the factorized time as a line in r (bytes grow linearly with r), and
takes the largest rank still as fast as dense as the matrix's ceiling: the allocation then stores a matrix dense
rather than above it (ranks.allocate_global).

Timings differ between runs, so the ceilings of a run are recorded (report, config.json); `--speed-profile`
reads them back, which makes a rerun byte-identical.
"""

import statistics
import time

FRACTIONS = (0.125, 0.25, 0.5, 0.75, 1.0)  # of the parameter break-even rank: where the line is fitted
CALLS, REPEATS = 64, 7  # calls per timing (one call is microseconds), timings per figure (the median is kept)
STREAM_BYTES, MAX_COPIES = 64 << 20, 1024  # a timing cycles through copies of its weights filling twice a 32 MB L3


def shape_key(m, n):
    return f"{m}x{n}"


def _time(fn, copies):
    """Median seconds of one call of fn(i), i cycling through `copies` weights (so that, as in a decode step
    of a whole model, each call reads its weights from memory, not from a cache a single copy would sit in)."""
    fn(0)  # warm-up: allocations, kernel selection
    calls = max(CALLS, copies)  # every copy once a sample: none is still in a cache when it is read again
    samples = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        for i in range(calls):
            fn(i % copies)
        samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples)


def _copies(generator, shape, device, dtype):
    import torch

    itemsize = torch.empty(0, dtype=dtype).element_size()
    count = min(MAX_COPIES, max(1, -(-STREAM_BYTES // (shape[0] * shape[1] * itemsize))))
    return [torch.randn(shape, generator=generator).to(device=device, dtype=dtype) for _ in range(count)]


def measure_shape(m, n, device, dtype, linear, seed=0, rows=1):
    """{"dense_us", "base_us", "per_rank_us", "ceiling"} of an m x n matrix: the dense time at `rows` rows, the line
    base + per_rank * r fitted to the factorized times, and the largest rank whose fitted time is at most the
    dense one (0: never as fast; capped at the parameter break-even rank). `linear(x, weight)` is the kernel
    timed: the one the model will run on. Weights are streamed from memory (_time): timed on one cache-resident
    copy, SmolLM2's shapes cost 0.04-0.1 us per rank on vLLM's kernel, a fixed cost per call and nothing else."""
    import torch

    from .ranks import break_even_rank

    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=generator).to(device=device, dtype=dtype)
    dense_weights = _copies(generator, (m, n), device, dtype)
    even = break_even_rank(m, n)
    with torch.no_grad():
        dense = _time(lambda i: linear(x, dense_weights[i]), len(dense_weights))
        del dense_weights
        ranks, times = [], []
        for fraction in FRACTIONS:
            r = max(1, int(fraction * even))
            pairs = list(zip(_copies(generator, (r, n), device, dtype),
                             _copies(generator, (m, r), device, dtype)))
            times.append(_time(lambda i, pairs=pairs: linear(linear(x, pairs[i][0]), pairs[i][1]), len(pairs)))
            ranks.append(r)
    slope, base = _fit_line(ranks, times)
    return {"dense_us": dense * 1e6, "base_us": base * 1e6, "per_rank_us": slope * 1e6,
            "ceiling": _ceiling(dense, base, slope, even)}


def _ceiling(dense, base, slope, even):
    """The largest rank r <= even with base + slope * r <= dense. A line that does not grow is as fast as dense
    at every rank or at none."""
    if slope <= 0:
        return even if base <= dense else 0
    return max(0, min(even, int((dense - base) / slope)))


def _fit_line(xs, ys):
    """Least-squares (slope, intercept)."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return slope, my - slope * mx


def measure_profile(shapes, device, dtype, linear, rows=1):
    """The speed profile of a model: every distinct shape of `shapes` ({name: (m, n)}) measured once, at `rows`
    rows (1: a batch-1 decode step; a server's batch: its decode step, where a call's fixed cost can weigh more
    than the bytes a factor pair saves: bench/batched_floor.py)."""
    import torch

    profile = {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
               "rows": rows, "shapes": {}}
    for m, n in sorted(set(shapes.values())):
        profile["shapes"][shape_key(m, n)] = measure_shape(m, n, device, dtype, linear, rows=rows)
    return profile


def ceilings(profile, shapes):
    """{name: speed break-even rank} for the allocation, from a profile that covers every shape."""
    return {name: profile["shapes"][shape_key(m, n)]["ceiling"] for name, (m, n) in shapes.items()}


def expected_times(profile, shapes, ranks):
    """(dense, factorized) microseconds at the profile's rows, summed over the matrices `ranks` names
    ({name: rank or None})."""
    dense = factorized = 0.0
    for name, rank in ranks.items():
        entry = profile["shapes"][shape_key(*shapes[name])]
        dense += entry["dense_us"]
        factorized += entry["dense_us"] if rank is None else entry["base_us"] + entry["per_rank_us"] * rank
    return dense, factorized


def summary(profile, shapes, ranks):
    """The report's `speed`: the profile and what it predicts for these ranks (the targets' products at the
    profile's rows; a profile from before `rows` was recorded was timed at one)."""
    dense, factorized = expected_times(profile, shapes, ranks)
    rows = profile.get("rows", 1)
    times = {"dense": round(dense, 1), "factorized": round(factorized, 1),
             "speedup": round(dense / factorized, 3) if factorized else None}
    # targets_batch1_us is the version-1 report's name, kept where it is true (fields are only added in a version)
    return {"profile": profile, "rows": rows, "targets_us": times,
            **({"targets_batch1_us": times} if rows == 1 else {})}


def read_profile(path):
    """A profile from --speed-profile FILE: a compress report (compression_report.json, or `--json` output) of a
    --speed-aware run, or the profile itself. One-line UsageError otherwise."""
    import json

    from ..errors import UsageError

    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as error:
        raise UsageError(f"--speed-profile {path}: cannot read it as JSON ({error})") from None
    profile = data.get("speed", {}).get("profile") if isinstance(data, dict) and "speed" in data else data
    shapes = profile.get("shapes") if isinstance(profile, dict) else None
    if not isinstance(shapes, dict) or not all(
            isinstance(v, dict) and {"dense_us", "base_us", "per_rank_us", "ceiling"} <= set(v) for v in shapes.values()):
        raise UsageError(f"--speed-profile {path} holds no speed profile: pass the compression_report.json of a "
                         "--speed-aware run")
    return profile
