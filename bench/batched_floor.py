"""Where batched decode in eager transformers stops (bfloat16 by default): per-call cost against bytes.

    python bench/batched_floor.py                     # bench/results/batched-floor-bfloat16.json
    python bench/batched_floor.py --dtype float32     # bench/results/batched-floor-float32.json
    python bench/batched_floor.py --prefill           # batched-floor-prefill-bfloat16.json (or --dtype float32)
    python bench/batched_floor.py --render

Issue 18 asks that keep 0.8 be nowhere slower than dense. In bfloat16 at batch 4-16, eager transformers runs every
linear layer on oneDNN's matmul (F.linear; lowrank's kernel hands those rows to it too), and there a factorized
model gains little from its fewer bytes. This measures why. Models: the dense SmolLM2 as transformers loads it, and
the default keep 0.8 and keep 0.5 checkpoints (bench/serve_bench.py's) as `load_pretrained` loads them (decode
kernel and grouped downs), and keep 0.8 compressed with `--speed-aware` on a profile timed at 8 rows in bfloat16
(`bench/speed_profile.py --dtype bfloat16 --rows 8`, what `compress --speed-aware --speed-batch 8` measures in a
bfloat16 run), all in one process. For each batch (a decode step of one new token on the KV cache of a
32-token prompt, the cache cropped back after each step):
- the wall time of a step: the models interleaved, the order reversed every other repetition, median of 60;
- profiles (torch.profiler, input shapes recorded) of 4 steps per model, the models interleaved as above, 10
  rounds, the median per model: the aten::mm calls per step, their time, and the bytes of the weights they read
  (from each call's shapes, LM head included); the time of every other aten op; the wall time of the profiled
  steps less those two is Python (module calls, transformers' own code) and the profiler's own cost;
- F.linear over a 64 x 64 weight (in the cache) at the batch's rows, median of 5 x 400 calls: the cost of a
  call that reads next to nothing.
`--prefill`: the same for one 512-token prompt's forward with the logits of its last token only (what generate()
computes before the first new token), in place of the decode steps; there the multiply-adds of the mm calls
(GMAC, from their shapes) say more than their weights' bytes.
(A least-squares split of mm time into a cost per call and one per MB over these models was tried and dropped:
the two move together, and the fit swung from -48 to +81 us per call between runs.)
"""

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common
import grouped_downs
import serve_bench

MODELS = ("dense", "keep 0.8", "keep 0.5", "keep 0.8 bf16-b8-speed-aware")
BATCHES = (1, 4, 8, 16)
PREFILL = 512  # --prefill: one prompt of this many tokens
PREFILL_KEY = str(PREFILL)  # the results file's key (JSON keys are strings)
WALL_REPS, PROFILED_STEPS, ROUNDS, SMALL_CALLS = 60, 4, 10, 2000  # decode steps: grouped_downs.decode_step


def wall(steps):
    """{label: median ms per step}, the models interleaved."""
    return {label: statistics.median(t) * 1000 for label, t in grouped_downs.interleaved(steps, WALL_REPS).items()}


def profiled(step, itemsize):
    """mm calls, mm ms, mm weight MB, other aten ms and the rest (wall less those) per step, over PROFILED_STEPS."""
    from torch.profiler import profile

    with profile(record_shapes=True) as prof:
        start = time.perf_counter()
        for _ in range(PROFILED_STEPS):
            step()
        seconds = time.perf_counter() - start
    out = {"mm_calls": 0.0, "mm_ms": 0.0, "mm_weight_mb": 0.0, "mm_gmac": 0.0, "other_aten_ms": 0.0}
    for event in prof.key_averages(group_by_input_shape=True):
        if event.key == "aten::mm":
            # (p, q) @ (q, r): F.linear multiplies x (rows, q) by the weight's transpose, the float32 kernel the
            # weight (p, q) by x^T (q, rows); the weight's other side is the longer one (a factor of rank below the
            # rows would be counted at the rows: a few KB too many)
            (p, q), r = event.input_shapes[0][-2:], event.input_shapes[1][-1]
            out["mm_calls"] += event.count
            out["mm_ms"] += event.self_cpu_time_total / 1000
            out["mm_weight_mb"] += event.count * q * max(p, r) * itemsize / 1e6
            out["mm_gmac"] += event.count * p * q * r / 1e9
        elif event.key.startswith("aten::"):
            out["other_aten_ms"] += event.self_cpu_time_total / 1000
    out["python_and_rest_ms"] = seconds * 1000 - out["mm_ms"] - out["other_aten_ms"]
    return {key: value / PROFILED_STEPS for key, value in out.items()}


