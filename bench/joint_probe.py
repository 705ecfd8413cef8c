"""Joint factorization of layers that read the same input (issue 19): one shared `down` for gate/up, or for
q/k/v, against separate factors at the same parameter count, on the project's protocol.

    git apply bench/patches/joint-probe.patch      # lets LOWRANK_PROBE_SLICE choose which fused layers are sliced
    python bench/joint_probe.py --variants qkv_proj,gate_up_proj,all --extra="--refine-steps 0"
    python bench/joint_probe.py --variants qkv_proj,all
    git apply -R bench/patches/joint-probe.patch

SmolLM2-135M in the Phi-3 layout (bench/fused_bench.py builds it: q/k/v one `qkv_proj`, gate/up one
`gate_up_proj`, logits equal to the Llama model's) is compressed with the defaults. A fused layer factorized whole
is exactly a joint factorization: one `down` (the shared input basis, whitened once with the layer's input Gram)
and one `up` whose row blocks are the members' own ups. Factorized per slice, it reproduces the Llama layout's
separate factors to every digit (BENCHMARKS.md, "Fused projections"). The patch slices only the fused layers whose
name contains LOWRANK_PROBE_SLICE, so one run can make gate/up joint and keep q/k/v separate:
  qkv_proj       q/k/v separate, gate/up joint
  gate_up_proj   gate/up separate, q/k/v joint
  all            everything separate (the patch inactive): the baseline in the same layout
The Fisher allocation ranks a joint layer as one candidate (its stacked rows), so the parameter budget is the
same in every variant (the targeted parameters after compression are recorded).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common
import fused_bench


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default="qkv_proj,gate_up_proj,all")
    parser.add_argument("--ratio", type=float, default=0.8)
    parser.add_argument("--extra", default="", help="more compress options, e.g. --extra='--refine-steps 0'")
    parser.add_argument("--out", default="joint-probe.json")
    args = parser.parse_args()
    path = os.path.join(common.RESULTS, args.out)
    results = {"protocol": fused_bench.protocol(), "runs": {}}
    if os.path.exists(path):
        with open(path) as f:
            results = json.load(f)
    results["machine"] = common.machine()
    results["conversion"] = fused_bench.convert()
    extra = args.extra.split()
    for variant in args.variants.split(","):
        key = f"{variant}@{args.ratio}" + (f" {args.extra}" if extra else "")
        if key in results["runs"]:
            continue
        env = {"LOWRANK_PROBE_SLICE": variant} if variant != "all" else {}
        os.environ.pop("LOWRANK_PROBE_SLICE", None)
        os.environ.update(env)
        out = os.path.join(common.WORK, "joint", f"smollm2-phi3-{variant}-{args.ratio}" + ("-r0" if extra else ""))
        os.makedirs(os.path.dirname(out), exist_ok=True)
        cli = ["compress", fused_bench.PHI3_DIR, "--ratio", str(args.ratio), "-o", out, "--overwrite",
               *common.calib_args(), *extra]
        report, wall, command = common.run_lowrank(cli)
        evaluation = common.measure(out)["eval"]
        entry = fused_bench.run_entry(variant, args.ratio, command, report, wall, evaluation)
        entry["env"] = env
        results["runs"][key] = entry
        print(key, round(evaluation["perplexity"], 2), round(wall), entry["target_params_after"], flush=True)
        common.save(args.out, results)


if __name__ == "__main__":
    main()
