"""Loss-aware ranks for encoders (issue 19): `--alloc fisher` against `--alloc uniform` on a model with no LM head.

    OMP_NUM_THREADS=1 python bench/encoder_alloc_bench.py --ratios 0.8 [--resume]
    python bench/encoder_alloc_bench.py --render

No real encoder is available offline, so the stand-in is SmolLM2-135M's transformer without its head
(bench/work/smollm2-135m-base, a LlamaModel checkpoint): lowrank sees a model whose output is its final hidden
states, exactly as it sees BERT, and allocates its ranks from them (the hidden-state Fisher of core/fisher.py)
or uniformly. What makes the stand-in useful: its hidden states have a real consumer with a real metric, the
original (tied) LM head, so the same outputs are also scored by perplexity on the protocol's held-out news.
Reported per output: perplexity through the original head, and the cosine similarity to the dense model's final
hidden states per token and of each window's mean-pooled embedding (what a sentence-embedding user keeps).
Calibration and evaluation: bench/common.py (16 x 512 tokens, seed 0; the first 8,192 held-out tokens).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

BASE_DIR = os.path.join(common.WORK, "smollm2-135m-base")
PROTOCOL = {"model": "SmolLM2-135M's transformer without its head (LlamaModel), float32",
            "calibration": f"bench/common.py: {common.CALIB_SAMPLES} x {common.CALIB_SEQ_LEN} tokens, seed 0",
            "evaluation": f"the first {common.EVAL_MAX_TOKENS} held-out tokens in {common.EVAL_SEQ_LEN}-token windows: "
                          "perplexity through the original head, cosine to the dense final hidden states"}

MEASURE = r"""
import json, sys
import torch
sys.path.insert(0, {bench!r})
import common
import lowrank
from lowrank.evaluation.perplexity import perplexity
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained({model!r})
lm = AutoModelForCausalLM.from_pretrained({model!r}, dtype=torch.float32).eval()
dense = lm.model
body = lowrank.load_pretrained({path!r}).eval() if {path!r} else dense
stream, _ = common.eval_stream(tokenizer)
windows = stream[: common.EVAL_MAX_TOKENS].reshape(-1, common.EVAL_SEQ_LEN)
token_cos, pooled_cos = [], []
with torch.no_grad():
    for row in windows:
        a = dense(row[None]).last_hidden_state[0]
        b = body(row[None]).last_hidden_state[0]
        token_cos.append(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean().item())
        pooled_cos.append(torch.nn.functional.cosine_similarity(a.mean(0), b.mean(0), dim=0).item())
    lm.model = body
    result = perplexity(lm, stream, common.EVAL_SEQ_LEN, batch_size=4, max_tokens=common.EVAL_MAX_TOKENS)
result.update(token_cosine=sum(token_cos) / len(token_cos), pooled_cosine=sum(pooled_cos) / len(pooled_cos))
print(json.dumps(result))
"""


def prepare_base():
    """bench/work/smollm2-135m-base: the float32 checkpoint's transformer (LlamaModel), saved without its head."""
    if os.path.exists(os.path.join(BASE_DIR, "config.json")):
        return BASE_DIR
    code = f"""
import json
from transformers import AutoModelForCausalLM, AutoTokenizer
from lowrank.io.publish import staged
model = AutoModelForCausalLM.from_pretrained({common.MODEL_DIR!r})
with staged({BASE_DIR!r}) as staging:
    model.model.save_pretrained(staging)
    AutoTokenizer.from_pretrained({common.MODEL_DIR!r}).save_pretrained(staging)
print(json.dumps({{"class": type(model.model).__name__}}))
"""
    common.run_python(code)
    return BASE_DIR


def measure(path):
    return common.run_python(MEASURE.format(bench=common.HERE, model=common.MODEL_DIR, path=path))


def markdown(results):
    lines = ["| --alloc | keep | perplexity (original head) | token cosine | pooled cosine | compress wall | peak RSS |",
             "|---|---|---|---|---|---|---|"]
    dense = results["dense"]
    lines.append(f"| dense | 1.0 | {dense['perplexity']:.2f} | 1 | 1 | - | - |")
    for run in sorted(results["runs"], key=lambda r: (-r["ratio"], r["alloc"])):
        lines.append(f"| {run['alloc']} | {run['ratio']} | {run['perplexity']:.2f} | {run['token_cosine']:.4f} | "
                     f"{run['pooled_cosine']:.4f} | {run['compress_wall_s']:.0f} s | "
                     f"{run['compress_peak_rss_bytes'] / 2**30:.2f} GiB |")
    return "\n".join(lines)


def main():
    parser = common.bench_parser(__doc__, "encoder-alloc.json", "0.8")
    parser.add_argument("--allocs", default="uniform,fisher")
    args = parser.parse_args()
    if common.rendered(args, markdown):
        return
    common.prepare()
    prepare_base()
    results = common.earlier_results(args, PROTOCOL) or {"protocol": PROTOCOL, "machine": common.machine(), "runs": []}
    if "dense" not in results:
        results["dense"] = measure("")
        common.save(args.out, results)
    done = {(run["alloc"], run["ratio"]) for run in results["runs"]}
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for alloc in args.allocs.split(","):
            if (alloc, ratio) in done:
                continue
            print(f"--alloc {alloc} keep {ratio} ...", file=sys.stderr)
            out = os.path.join(common.WORK, "encoder", f"base-{alloc}-{ratio}")
            os.makedirs(os.path.dirname(out), exist_ok=True)
            report, wall, command = common.run_lowrank(["compress", BASE_DIR, "--ratio", str(ratio), "-o", out,
                                                        "--overwrite", "--alloc", alloc, *common.calib_args()])
            results["runs"].append({"alloc": alloc, "ratio": ratio, "command": command, "compress_wall_s": wall,
                                    "compress_peak_rss_bytes": report["peak_rss_bytes"],
                                    "targets_kept": report["ratio"]["targets"]["kept"], **measure(out)})
            common.save(args.out, results)
    print(markdown(results))


if __name__ == "__main__":
    main()
