"""The architecture matrix as a benchmark: per model type, the checks of tests/test_architectures.py and what
they cost, written to bench/results/architectures.json; `--render` turns that JSON into the README's "Supported
architectures" table (between its markers) and prints the BENCHMARKS.md table.

    OMP_NUM_THREADS=2 python bench/architectures.py                  # run every type, write the JSON
    python bench/architectures.py --render                           # README table from the JSON

Each type runs in its own process, so that its peak RSS is its own (it includes torch and transformers, about
0.55 GB of the figure); the lowrank-free load of check (b) is one more process per type.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "architectures.json")
README = os.path.join(HERE, "..", "README.md")
BEGIN, END = "<!-- architectures:begin -->", "<!-- architectures:end -->"
CHECKS = ("full_rank", "statistics", "foreign_load", "kv_cache", "lora", "densify")


def run_one(model_type):
    """One type's row (run in a child process): the checks, their figures, this process's peak RSS."""
    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    import archs
    import torch
    from conftest import english_text, train_tokenizer

    torch.set_num_threads(1)  # as the test: tiny matrices lose from intra-op threads on a shared machine

    text = english_text()
    workdir = tempfile.mkdtemp(prefix=f"arch-{model_type}-")
    calib = os.path.join(workdir, "calib.txt")
    with open(calib, "w") as f:
        f.write(text)
    row = {"type": model_type}
    try:
        row = archs.run_type(model_type, workdir, train_tokenizer(text), calib)
        begin = time.perf_counter()
        foreign = archs.run_foreign([row["foreign_job"]])
        row["foreign_seconds"] = time.perf_counter() - begin
        row["checks"] = archs.checks(row)
        if foreign.returncode != 0:
            row["error"] = foreign.stderr.strip().splitlines()[-1]
    except Exception as error:  # a failing type is a row of the table, not the end of the run
        row["error"] = f"{type(error).__name__}: {error}".splitlines()[0]
    row["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    row.pop("foreign_job", None)
    return row


def run_all(types):
    import transformers

    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    import archs
    import torch

    rows = []
    for model_type in types or list(archs.TYPES):
        begin = time.perf_counter()
        done = subprocess.run([sys.executable, __file__, "--one", model_type], capture_output=True, text=True,
                              check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        row = json.loads(lines[-1]) if lines else {"type": model_type, "error": done.stderr.strip()[-300:]}
        row["wall_seconds"] = time.perf_counter() - begin
        rows.append(row)
        status = "ok" if not row.get("error") and all(v is not False for v in row.get("checks", {}).values()) \
            else f"FAILED {row.get('error') or row.get('checks')}"
        print(f"{model_type:12s} {row['wall_seconds']:5.1f}s {status}", flush=True)
    result = {"command": "OMP_NUM_THREADS=2 python bench/architectures.py",
              "threads": os.environ.get("OMP_NUM_THREADS"), "torch": torch.__version__,
              "transformers": transformers.__version__, "refused": {t: r[2] for t, r in archs.REFUSED.items()},
              "rows": rows}
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")


def mark(value):
    return "n/a" if value is None else ("yes" if value else "**no**")


def render(result):
    """The README table: one row per type, the checks as yes/no, then the refused types."""
    lines = ["| model type | class | targets | full-rank max logit error | loads without lowrank | KV cache "
             "| LoRA | densify | walker statistics |", "|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        c = row.get("checks") or {}
        if row.get("error"):
            lines.append(f"| {row['type']} | | | **failed**: {row['error']} | | | | | |")
            continue
        lines.append(f"| {row['type']} | {row['class']} | {row['targets']} | {row['full_rank_error']:.1e} | "
                     f"{mark(c.get('foreign_load'))} | {mark(c.get('kv_cache'))} | {mark(c.get('lora'))} | "
                     f"{mark(c.get('densify'))} | {mark(c.get('statistics'))} |")
    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    import archs

    # vision-language models were refused when this run was made and are compressed since (tests/test_multimodal.py)
    refused = "; ".join(f"{t} ({why})" for t, why in result["refused"].items() if t not in archs.VLM)
    lines.append("")
    lines.append(f"Vision-language models, the language model's blocks by default (tests/test_multimodal.py: the "
                 f"output loads with AutoModelForImageTextToText where lowrank is not installed, with the logits of "
                 f"`lowrank.load_pretrained`; LLaVA generates from an image): {', '.join(archs.VLM)}.")
    from test_moe import CYCLE, MOE  # the mixture-of-experts families (issue 17), tested on their own

    full_rank_only = [kind for kind in MOE if kind not in CYCLE]
    lines.append("")
    lines.append(f"Mixture-of-experts models, routed experts unpacked and factorized per expert (tests/test_moe.py: "
                 f"full-rank logits equal the dense model's, the keep-0.5 output loads where lowrank is not "
                 f"installed, cache equality, densify back to the stacked layout): {', '.join(CYCLE)}; full-rank "
                 f"exactness only: {', '.join(full_rank_only)}.")
    lines.append("")
    lines.append(f"Refused with one line (tests/test_architectures.py): {refused}. A model with several stacks "
                 "of blocks compresses one of them with `--blocks PATH`; the others stay dense and the run says so.")
    return "\n".join(lines)


def render_benchmarks(result):
    lines = ["| model type | compress keep 0.8 (s) | load (s) | peak RSS (MB) | full-rank max logit error |",
             "|---|---|---|---|---|"]
    for row in result["rows"]:
        if row.get("error"):
            continue
        lines.append(f"| {row['type']} | {row['compress_seconds']:.2f} | {row['load_seconds']:.3f} | "
                     f"{row['peak_rss_bytes'] / 2**20:.0f} | {row['full_rank_error']:.1e} |")
    return "\n".join(lines)


def write_readme(table):
    with open(README) as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        sys.exit(f"README.md has no {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(README, "w") as f:
        f.write(f"{head}{BEGIN}\n{table}\n{END}{tail}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("types", nargs="*", help="model types (default: all of tests/archs.py)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--render", action="store_true", help="write the README table from the JSON, print the "
                        "BENCHMARKS table")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one)))
        return
    if not args.render:
        run_all(args.types)
    with open(RESULTS) as f:
        result = json.load(f)
    write_readme(render(result))
    print(render_benchmarks(result))


if __name__ == "__main__":
    main()
