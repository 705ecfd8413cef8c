"""What one call of the vLLM plugin's layers costs beyond its GEMM, on the engine's own layers (issue 18).

    /path/to/vllm-cpu-venv/bin/python bench/vllm_call_cost.py     # bench/results/vllm-call-cost.json
    python bench/vllm_call_cost.py --render

Loads keep 0.8 (bench/serve_bench.py's checkpoint) in vLLM with enforce_eager, the engine core in this process,
and in the engine times, for the first factorized q/k/v group, its down GEMM (one row) called as a module (vLLM's
forward and quant-method layers) and through the kernel vLLM chose at load (`cpu_linear`, what the plugin calls);
then, at 16 rows, its first up over a column slice of the down's output read in place and over a copy. Median of 5
passes of 2,000 calls (weights stay in cache: this isolates the per-call cost, not the bytes). Both dtypes.
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


def per_call_us(fn, calls=2000):
    fn()
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(samples)


def in_engine(model):
    """Timings on the model's first FactorizedColumnGroup (run inside vLLM's worker by LLM.apply_model)."""
    import torch
    from lowrank.serve.vllm_layers import FactorizedColumnGroup

    group = next(m for m in model.modules() if isinstance(m, FactorizedColumnGroup))
    down, (name, up) = group.down, next(iter(group.ups.items()))
    dtype = down.weight.dtype if down.weight.numel() else next(model.parameters()).dtype
    x = torch.randn(1, down.input_size, dtype=dtype)
    z = torch.randn(16, sum(group.sizes), dtype=dtype)
    start = group.spans[name][0]
    part = z[:, start: start + group.spans[name][1]]
    with torch.no_grad():
        return {"down_shape": [sum(group.sizes), down.input_size], "up_shape": [up.output_size_per_partition,
                                                                              part.shape[1]],
                "module_call_us": per_call_us(lambda: down(x)),
                "cpu_linear_us": per_call_us(lambda: down.cpu_linear(x, down.weight, down.bias)),
                "up_16_rows_in_place_us": per_call_us(lambda: up.cpu_linear(part, up.weight, up.bias)),
                "up_16_rows_copied_us": per_call_us(lambda: up.cpu_linear(part.contiguous(), up.weight, up.bias))}


def one(dtype):
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # apply_model runs in this process
    run = serve_bench.VllmRun(serve_bench.checkpoints(["keep 0.8"])["keep 0.8"], dtype)
    print(serve_bench.MARK + json.dumps(run.llm.apply_model(in_engine)[0]), flush=True)


def markdown(result):
    lines = ["| dtype | down (out x in) | module call, 1 row (us) | cpu_linear, 1 row (us) | up (out x in) "
             "| 16 rows in place (us) | 16 rows copied (us) |", "|---|---|---|---|---|---|---|"]
    for dtype, r in result["dtypes"].items():
        lines.append(f"| {dtype} | {' x '.join(map(str, r['down_shape']))} | {r['module_call_us']:.1f} "
                     f"| {r['cpu_linear_us']:.1f} | {' x '.join(map(str, r['up_shape']))} "
                     f"| {r['up_16_rows_in_place_us']:.1f} | {r['up_16_rows_copied_us']:.1f} |")
    return "\n".join(lines)


def main():
    parser = common.bench_parser(__doc__, "vllm-call-cost.json", "")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return one(args.one)
    if common.rendered(args, markdown):
        return
    result = {"protocol": __doc__.split("\n\n")[2], "machine": common.machine(),
              "dtypes": {dtype: serve_bench.marked_json(sys.executable, __file__, ["--one", dtype])
                         for dtype in ("float32", "bfloat16")}}
    print(common.save(args.out, result))
    print(markdown(result))


if __name__ == "__main__":
    main()
