"""The core issue's speed and memory targets: compress time against one forward pass, peak RSS, decode speed and
size at keep 0.5, at two calibration sizes so that the fixed and the per-token costs can be told apart.

    python bench/speed_bench.py --samples 16,64 --methods svd,whiten --ratio 0.5
    python bench/speed_bench.py --decode-only bench/work/speed/smollm2-whiten-0.5-n16   # on a quiet machine

For each calibration size N (windows of 512 tokens from the compress benchmark's calibration text, seed 0): one
plain forward pass of the dense model over those N windows (batch 8, as compress runs them) in a fresh process,
then `lowrank compress --num-samples N --alloc uniform` per method, each a fresh process timed from start to
exit. Decode speed (greedy, 128 new tokens after a 32-token prompt, median of 3 after a warm-up) of the dense
model and of the first method's output at the smallest N. Results: bench/results/speed.json.

Targets (issue 2): compress wall <= 2.5x the forward pass over the same tokens; peak RSS <= fp32 model +
calibration hidden states + 1 GiB; at keep 0.5 decode >= 1.2x dense and safetensors <= 0.55x the dense linear
bytes plus the untouched tensors.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

HIDDEN = 576  # SmolLM2-135M's hidden size: one float32 copy of the calibration states is N x 512 x 576 x 4 bytes


def compress(method, ratio, samples):
    out = os.path.join(common.WORK, "speed", f"smollm2-{method}-{ratio}-n{samples}")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    args = ["compress", common.MODEL_DIR, "--ratio", str(ratio), "--method", method, "--alloc", "uniform",
            "-o", out, "--overwrite", *common.calib_args(samples)]
    return out, *common.run_lowrank(args)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", default="16,64")
    parser.add_argument("--methods", default="svd,whiten")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--out", default="speed.json")
    parser.add_argument("--decode-only", metavar="CHECKPOINT", help="only the decode speed of CHECKPOINT against the "
                        "dense model, back to back (for a quiet machine); results: speed-decode.json")
    args = parser.parse_args()
    common.prepare()
    if args.decode_only:
        dense = common.measure(common.MODEL_DIR, decode=True)["decode_tokens_per_s"]
        factorized = common.measure(args.decode_only, decode=True)["decode_tokens_per_s"]
        result = {"machine": common.machine(), "checkpoint": args.decode_only, "dense_tokens_per_s": dense,
                  "tokens_per_s": factorized, "speedup": factorized / dense, "ok": factorized >= 1.2 * dense}
        print(json.dumps(result, indent=2))
        common.save("speed-decode.json", result)
        return
    sizes = [int(n) for n in args.samples.split(",")]
    methods = args.methods.split(",")
    results = {"protocol": {"model": "SmolLM2-135M-Instruct, float32 (as compress_bench.py)",
                            "calibration": f"lee_background.cor documents 1-240, N windows x {common.CALIB_SEQ_LEN}"
                                           " tokens, seed 0", "ratio": args.ratio, "alloc": "uniform"},
               "machine": common.machine(), "sizes": {}}
    for samples in sizes:
        print(f"dense forward over {samples} windows ...", file=sys.stderr)
        decode = samples == sizes[0]
        dense = common.measure(common.MODEL_DIR, forward=True, decode=decode, samples=samples)
        entry = {"forward_s": dense["forward_s"], "tokens": dense["forward_tokens"], "runs": []}
        if decode:
            entry["dense_decode_tokens_per_s"] = dense["decode_tokens_per_s"]
            entry["dense_perplexity"] = dense["eval"]["perplexity"]
        results["sizes"][str(samples)] = entry
        for method in methods:
            print(f"{method} {args.ratio} with {samples} windows ...", file=sys.stderr)
            out, report, wall, command = compress(method, args.ratio, samples)
            fp32_model = report["ratio"]["model"]["params_before"] * 4
            states = samples * common.CALIB_SEQ_LEN * HIDDEN * 4
            run = {"method": method, "command": command, "wall_s": wall, "timings_s": report["timings_s"],
                   "peak_rss_bytes": report["peak_rss_bytes"], "bytes_after": report["size"]["bytes_after"],
                   "wall_vs_forward": wall / dense["forward_s"], "wall_ok": wall <= 2.5 * dense["forward_s"],
                   "peak_rss_limit_bytes": fp32_model + states + 2**30,
                   "peak_rss_ok": report["peak_rss_bytes"] <= fp32_model + states + 2**30}
            if decode and method == methods[0]:
                measured = common.measure(out, decode=True)
                linear = report["ratio"]["targets"]["params_before"] * 4
                untouched = fp32_model - linear
                run.update(perplexity=measured["eval"]["perplexity"],
                           decode_tokens_per_s=measured["decode_tokens_per_s"],
                           decode_speedup=measured["decode_tokens_per_s"] / dense["decode_tokens_per_s"],
                           decode_ok=measured["decode_tokens_per_s"] >= 1.2 * dense["decode_tokens_per_s"],
                           size_limit_bytes=0.55 * linear + untouched,
                           size_ok=report["size"]["bytes_after"] <= 0.55 * linear + untouched)
            entry["runs"].append(run)
            common.save(args.out, results)
    if len(sizes) > 1:  # wall = fixed + per_token * tokens, from the two extreme sizes
        small, large = results["sizes"][str(sizes[0])], results["sizes"][str(sizes[-1])]
        results["split"] = {}
        for index, method in enumerate(methods):
            extra_tokens = large["tokens"] - small["tokens"]
            per_token = (large["runs"][index]["wall_s"] - small["runs"][index]["wall_s"]) / extra_tokens
            forward_per_token = (large["forward_s"] - small["forward_s"]) / extra_tokens
            results["split"][method] = {
                "fixed_s": small["runs"][index]["wall_s"] - per_token * small["tokens"],
                "per_token_s": per_token,
                "per_token_vs_forward": per_token / forward_per_token,
            }
    path = common.save(args.out, results)
    print(markdown(results))
    print(f"results: {path}", file=sys.stderr)


def markdown(results):
    lines = ["| windows (tokens) | forward | method | compress wall | x forward | peak RSS (limit) |",
             "|---|---|---|---|---|---|"]
    for samples, entry in results["sizes"].items():
        for run in entry["runs"]:
            lines.append(f"| {samples} ({entry['tokens']:,}) | {entry['forward_s']:.1f} s | {run['method']} | "
                         f"{run['wall_s']:.0f} s | {run['wall_vs_forward']:.2f} | "
                         f"{run['peak_rss_bytes'] / 2**30:.2f} GiB ({run['peak_rss_limit_bytes'] / 2**30:.2f}) |")
    for method, split in results.get("split", {}).items():
        lines.append(f"\n{method}: fixed {split['fixed_s']:.0f} s + {split['per_token_s'] * 1e3:.2f} ms/token "
                     f"({split['per_token_vs_forward']:.2f}x the forward pass's cost per token)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
