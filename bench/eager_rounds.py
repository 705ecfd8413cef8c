"""Eager transformers prefill and batched decode, interleaved: the serve_bench columns that swing by +-20% between
fresh processes, measured in one process in rounds so that every ratio compares runs made seconds apart.

    python bench/eager_rounds.py             # bench/results/eager-rounds.json, then its table
    python bench/eager_rounds.py --render    # the table only

Models (bench/serve_bench.py's checkpoints and loader): the dense model as transformers loads it, the same with
`lowrank.decode_layout`, and the default keep 0.8 and keep 0.5 checkpoints as `lowrank.load_pretrained` loads
them, keep 0.5 also with `decode_layout=False` (transformers' F.linear; "row-major" dates from the column-major
layout `decode_layout` applied up to the twenty-first session). Float32. Each round runs every model once, in turn: a
prefill of 1 and of 8 prompts of 512 tokens (one new token) and a greedy decode of 64 new tokens for 16 prompts
of 32 tokens (their prefill, timed apart, subtracted). One untimed warm-up round. The ratio to dense is taken
within each round; the table gives the median over rounds and, in brackets, the lowest and highest round.
"""

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common
import serve_bench

MODELS = {"dense": ("dense", "default"), "dense decode-layout": ("dense", "decode"),
          "keep 0.8": ("keep 0.8", "default"), "keep 0.5": ("keep 0.5", "default"),
          "keep 0.5 row-major": ("keep 0.5", "row-major")}
COLUMNS = ("prefill_1x512_tokens_per_s", "prefill_8x512_tokens_per_s", "decode_16_tokens_per_s")
NEW = 64


def seconds(run, ids, new):
    start = time.perf_counter()
    run(ids, new)
    return time.perf_counter() - start


def one_round(runs):
    figures = {}
    for label, run in runs.items():
        row = {}
        for batch in (1, 8):
            row[f"prefill_{batch}x512_tokens_per_s"] = batch * 512 / seconds(run, run.prompts(batch, 512), 1)
        ids = run.prompts(16, serve_bench.PROMPT)
        first = seconds(run, ids, 1)
        row["decode_16_tokens_per_s"] = 16 * NEW / (seconds(run, ids, NEW + 1) - first)
        figures[label] = row
    return figures


def interleaved(doc, out, runs, one_round, rounds):
    """One untimed warm-up round, then `rounds` timed ones; saves bench/results/`out` and returns it."""
    one_round(runs)
    timed = []
    for _ in range(rounds):
        timed.append(one_round(runs))
        print(timed[-1], flush=True)
    result = {"protocol": doc.split("\n\n")[2], "machine": common.machine(), "load_average": os.getloadavg(),
              "rounds": timed}
    print(common.save(out, result))
    return result


def markdown(results):
    lines = ["| model | " + " | ".join(c.replace("_tokens_per_s", "").replace("_", " ") + " tok/s (vs dense)"
                                       for c in COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    rounds = results["rounds"]
    for label in MODELS:
        cells = []
        for column in COLUMNS:
            rate = statistics.median(r[label][column] for r in rounds)
            ratios = [r[label][column] / r["dense"][column] for r in rounds]
            cells.append(f"{rate:.1f}" if label == "dense" else
                         f"{rate:.1f} ({statistics.median(ratios):.2f}x, {min(ratios):.2f}-{max(ratios):.2f})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = common.bench_parser(__doc__, "eager-rounds.json", "")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if common.rendered(args, markdown):
        return
    common.prepare()
    paths = serve_bench.checkpoints(sorted({checkpoint for checkpoint, _ in MODELS.values()}))
    runs = {label: serve_bench.EagerRun(paths[checkpoint], "float32", layout)
            for label, (checkpoint, layout) in MODELS.items()}
    print(markdown(interleaved(__doc__, args.out, runs, one_round, args.rounds)))


if __name__ == "__main__":
    main()
