"""Memory of a mixture-of-experts block's statistics, and what --offload-budget does to it (issue 17 item 5).

    python bench/moe_memory.py                       # moe-memory.json
    python bench/moe_memory.py --render              # the table of moe-memory.json

A block's Gram matrices are 16 E (H^2 + I^2) bytes (two float64 halves of an exact sum per input): for
Mixtral-8x7B 26.5 GiB a block, beyond this machine. No such model is offline, so the bench builds one whose
statistics dominate the same way at a size that runs here: a seeded random Qwen3-MoE (2 layers, hidden 512, 32
experts of width 1536, top-4, SmolLM2's tokenizer and vocabulary), 1.34 GB of expert statistics a block against
0.6 GB of expert weights in all. Each run is `lowrank compress` (whiten, --alloc uniform and the default Fisher
allocation, keep 0.5, the benchmarks' 16 x 512 calibration tokens) in a fresh process, with --offload-budget
none (everything in memory) and a budget that forces groups of experts, and once streamed (--stream on: the
model is not in memory either; Fisher needs the whole model, so uniform only); peak RSS is the report's
(ru_maxrss), and the written files are compared byte for byte with the in-memory run's. 1024 tokens reach an expert on average, fewer than its down
projection's 1536 inputs: every down projection takes the pooled-statistics path, read back from disk.
"""

import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

CONFIG = dict(hidden_size=512, intermediate_size=1536, moe_intermediate_size=1536, num_experts=32,
              num_experts_per_tok=4, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
              decoder_sparse_step=1, max_position_embeddings=1024, tie_word_embeddings=True)
# (allocation, --offload-budget, --stream): the first run of each allocation is the reference for its bytes
RUNS = [("uniform", "none", "off"), ("uniform", "256MB", "off"), ("uniform", "256MB", "on"),
        ("fisher", "none", "off"), ("fisher", "256MB", "off")]


def build(directory):
    """The random Qwen3-MoE (seed 0), saved once with SmolLM2's tokenizer."""
    if os.path.exists(os.path.join(directory, "config.json")):
        return directory
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(common.MODEL_DIR)
    torch.manual_seed(0)
    config = AutoConfig.for_model("qwen3_moe", vocab_size=len(tokenizer), **CONFIG)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def weights_digest(directory):
    digest = hashlib.sha256()
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            with open(os.path.join(directory, name), "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def markdown(results):
    lines = ["| allocation | --offload-budget | --stream | statistics passes a block | peak RSS | wall | output |",
             "|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        reference = results["digests"].get(row["alloc"])
        same = "reference" if row["budget"] == "none" and row["stream"] == "off" else \
            "identical" if row["digest"] == reference else "DIFFERENT"
        lines.append(f"| {row['alloc']} | {row['budget']} | {row['stream']} | {row['passes']} | {row['peak_rss_bytes'] / 2**30:.2f} GiB |"
                     f" {row['wall_s']:.0f} s | {same} |")
    return "\n".join(lines)


def main():
    parser = common.bench_parser(__doc__, "moe-memory.json", "")
    parser.add_argument("--runs", help="only these runs, as ALLOC/BUDGET/STREAM,... (with --resume the others are "
                                       "kept from --out), e.g. uniform/256MB/on")
    args = parser.parse_args()
    if common.rendered(args, markdown):
        return
    common.prepare()
    model = build(os.path.join(common.WORK, "moe-memory", "model"))
    earlier = common.earlier_results(args, __doc__.split("\n\n")[1:])
    rows, digests = (earlier["rows"], earlier["digests"]) if earlier else ([], {})
    chosen = [tuple(run.split("/")) for run in args.runs.split(",")] if args.runs else RUNS
    for alloc, budget, stream in chosen:
        rows = [row for row in rows if (row["alloc"], row["budget"], row["stream"]) != (alloc, budget, stream)]
        out = os.path.join(common.WORK, "moe-memory", f"{alloc}-{budget}-{stream}")
        report, wall, command = common.run_lowrank(
            ["compress", model, "--ratio", "0.5", "--alloc", alloc, "--offload-budget", budget, "--stream", stream,
             "-o", out, "--overwrite", "--no-verify", *common.calib_args()])
        passes = max(layer.get("info", {}).get("statistics_passes", 1) for layer in report["layers"]["list"])
        rows.append({"alloc": alloc, "budget": budget, "stream": stream, "passes": passes,
                     "peak_rss_bytes": report["peak_rss_bytes"], "wall_s": wall, "digest": weights_digest(out),
                     "command": command, "load": os.getloadavg()[0]})
        if (budget, stream) == ("none", "off"):
            digests[alloc] = rows[-1]["digest"]  # the in-memory run's: the reference
        print(json.dumps(rows[-1]), flush=True)
    rows.sort(key=lambda row: [(r[0], r[1], r[2]) for r in RUNS].index((row["alloc"], row["budget"], row["stream"])))
    result = {"protocol": __doc__.split("\n\n")[1:], "config": CONFIG, "machine": common.machine(), "rows": rows,
              "digests": digests}
    print(common.save(args.out, result))
    print(markdown(result))


if __name__ == "__main__":
    main()
