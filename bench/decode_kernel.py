"""The decode kernel (`lowrank.decode_layout`, modeling_lowrank.decode_linear) against F.linear: one linear layer
per shape and row count, then whole models decoding at batch 1 and 16.

    python bench/decode_kernel.py              # bench/results/decode-kernel.json: one layer, each kernel
    python bench/decode_kernel.py --models     # bench/results/decode-kernel-models.json: six models interleaved
    python bench/decode_kernel.py --models --batches 4,8 --rounds 3 --out decode-kernel-batches.json
    python bench/decode_kernel.py --dtype bfloat16   # bench/results/decode-kernel-bfloat16.json
    python bench/decode_kernel.py --render [--models] [--out ...]

Layers: SmolLM2-135M's shapes (576 hidden, 1536 MLP, 192 for k/v, the 49,152 x 576 LM head) and its factors at
ranks 64-512, float32. Kernels: F.linear over the row-major weight (what transformers runs), F.linear over the
weight stored column-major (the layout lowrank shipped in the nineteenth to twenty-first sessions), and
decode_linear over the row-major weight. Each shape is timed over enough distinct copies of the weight to fill
128 MB, so that every call streams its weight from memory as a decode step does; median of 5 passes; torch's
default threads. Rows 1-16 are decode steps at batch 1-16, 64 and 512 prefill chunks. `--dtype bfloat16`: the same in
bfloat16, where the kernels are F.linear (oneDNN's matmul over the plain weight, which torch picks for bfloat16
when the CPU has AVX512), "native" (F.linear with oneDNN switched off around the pass: torch's own bfloat16 GEMV
and GEMM), "packed" (torch's oneDNN linear over a weight reordered once into oneDNN's layout, inductor's CPU path)
and decode_linear.

Models (`--models`): the dense SmolLM2 and the default keep 0.8 and keep 0.5 checkpoints (bench/serve_bench.py's),
in float32 (or `--dtype`), each on F.linear (transformers' own path; `load_pretrained(..., decode_layout=False)`)
and on the kernel (`lowrank.decode_layout`), six models in one process, grouped downs off (`lowrank.group_downs`,
the load default since the twenty-third session; bench/grouped_downs.py measures them). Each round runs every model
once, the order turned by one place per round: greedy decode of 64 new tokens after 32-token prompts at batch 1 (ms
per token) and batch 16 (tokens/s), each prompt's prefill timed apart and subtracted. One untimed warm-up round.
Ratios are taken within each round, against the dense model on F.linear and against the dense model on the kernel;
the table gives the median over rounds and, in brackets, the lowest and highest round. `--batches 4,8`: decode
tokens/s at those batch sizes instead, the same way.
"""

import itertools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common
import eager_rounds
import layout_variants
import serve_bench

SHAPES = [(1536, 576), (576, 1536), (576, 576), (192, 576), (49152, 576),  # dense
          (1536, 128), (1536, 256), (576, 128), (576, 256), (1536, 384), (576, 384),  # up factors
          (128, 576), (256, 576), (384, 576), (128, 1536), (256, 1536), (512, 1536),  # down factors
          (192, 64), (64, 576)]  # under DECODE_MIN_WEIGHT
ROWS = (1, 2, 4, 8, 16, 32, 64, 512)
KERNELS = {"float32": ("row-major", "column-major", "decode_linear"),
           "bfloat16": ("row-major", "native", "packed", "decode_linear")}
NEW = layout_variants.NEW
MODELS = [(checkpoint, kernel) for checkpoint in ("dense", "keep 0.8", "keep 0.5") for kernel in ("F.linear", "kernel")]


def microseconds(fn, weights, x, passes=5):
    times = []
    for _ in range(passes):
        start = time.perf_counter()
        for weight in weights:
            fn(x, weight)
        times.append((time.perf_counter() - start) / len(weights) * 1e6)
    return statistics.median(times)


def measure(shape, rows, dtype="float32"):
    import torch
    import torch.nn.functional as F

    from lowrank.io.modeling_lowrank import decode_linear

    out_features, in_features = shape
    dtype = getattr(torch, dtype)
    copies = max(4, int(128e6 / (out_features * in_features * dtype.itemsize)))
    generator = torch.Generator().manual_seed(0)
    plain = [torch.randn(shape, generator=generator).to(dtype) for _ in range(copies)]
    weights = {"row-major": plain, "column-major": [w.t().contiguous().t() for w in plain], "decode_linear": plain,
               "native": plain}
    fns = {"row-major": F.linear, "column-major": F.linear, "decode_linear": decode_linear, "native": F.linear}
    if dtype == torch.bfloat16:
        weights["packed"] = [torch.ops.mkldnn._reorder_linear_weight(w, rows) for w in plain]
        fns["packed"] = lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    x = torch.randn(1, rows, in_features, generator=generator).to(dtype)
    times = {}
    with torch.no_grad():
        for kernel in KERNELS[str(dtype).removeprefix("torch.")]:
            torch._C._set_mkldnn_enabled(kernel != "native")  # the switch alone (mkldnn.flags resets others too)
            try:
                microseconds(fns[kernel], weights[kernel][:2], x, 1)  # warm-up
                times[kernel] = round(microseconds(fns[kernel], weights[kernel], x), 2)
            finally:
                torch._C._set_mkldnn_enabled(True)
    return {"out": out_features, "in": in_features, "rows": rows, "us": times}


