"""Streaming: peak memory against model size, and the cost of streaming against the in-memory path.

    python bench/streaming_bench.py --layers 5,15,38 --compare-layers 38

Builds synthetic Llama-architecture checkpoints with random float32 weights (hidden 1536, intermediate 4096,
GQA 12/4 heads, SmolLM2's tokenizer and vocabulary, tied embeddings; 38 layers is about 4 GiB), written
tensor by tensor so that building them needs little memory. Each is compressed with `--stream on --ratio 0.5`
by a real `lowrank compress` process (its own peak RSS and wall time); the model given by --compare-layers is
also compressed with `--stream off`, and the two outputs are compared byte for byte.
Results: bench/results/streaming.json.
"""

import argparse
import json
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

    from lowrank.shards import ShardWriter
    from lowrank.streaming import weightless

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
    os.makedirs(directory + ".tmp", exist_ok=True)
    writer = ShardWriter(directory + ".tmp", 10**9)
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
    config.save_pretrained(directory + ".tmp")
    tokenizer.save_pretrained(directory + ".tmp")
    os.replace(directory + ".tmp", directory)
    return directory


def compress(source, stream, name):
    out = os.path.join(common.WORK, name)
    args = ["compress", source, "--ratio", "0.5", "-o", out, "--overwrite", "--stream", stream, "--calib",
            common.CALIB_FILE, "--num-samples", str(SAMPLES), "--seq-len", str(SEQ_LEN)]
    report, wall = common.run_cli(args)
    return out, report, wall, "lowrank " + " ".join(args)


def weights(directory):
    return {n: open(os.path.join(directory, n), "rb").read() for n in sorted(os.listdir(directory))
            if n.startswith("model") or n == "config.json"}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="5,15,38")
    parser.add_argument("--compare-layers", type=int, default=38)
    parser.add_argument("--out", default="streaming.json")
    args = parser.parse_args()
    common.prepare()
    results = {"machine": common.machine(), "runs": [], "calibration": f"{SAMPLES} x {SEQ_LEN} tokens"}
    for layers in map(int, args.layers.split(",")):
        source = synthetic(layers)
        size = sum(os.path.getsize(os.path.join(source, n)) for n in os.listdir(source) if n.endswith(".safetensors"))
        print(f"{layers} layers ({size / 2**30:.2f} GiB) ...", file=sys.stderr)
        out, report, wall, command = compress(source, "on", f"synthetic-{layers}-stream")
        run = {"layers": layers, "weights_bytes": size, "mode": "stream", "command": command, "wall_s": wall,
               "peak_rss_bytes": report["peak_rss_bytes"], "timings_s": report["timings_s"]}
        results["runs"].append(run)
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
