"""Grouped downs (`lowrank.group_downs`, on by default in `load_pretrained`) against one GEMM per factor: eager
transformers decode steps and prefill, whole models, paired.

    python bench/grouped_downs.py              # bench/results/grouped-downs.json
    python bench/grouped_downs.py --dtype bfloat16   # bench/results/grouped-downs-bfloat16.json
    python bench/grouped_downs.py --render

Models: the dense SmolLM2 on F.linear (as transformers runs it; added in the twenty-sixth session) and on the decode
kernel (`lowrank.decode_layout`), and the default keep 0.8 and keep 0.5 checkpoints (bench/serve_bench.py's) on the
kernel with and without grouping, keep 0.5 also on F.linear with and without (a control: up to 1d3b196 its groups
checked each call and never acted; since then group_downs makes no group off the kernel, and the two are the same
model); float32 (or `--dtype`), eight models in one process. What is timed is one forward pass of the model, not
generate(): a decode step of one new token on the KV cache of a 32-token prompt (the cache cropped back after each
step) at batch 1, 4, 8 and 16, and the prefill of one 512-token prompt. Each repetition runs every model once, the
order reversed every other repetition; 400 repetitions at batch 1, 200 at batch 4-16, 40 of the prefill. The figures
are the median time per model and, for each grouped model, the median over repetitions of the ungrouped model's time
over the grouped one's in the same repetition (a paired ratio), also given for each half of the repetitions. Two
more tables give each model's speed against the dense model on the kernel and on F.linear (ratios of median times).
Whole generate() rounds (64 tokens, five rounds) scattered the same ratio over 0.92-1.09 on this machine, which
hides an effect of a few percent.

Grouping: the layers of an input group (q/k/v, gate/up) with at least one factorized member run their first GEMMs
(the factorized members' downs and the dense members' weights, stacked) as one GEMM, then each factorized
member's up (modeling_lowrank.InputGroup).
"""

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common
import serve_bench

MODELS = [("dense", "F.linear"), ("dense", "kernel"),
          ("keep 0.8", "kernel"), ("keep 0.8", "kernel, grouped"), ("keep 0.5", "kernel"),
          ("keep 0.5", "kernel, grouped"), ("keep 0.5", "F.linear"), ("keep 0.5", "F.linear, grouped")]
MEASURES = {"decode_b1": (1, 400), "decode_b4": (4, 200), "decode_b8": (8, 200), "decode_b16": (16, 200),
            "prefill_512": (1, 40)}  # name: (batch, repetitions)
PROMPT = 32
DENSE = "dense, kernel"


def load(paths, dtype="float32"):
    import lowrank

    runs = {}
    for checkpoint, kernel in MODELS:
        run = serve_bench.EagerRun(paths[checkpoint], dtype, "row-major")  # F.linear: group_downs makes no group
        if kernel.startswith("kernel"):
            lowrank.decode_layout(run.model)
        if kernel.endswith("grouped"):
            made = lowrank.group_downs(run.model)  # off the kernel: none (the control)
            assert made > 0 or not kernel.startswith("kernel"), f"{checkpoint}: no group was made"
        runs[f"{checkpoint}, {kernel}"] = run
    return runs


def decode_step(run, batch):
    """One decode step of `batch` new tokens on the KV cache of a PROMPT-token prompt, the cache cropped back after
    it (call under torch.no_grad)."""
    import torch

    ids = run.prompts(batch, PROMPT)
    cache = run.model(ids, use_cache=True).past_key_values
    position = torch.full((batch, 1), PROMPT)

    def step():
        run.model(ids[:, -1:], cache=cache, use_cache=True, position_ids=position)
        cache.crop(-1)

    return step


def interleaved(calls, repetitions):
    """{label: [seconds per repetition]}: every call once a repetition, the order reversed every other one; the
    first repetition is a warm-up."""
    times = {label: [] for label in calls}
    for repetition in range(repetitions + 1):
        for label in (list(calls) if repetition % 2 else list(calls)[::-1]):
            start = time.perf_counter()
            calls[label]()
            if repetition:
                times[label].append(time.perf_counter() - start)
    return times


def steps(runs, measure):
    """{label: [seconds per repetition]} of one measure, the models interleaved."""
    import torch

    batch, repetitions = MEASURES[measure]
    with torch.no_grad():
        if measure.startswith("prefill"):
            calls = {label: lambda run=run, ids=run.prompts(batch, 512): run.model(ids) for label, run in runs.items()}
        else:
            calls = {label: decode_step(run, batch) for label, run in runs.items()}
        return interleaved(calls, repetitions)


def summary(times):
    out = {}
    for label, seconds in times.items():
        out[label] = {"median_ms": statistics.median(seconds) * 1000}
        base = label.removesuffix(", grouped")
        if base != label:
            ratios = [a / b for a, b in zip(times[base], seconds)]
            half = len(ratios) // 2
            out[label].update(paired_speedup=statistics.median(ratios),
                              halves=[statistics.median(ratios[:half]), statistics.median(ratios[half:])])
    return out


def markdown(results):
    measures = results["measures"]
    lines = ["| model | " + " | ".join(f"{m} ms (grouping's paired speed-up; halves)" for m in measures) + " |",
             "|---|" + "---|" * len(measures)]
    models = [(c, k) for c, k in MODELS if f"{c}, {k}" in next(iter(measures.values()))]  # older runs: fewer
    for checkpoint, kernel in models:
        label, cells = f"{checkpoint}, {kernel}", []
        for measure in measures:
            row = measures[measure][label]
            cell = f"{row['median_ms']:.2f}"
            if "paired_speedup" in row:
                cell += f" ({row['paired_speedup']:.3f}x; {row['halves'][0]:.3f}, {row['halves'][1]:.3f})"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for base in (DENSE, "dense, F.linear"):
        if base == DENSE or ("dense", "F.linear") in models:
            lines += ["", "| model | " + " | ".join(f"{m} vs {base}" for m in measures) + " |",
                      "|---|" + "---|" * len(measures)]
            for label in (f"{c}, {k}" for c, k in models if f"{c}, {k}" != base):
                cells = [f"{m[base]['median_ms'] / m[label]['median_ms']:.3f}x" for m in measures.values()]
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    bf16 = any("bfloat16" in arg for arg in sys.argv)
    parser = common.bench_parser(__doc__, "grouped-downs-bfloat16.json" if bf16 else "grouped-downs.json", "")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args()
    if common.rendered(args, markdown):
        return
    common.prepare()
    runs = load(serve_bench.checkpoints(sorted({checkpoint for checkpoint, _ in MODELS})), args.dtype)
    measures = {}
    for measure in MEASURES:
        measures[measure] = summary(steps(runs, measure))
        print(measure, measures[measure], flush=True)
    common.finish(args, __doc__, markdown, dtype=args.dtype, measures=measures)


if __name__ == "__main__":
    main()
