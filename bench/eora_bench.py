"""EoRA compensation of a 50% magnitude-pruned and of an `svd`-compressed SmolLM2-135M at several ranks.

    python bench/eora_bench.py --ranks 16,64 --svd-ratio 0.8

Each repair is a real `lowrank compensate` process with the calibration of compress_bench.py; perplexity is
measured with the adapter applied through PEFT (PeftModel.from_pretrained), on the same evaluation text.
Results: bench/results/eora.json.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

PRUNED_DIR = os.path.join(common.WORK, "smollm2-pruned50")


def prune(fraction=0.5):
    """Unstructured magnitude pruning: the smallest `fraction` of every block weight matrix set to zero."""
    if os.path.exists(os.path.join(PRUNED_DIR, "config.json")):
        return PRUNED_DIR
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(common.MODEL_DIR, PRUNED_DIR)
    path = os.path.join(PRUNED_DIR, "model.safetensors")
    tensors = load_file(path)
    for name, w in tensors.items():
        if ".layers." in name and name.endswith("proj.weight"):
            threshold = w.abs().flatten().kthvalue(int(fraction * w.numel())).values
            tensors[name] = torch.where(w.abs() <= threshold, torch.zeros_like(w), w)
    save_file(tensors, path, metadata={"format": "pt"})
    return PRUNED_DIR


def compensate(base, rank, name):
    out = os.path.join(common.WORK, f"eora-{name}-r{rank}")
    args = ["compensate", common.MODEL_DIR, base, "--rank", str(rank), "-o", out, "--overwrite",
            *common.calib_args()]
    return out, *common.run_lowrank(args)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", default="16,64")
    parser.add_argument("--svd-ratio", type=float, default=0.8)
    parser.add_argument("--out", default="eora.json")
    args = parser.parse_args()
    common.prepare()
    svd_dir = os.path.join(common.WORK, "compress", f"smollm2-svd-{args.svd_ratio}")  # compress_bench.py's
    if not os.path.exists(os.path.join(svd_dir, "config.json")):
        common.run_cli(["compress", common.MODEL_DIR, "--ratio", str(args.svd_ratio), "--method", "svd",
                        "--alloc", "uniform", "-o", svd_dir, "--overwrite", *common.calib_args()])
    bases = {"pruned50": prune(), f"svd{args.svd_ratio}": svd_dir}
    results = {"protocol": {"calibration": "as compress_bench.py", "evaluation": "as compress_bench.py"},
               "machine": common.machine(), "dense": common.measure(common.MODEL_DIR), "runs": []}
    for name, base in bases.items():
        print(f"{name} ...", file=sys.stderr)
        before = common.measure(base)["eval"]["perplexity"]
        for rank in map(int, args.ranks.split(",")):
            adapter, report, wall, command = compensate(base, rank, name)
            after = common.measure(base, adapter=adapter)["eval"]["perplexity"]
            results["runs"].append({
                "base": name, "rank": rank, "command": command, "ppl_before": before, "ppl_after": after,
                "params_added": report["summary"]["params_added"], "compensate_wall_s": wall,
                "mean_layer_error_before": report["summary"]["mean_error_before"],
                "mean_layer_error_after": report["summary"]["mean_error_after"],
            })
            common.save(args.out, results)
    print(markdown(results))


def markdown(results):
    lines = [f"Dense perplexity {results['dense']['eval']['perplexity']:.2f}.", "",
             "| compressed model | EoRA rank | ppl before | ppl after | mean layer error before -> after | "
             "params added | time |", "|---|---|---|---|---|---|---|"]
    for run in results["runs"]:
        lines.append(f"| {run['base']} | {run['rank']} | {run['ppl_before']:.2f} | {run['ppl_after']:.2f} | "
                     f"{run['mean_layer_error_before']:.3f} -> {run['mean_layer_error_after']:.3f} | "
                     f"{run['params_added'] / 1e6:.2f} M | {run['compensate_wall_s']:.0f} s |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