def profiles(steps, itemsize):
    """{label: profiled()'s figures}, each the median over ROUNDS, the models interleaved."""
    rounds = {label: [] for label in steps}
    for round_ in range(ROUNDS):
        for label in (list(steps) if round_ % 2 else list(steps)[::-1]):
            rounds[label].append(profiled(steps[label], itemsize))
    return {label: {key: round(statistics.median(r[key] for r in runs), 3) for key in runs[0]}
            for label, runs in rounds.items()}


def small_call_us(rows, dtype):
    import torch
    import torch.nn.functional as F

    x, weight = torch.randn(rows, 64, dtype=dtype), torch.randn(64, 64, dtype=dtype)
    for _ in range(50):
        F.linear(x, weight)
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(SMALL_CALLS // 5):
            F.linear(x, weight)
        samples.append((time.perf_counter() - start) / (SMALL_CALLS // 5) * 1e6)
    return round(statistics.median(samples), 2)


def prefill_step(run):
    ids = run.prompts(1, PREFILL)
    return lambda: run.model(ids, logits_to_keep=1)


def measure(runs, batch, dtype):
    """`batch`: a decode step's batch, or PREFILL (the prefill of one prompt of that many tokens)."""
    import torch

    with torch.no_grad():
        steps = {label: prefill_step(run) if batch == PREFILL else grouped_downs.decode_step(run, batch)
                 for label, run in runs.items()}
        times = wall(steps)
        split = profiles(steps, dtype.itemsize)
        models = {label: {"wall_ms": round(times[label], 3), **split[label]} for label in steps}
    for row in models.values():
        row["speedup"] = round(models["dense"]["wall_ms"] / row["wall_ms"], 3)
    return {"models": models, "small_call_us": small_call_us(batch, dtype)}


def ceilings(models):
    """Prefill: each model's time had its mm calls run at dense's multiply-adds per ms, and its speed-up then: how
    far a factorization can take a prefill here while everything else (attention, norms, activations, Python, the
    allocator: the wall time less the profiled mm time) stays what it is."""
    dense = models["dense"]
    per_gmac = dense["mm_ms"] / dense["mm_gmac"]
    lines = ["| model | mm GMAC vs dense | mm time vs dense | non-mm ms | ms at dense's MAC rate | speed-up ceiling |",
             "|---|---|---|---|---|---|"]
    for label, row in models.items():
        rest = row["wall_ms"] - row["mm_ms"]
        ideal = rest + row["mm_gmac"] * per_gmac
        lines.append(f"| {label} | {dense['mm_gmac'] / row['mm_gmac']:.2f}x | {dense['mm_ms'] / row['mm_ms']:.2f}x | "
                     f"{rest:.0f} | {ideal:.0f} | {dense['wall_ms'] / ideal:.3f}x |")
    return lines


def markdown(result):
    lines = ["| batch | model | step ms | vs dense | mm calls | mm ms | weight MB | mm GMAC | other aten ms | "
             "rest ms |", "|---|---|---|---|---|---|---|---|---|---|"]
    for batch, measured in result["batches"].items():
        for label, row in measured["models"].items():
            lines.append(f"| {batch} | {label} | {row['wall_ms']:.1f} | {row['speedup']:.3f}x | "
                         f"{row['mm_calls']:.0f} | {row['mm_ms']:.1f} | {row['mm_weight_mb']:.0f} | "
                         f"{row.get('mm_gmac', float('nan')):.2f} | {row['other_aten_ms']:.1f} | "
                         f"{row['python_and_rest_ms']:.1f} |")
    if PREFILL_KEY in result["batches"]:
        lines += ["", *ceilings(result["batches"][PREFILL_KEY]["models"])]
    lines += ["", "| batch | F.linear, 64 x 64 weight, us per call |", "|---|---|"]
    lines += [f"| {batch} | {measured['small_call_us']} |" for batch, measured in result["batches"].items()]
    return "\n".join(lines)


def main():
    f32, prefill = (any(word in arg for arg in sys.argv) for word in ("float32", "--prefill"))
    parser = common.bench_parser(
        __doc__, f"batched-floor{'-prefill' if prefill else ''}-{'float32' if f32 else 'bfloat16'}.json", "")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    parser.add_argument("--prefill", action="store_true", help=f"time a {PREFILL}-token prefill, not decode steps")
    args = parser.parse_args()
    if common.rendered(args, markdown):
        return
    import torch

    common.prepare()
    paths = serve_bench.checkpoints(list(MODELS))
    runs = {label: serve_bench.EagerRun(paths[label], args.dtype) for label in MODELS}
    dtype = getattr(torch, args.dtype)
    batches = {}
    for batch in (PREFILL,) if args.prefill else BATCHES:
        batches[str(batch)] = measure(runs, batch, dtype)  # keyed as the results file keys it
        print(batch, batches[str(batch)], flush=True)
    common.finish(args, __doc__, markdown, dtype=args.dtype, batches=batches)


if __name__ == "__main__":
    main()
