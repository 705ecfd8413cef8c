"""How unevenly SmolLM2's input channels are used, and how strongly asvd and fwsvd weigh them.

    python bench/channel_stats.py [--samples 4]

For every block's four distinct linear inputs (attention in, o_proj in, MLP in, down_proj in): max / median over
channels of mean|x_j| on the calibration windows; ASVD's scale mean|x_j|^0.5, max / min per input; and FWSVD's
per-layer weight spread (max / min of sqrt(Fisher importance)) as recorded by the fwsvd keep-0.9 run of
compress_bench.py. Prints one summary; nothing is written.
"""

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

INPUTS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=4)
    args = parser.parse_args()
    import torch

    from lowrank.io.loading import load_model, resolve_model

    model, tokenizer = load_model(resolve_model(common.prepare()))
    sums = {}

    def hook(name):
        def record(module, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).abs().double()
            sums[name] = sums.get(name, 0) + x.sum(0)
        return record

    for index, layer in enumerate(model.model.layers):
        for rel in INPUTS:
            layer.get_submodule(rel).register_forward_pre_hook(hook((index, rel)))
    with torch.no_grad():
        model(input_ids=common.calibration_windows(tokenizer, args.samples))
    for rel in INPUTS:
        spread = [float(s.max() / s.median()) for (_, r), s in sums.items() if r == rel]
        print(f"{rel} input, max/median of mean|x_j|: median over blocks {statistics.median(spread):.1f}, "
              f"max {max(spread):.1f}")
    asvd = [float((s.max() / s.min()) ** 0.5) for s in sums.values()]
    print(f"asvd scale (alpha 0.5) max/min per input: median {statistics.median(asvd):.1f}, max {max(asvd):.1f}")
    report = os.path.join(common.WORK, "compress", "smollm2-fwsvd-0.9", "compression_report.json")
    if os.path.exists(report):
        with open(report) as f:
            fisher = [layer["info"]["fisher_max_over_min"] for layer in json.load(f)["layers"]["list"]]
        print(f"fwsvd weight max/min per layer: median {statistics.median(fisher):.0f}, max {max(fisher):.0f}")


if __name__ == "__main__":
    main()