def markdown(results):
    if "rounds" in results:
        return models_markdown(results) if "b1_ms_per_token" in results["rounds"][0]["dense, F.linear"] \
            else batches_markdown(results)
    others = [k for k in KERNELS[results.get("dtype", "float32")] if k != "row-major"]
    lines = ["| out x in | F.linear us at " + ", ".join(map(str, ROWS)) + " rows | "
             + " | ".join(f"{k} / F.linear" for k in others) + " |", "|---|---|" + "---|" * len(others)]
    cells = {(r["out"], r["in"], r["rows"]): r["us"] for r in results["rows"]}
    for shape in SHAPES:
        row = [cells[(*shape, n)] for n in ROWS if (*shape, n) in cells]
        lines.append(f"| {shape[0]} x {shape[1]} | " + ", ".join(f"{c['row-major']:.0f}" for c in row) + " | "
                     + " | ".join(", ".join(f"{c[k] / c['row-major']:.2f}" for c in row) for k in others) + " |")
    return "\n".join(lines)


def models_markdown(results):
    rounds = results["rounds"]
    lines = ["| model | batch 1 ms/token | vs dense F.linear | vs dense kernel | batch 16 tok/s | vs dense F.linear "
             "| vs dense kernel |", "|---|---|---|---|---|---|---|"]

    def ratio(label, base, key):
        flip = key == "b1_ms_per_token"  # a time: the base over the model
        x = [(r[base][key] / r[label][key]) if flip else (r[label][key] / r[base][key]) for r in rounds]
        return f"{statistics.median(x):.2f}x ({min(x):.2f}-{max(x):.2f})"

    for label in (f"{checkpoint}, {kernel}" for checkpoint, kernel in MODELS):
        cells = []
        for key, digits in (("b1_ms_per_token", 2), ("b16_tokens_per_s", 1)):
            cells += [f"{statistics.median(r[label][key] for r in rounds):.{digits}f}",
                      ratio(label, "dense, F.linear", key), ratio(label, "dense, kernel", key)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def batch_round(runs, turn, batches):
    """One round of `--batches`: decode tokens/s per batch size, the order turned by `turn` places."""
    labels = list(runs)
    figures = {}
    for label in labels[turn % len(labels):] + labels[:turn % len(labels)]:
        run, figures[label] = runs[label], {}
        for batch in batches:
            ids = run.prompts(batch, serve_bench.PROMPT)
            first = eager_rounds.seconds(run, ids, 1)
            figures[label][f"b{batch}_tokens_per_s"] = batch * NEW / (eager_rounds.seconds(run, ids, NEW + 1) - first)
    return figures


def batches_markdown(results):
    rounds, keys = results["rounds"], [k for k in results["rounds"][0]["dense, F.linear"]]
    lines = ["| model | " + " | ".join(f"batch {k[1:].split('_')[0]} tok/s (vs dense F.linear, vs dense kernel)"
                                       for k in keys) + " |", "|---|" + "---|" * len(keys)]
    for label in (f"{checkpoint}, {kernel}" for checkpoint, kernel in MODELS):
        cells = []
        for key in keys:
            x, y = ([r[label][key] / r[base][key] for r in rounds] for base in ("dense, F.linear", "dense, kernel"))
            cells.append(f"{statistics.median(r[label][key] for r in rounds):.1f} ({statistics.median(x):.2f}x, "
                         f"{statistics.median(y):.2f}x; {min(y):.2f}-{max(y):.2f})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_models(args):
    import lowrank

    common.prepare()
    paths = serve_bench.checkpoints(sorted({checkpoint for checkpoint, _ in MODELS}))
    runs = {}
    for checkpoint, kernel in MODELS:
        run = serve_bench.EagerRun(paths[checkpoint], args.dtype, "row-major")
        if kernel == "kernel":
            lowrank.decode_layout(run.model)
        lowrank.group_downs(run.model, enable=False)  # the kernel alone, as measured (grouped_downs.py adds it)
        runs[f"{checkpoint}, {kernel}"] = run
    turns = itertools.count()
    parts = __doc__.split("\n\n")
    # interleaved() records paragraph 2: the models' protocol, here with the run's dtype
    doc = "\n\n".join(parts[:2] + [parts[3] + f" This run: {args.dtype}."])
    if args.batches:
        batches = [int(b) for b in args.batches.split(",")]
        return eager_rounds.interleaved(doc, args.out, runs, lambda r: batch_round(r, next(turns), batches),
                                        args.rounds)
    return eager_rounds.interleaved(doc, args.out, runs, lambda r: layout_variants.one_round(r, next(turns)),
                                    args.rounds)


def main():
    models, bf16 = "--models" in sys.argv, any("bfloat16" in arg for arg in sys.argv)
    out = ("decode-kernel-models" if models else "decode-kernel") + ("-bfloat16" if bf16 else "") + ".json"
    parser = common.bench_parser(__doc__, out, "")
    parser.add_argument("--models", action="store_true", help="whole models, interleaved (else one layer)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", help="with --models: decode tokens/s at these batch sizes instead (e.g. 4,8)")
    parser.add_argument("--dtype", choices=tuple(KERNELS), default="float32", help="the weights' dtype")
    args = parser.parse_args()
    if common.rendered(args, markdown):
        return
    if args.models:
        print(markdown(run_models(args)))
        return
    rows = [measure(shape, n, args.dtype) for shape in SHAPES for n in ROWS]
    save_layers(__doc__, args.out, rows, markdown, {"dtype": args.dtype} if args.dtype != "float32" else {})


def save_layers(doc, out, rows, markdown, extra=None):
    """Save one-layer timings (`rows`) under the protocol of `doc`, then print their table (gemv_layout too)."""
    import torch

    result = {"protocol": doc.split("\n\n")[2], "machine": common.machine(), "threads": torch.get_num_threads(),
              "load_average": os.getloadavg(), **(extra or {}), "rows": rows}
    print(common.save(out, result))
    print(markdown(result))


if __name__ == "__main__":
    main()
