"""Streaming: peak memory against model size, and the cost of streaming against the in-memory path.

    python bench/streaming_bench.py --layers 2,5,38 --compare-layers 5
    python bench/streaming_bench.py --layers "" --real-model --out streaming-smollm2.json

Builds synthetic Llama-architecture checkpoints with random float32 weights (hidden 1536, intermediate 4096,
GQA 12/4 heads, SmolLM2's tokenizer and vocabulary, tied embeddings; 38 layers is about 4 GiB), written
tensor by tensor so that building them needs little memory. Each is compressed with `--stream on --ratio 0.5`
by a real `lowrank compress` process (its own peak RSS and wall time); the model given by --compare-layers is
also compressed with `--stream off`, and the two outputs are compared byte for byte. --real-model does the
same comparison on SmolLM2-135M (bench/work/smollm2-135m), tensor by tensor.
Results: bench/results/streaming.json.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS = 1536, 4096, 12, 4
SAMPLES, SEQ_LEN = 16, 512


def synthetic(layers):
    """A random-weight Llama checkpoint directory with `layers` blocks (built once, cached in bench/work)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lowrank.io.publish import staged
    from lowrank.io.shards import ShardWriter
    from lowrank.io.streaming import weightless

    directory = os.path.join(common.WORK, f"synthetic-llama-{layers}")
    if os.path.exists(os.path.join(directory, "config.json")):
        return directory
    tokenizer = AutoTokenizer.from_pretrained(common.MODEL_DIR)
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=layers,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, vocab_size=len(tokenizer),
                         max_position_embeddings=2048, tie_word_embeddings=True, dtype="float32",
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         architectures=["LlamaForCausalLM"])
    with weightless():
        model = LlamaForCausalLM(config)
    with staged(directory) as staging:  # a build cut short is never mistaken for a finished one
        writer = ShardWriter(staging, 10**9)
        generator = torch.Generator().manual_seed(layers)
        for name, tensor in model.state_dict().items():
            if name == "lm_head.weight":
                continue  # tied to the embeddings
            if name.endswith("norm.weight"):
                value = torch.ones(tensor.shape)
            else:
                value = torch.randn(tensor.shape, generator=generator) * 0.02
            writer.add(name, value)
        writer.finish()
        config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return directory


def compress(source, stream, name):
    out = os.path.join(common.WORK, name)
    # --alloc uniform: the default (auto) picks the Fisher-weighted ranks only when the whole model is in memory
    args = ["compress", source, "--ratio", "0.5", "--alloc", "uniform", "-o", out, "--overwrite", "--stream", stream,
            "--calib",
            common.CALIB_FILE, "--num-samples", str(SAMPLES), "--seq-len", str(SEQ_LEN)]
    report, wall = common.run_cli(args)
    return out, report, wall, "lowrank " + " ".join(args)


def weights(directory):
    return {n: open(os.path.join(directory, n), "rb").read() for n in sorted(os.listdir(directory))
            if n.startswith("model") or n == "config.json"}


def same_tensors(a, b):
    """(number of tensors, how many are equal) over the two checkpoints' safetensors, by name."""
    import torch
    from safetensors import safe_open

    def tensors(directory):
        out = {}
        for name in sorted(os.listdir(directory)):
            if name.endswith(".safetensors"):
                with safe_open(os.path.join(directory, name), "pt") as f:
                    out.update({key: f.get_tensor(key) for key in f.keys()})  # noqa: SIM118
        return out

    ta, tb = tensors(a), tensors(b)
    equal = sum(1 for k in ta if k in tb and ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]))
    return len(ta | tb), equal


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="2,5,38")
    parser.add_argument("--compare-layers", type=int, default=5, help="also run this model in memory (it must fit)")
    parser.add_argument("--real-model", action="store_true", help="compare stream and memory on SmolLM2-135M")
    parser.add_argument("--out", default="streaming.json")
    args = parser.parse_args()
    common.prepare()
    results = {"machine": common.machine(), "runs": [], "calibration": f"{SAMPLES} x {SEQ_LEN} tokens"}
    if args.real_model:
        runs = {mode: compress(common.MODEL_DIR, mode, f"smollm2-{mode}") for mode in ("on", "off")}
        total, equal = same_tensors(runs["on"][0], runs["off"][0])
        results["real_model"] = {"model": "SmolLM2-135M", "tensors": total, "identical_tensors": equal,
                                 "commands": [run[3] for run in runs.values()],
                                 "wall_s": {mode: run[2] for mode, run in runs.items()},
                                 "peak_rss_bytes": {mode: run[1]["peak_rss_bytes"] for mode, run in runs.items()}}
        common.save(args.out, results)
        print(f"SmolLM2-135M: {equal} of {total} tensors identical between --stream on and off", file=sys.stderr)
    for layers in (int(x) for x in args.layers.split(",") if x):
        source = synthetic(layers)
        size = sum(os.path.getsize(os.path.join(source, n)) for n in os.listdir(source) if n.endswith(".safetensors"))
        print(f"{layers} layers ({size / 2**30:.2f} GiB) ...", file=sys.stderr)
        out, report, wall, command = compress(source, "on", f"synthetic-{layers}-stream")
        run = {"layers": layers, "weights_bytes": size, "mode": "stream", "command": command, "wall_s": wall,
               "peak_rss_bytes": report["peak_rss_bytes"], "timings_s": report["timings_s"]}
        results["runs"].append(run)
        common.save(args.out, results)
        if layers == args.compare_layers:
            memory_out, memory_report, memory_wall, memory_command = compress(source, "off",
                                                                              f"synthetic-{layers}-memory")
            results["runs"].append({"layers": layers, "weights_bytes": size, "mode": "memory",
                                    "command": memory_command, "wall_s": memory_wall,
                                    "peak_rss_bytes": memory_report["peak_rss_bytes"],
                                    "timings_s": memory_report["timings_s"]})
            results["compare"] = {"layers": layers, "stream_over_memory_time": wall / memory_wall,
                                  "identical_output": weights(out) == weights(memory_out)}
        common.save(args.out, results)
    print(markdown(results))


def markdown(results):
    lines = ["| layers | fp32 weights | mode | peak RSS | wall time |", "|---|---|---|---|---|"]
    for run in results["runs"]:
        lines.append(f"| {run['layers']} | {run['weights_bytes'] / 2**30:.2f} GiB | {run['mode']} | "
                     f"{run['peak_rss_bytes'] / 2**30:.2f} GiB | {run['wall_s']:.0f} s |")
    if "compare" in results:
        c = results["compare"]
        lines.append(f"\nStreaming / in-memory wall time at {c['layers']} layers: {c['stream_over_memory_time']:.2f}; "
                     f"outputs byte-identical: {c['identical_output']}.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
