#!/usr/bin/env bash
# Issue 19: does shrinking each layer's input Gram (--damp) stand in for more calibration tokens? Keep 0.8, no
# refinement, the protocol otherwise; each output scored by common.measure (8,176 held-out tokens).
#   bash bench/damp_sweep.sh [DAMP ...]     (default 1e-2 1e-1 1e-3; the default 1e-4 is the thirteenth session's
#                                            53.07, "Where keep 0.8 stops")
# Results: bench/results/damp-sweep-0.8.json. Run from the repository root with lowrank installed, after
# `python -c "import sys; sys.path.insert(0, 'bench'); import common; common.prepare()"`.
set -euo pipefail
work=$(mktemp -d)
log=$work/sweep.log
for d in "${@:-1e-2 1e-1 1e-3}"; do
  for damp in $d; do
    out=$work/k08-d$damp
    start=$(date +%s)
    lowrank compress bench/work/smollm2-135m --ratio 0.8 -o "$out" --overwrite --no-verify --calib bench/work/calib.txt \
      --num-samples 16 --seq-len 512 --refine-steps 0 --damp "$damp" > "$out.log" 2>&1
    end=$(date +%s)
    python -c "import sys, json; sys.path.insert(0, 'bench'); import common; print('RESULT damp=$damp wall=$((end - start))', json.dumps(common.measure('$out')))" | tee -a "$log"
  done
done
python - "$log" <<'PY'
import json, re, sys
rows = []
for line in open(sys.argv[1]):
    damp, wall, measured = re.match(r"RESULT damp=(\S+) wall=(\d+) (.*)", line).groups()
    measured = json.loads(measured)
    rows.append({"damp": float(damp), "compress_wall_s": int(wall), "perplexity": measured["eval"]["perplexity"],
                 "eval": measured["eval"], "peak_rss_bytes_eval": measured["peak_rss_bytes"],
                 "command": "lowrank compress bench/work/smollm2-135m --ratio 0.8 -o OUT --overwrite --no-verify "
                            f"--calib bench/work/calib.txt --num-samples 16 --seq-len 512 --refine-steps 0 --damp {damp}"})
result = {"protocol": "keep 0.8, SmolLM2-135M float32, 16 x 512 calibration tokens (bench/work/calib.txt), no "
                      "refinement; scored with common.measure (first 8,176 held-out tokens)",
          "baseline": {"damp": 1e-4, "perplexity": 53.07,
                       "source": "BENCHMARKS.md, 'Where keep 0.8 stops' (thirteenth session; the default's --damp)"},
          "rows": rows}
with open("bench/results/damp-sweep-0.8.json", "w") as f:
    json.dump(result, f, indent=1)
    f.write("\n")
PY
rm -rf "$work"
