"""Small-scale probe of anchored fitting and block refinement: SmolLM2's first blocks, per layer and per block,
on the calibration tokens and on held-out tokens.

    OMP_NUM_THREADS=1 python bench/anchor_probe.py --blocks 4 --out anchor-probe.json

Calibration: the protocol's 16 x 512 windows. Held-out: 8 windows of 512 tokens of the evaluation text *after*
the 8,192 tokens the benchmarks score (so nothing here is tuned on the benchmark's own tokens). The first
`--blocks` blocks are compressed at `--ratio` with uniform ranks (the closed forms are per layer; the Fisher
allocation needs the whole model and is not what is probed here), each variant on its own compressed stream;
the rest of the model stays dense. Measured per variant:

    layer objective   ||W X - W' X'||^2 / ||W X||^2 (X: the original model's inputs of that layer, X': the compressed
                      stream's, both through the original block) on calibration and held-out tokens
    block error       ||B'(x') - B(x)||^2 / ||B(x)||^2 at each compressed block's output
    perplexity        of the held-out windows with the first blocks compressed, the rest dense
"""

import argparse
import copy
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def variants():
    """name -> (anchor ridge or None, refine dict or None)"""
    return {
        "whiten": (None, None),
        "anchor": (0.0, None),
        "anchor-ridge1e-3": (1e-3, None),
        "anchor-ridge1e-2": (1e-2, None),
        "anchor-ridge1e-1": (1e-1, None),
        "anchor-ridge1": (1.0, None),
        # anchored only where the layer reads the block's input (q/k/v, gate/up: the same x' in the compressed block
        # as in the original one); o_proj and down_proj read what compressed layers computed, and stay whitened
        "anchor-inputs": ("inputs", None),
        "refine-lr1e-4": (None, {"lr": 1e-4, "steps": 16, "target": "local"}),
        "refine-lr3e-4": (None, {"lr": 3e-4, "steps": 16, "target": "local"}),
        "refine-lr1e-3": (None, {"lr": 1e-3, "steps": 16, "target": "local"}),
        "refine-orig-lr1e-3": (None, {"lr": 1e-3, "steps": 16, "target": "original"}),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--ratio", type=float, default=0.8)
    parser.add_argument("--only", default=None, help="comma-separated variant names")
    parser.add_argument("--out", default="anchor-probe.json")
    args = parser.parse_args()

    import torch

    torch.manual_seed(0)
    from lowrank.io.loading import load_model, resolve_model

    model, tokenizer = load_model(resolve_model(common.prepare()), dtype="float32")
    model.eval()
    calib = common.calibration_windows(tokenizer)
    stream, _ = common.eval_stream(tokenizer)
    start = common.EVAL_MAX_TOKENS
    held = stream[start:start + 8 * 512].reshape(8, 512)
    probe = Probe(model, calib, held, args.blocks, args.ratio)
    chosen = variants() if not args.only else {k: v for k, v in variants().items() if k in args.only.split(",")}
    results = {"ratio": args.ratio, "blocks": args.blocks, "dense_heldout_ppl": probe.dense_ppl, "variants": {}}
    for name, (ridge, refine) in chosen.items():
        begin = time.perf_counter()
        results["variants"][name] = probe.run(ridge, refine)
        results["variants"][name]["seconds"] = time.perf_counter() - begin
        summary = results["variants"][name]
        print(f"{name}: heldout ppl {summary['heldout_ppl']:.3f} block err calib "
              f"{[round(b['calib'], 4) for b in summary['blocks']]} heldout "
              f"{[round(b['heldout'], 4) for b in summary['blocks']]}", file=sys.stderr)
        common.save(args.out, results)


class Probe:
    def __init__(self, model, calib, held, blocks, ratio):
        import torch

        from lowrank.compression.capture import capture_block_inputs
        from lowrank.compression.sequential import run_block

        self.model, self.held_ids, self.count, self.ratio = model, held, blocks, ratio
        self.layers = model.model.layers
        self.calib, self.calib_extras = capture_block_inputs(model, self.layers, calib, 8, "cpu", run_blocks=True)
        self.held, self.held_extras = capture_block_inputs(model, self.layers, held, 8, "cpu", run_blocks=True)
        # the original streams at every block's input (0..count)
        self.orig_calib, self.orig_held = [self.calib], [self.held]
        for k in range(blocks):
            self.orig_calib.append(run_block(self.layers[k], self.orig_calib[-1], self.calib_extras[k], "cpu"))
            self.orig_held.append(run_block(self.layers[k], self.orig_held[-1], self.held_extras[k], "cpu"))
        with torch.no_grad():
            self.dense_ppl = self.heldout_ppl(self.orig_held[-1])

    def names(self, k):
        return {f"model.layers.{k}.{rel}": rel for rel in LINEARS}

    def heldout_ppl(self, states):
        """Perplexity of the held-out windows: `states` at block `count`'s input, the rest of the model dense."""
        import torch

        from lowrank.compression.sequential import run_block

        for k in range(self.count, len(self.layers)):
            states = run_block(self.layers[k], states, self.held_extras[k], "cpu")
        hidden = torch.cat(states)
        logits = self.model.lm_head(self.model.model.norm(hidden)).float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                self.held_ids[:, 1:].reshape(-1))
        return math.exp(float(nll))

    def run(self, ridge, refine):
        import torch

        from lowrank.compression.config import CompressConfig
        from lowrank.compression.layers import decompose_block
        from lowrank.compression.refine import refine_block
        from lowrank.compression.sequential import collect_paired_statistics, collect_statistics, run_block
        from lowrank.core import decompose

        config = CompressConfig(ratio=self.ratio, alloc="uniform", anchor=ridge is not None)
        plain_target = decompose.anchored_target
        shifted_calib, shifted_held = self.calib, self.held
        blocks, layers = [], {}
        for k in range(self.count):
            original = self.layers[k]
            block = copy.deepcopy(original)
            names = self.names(k)
            if ridge is not None:
                collector, _ = collect_paired_statistics(block, names, self.orig_calib[k], shifted_calib,
                                                         self.calib_extras[k], "cpu", abs_sums=False)
                order = iter(LINEARS)

                def target(w, s, wt):
                    if ridge == "inputs":
                        return w if next(order) in ("self_attn.o_proj", "mlp.down_proj") else plain_target(w, s, wt)
                    return ridge_target(w, s, wt, ridge)

                decompose.anchored_target = target
            else:
                collector, _ = collect_statistics(block, names, shifted_calib, self.calib_extras[k], "cpu", False,
                                                  abs_sums=False)
            try:
                decompose_block(block, names, collector, config)
            finally:
                decompose.anchored_target = plain_target
            del collector
            entry = {}
            if refine is not None:
                if refine["target"] == "original":
                    targets = self.orig_calib[k + 1]
                else:
                    targets = run_block(original, shifted_calib, self.calib_extras[k], "cpu")
                curve = []

                def monitor(step, loss, block=block, curve=curve):
                    if step in (1, 2, 4, 8, 16, 32, 64, 128, 256):
                        curve.append({"step": step, "train_loss": loss,
                                      "heldout": self.block_error(block, shifted_held, self.orig_held[k + 1], k,
                                                                  self.held_extras)})

                curve.append({"step": 0, "heldout": self.block_error(block, shifted_held, self.orig_held[k + 1], k,
                                                                      self.held_extras)})
                begin = time.perf_counter()
                entry["refine"] = refine_block(block, shifted_calib, targets, self.calib_extras[k], refine["steps"],
                                               refine["lr"], "cpu", seed=k, monitor=monitor)
                entry["refine_seconds"] = time.perf_counter() - begin  # held-out checks included
                entry["curve"] = curve
            for split, orig_in, shifted_in in (("calib", self.orig_calib[k], shifted_calib),
                                               ("heldout", self.orig_held[k], shifted_held)):
                extras = self.calib_extras if split == "calib" else self.held_extras
                for name, value in self.layer_objectives(original, block, names, orig_in, shifted_in, extras[k]).items():
                    layers.setdefault(name, {})[split] = value
            shifted_calib = run_block(block, shifted_calib, self.calib_extras[k], "cpu")
            shifted_held = run_block(block, shifted_held, self.held_extras[k], "cpu")
            entry["calib"] = relative(shifted_calib, self.orig_calib[k + 1])
            entry["heldout"] = relative(shifted_held, self.orig_held[k + 1])
            blocks.append(entry)
        with torch.no_grad():
            ppl = self.heldout_ppl(shifted_held)
        return {"blocks": blocks, "layers": layers, "heldout_ppl": ppl}

    def block_error(self, block, states, targets, k, extras):
        from lowrank.compression.sequential import run_block

        return relative(run_block(block, states, extras[k], "cpu"), targets)

    def layer_objectives(self, original, block, names, orig_in, shifted_in, extras):
        """||W X - W' X'||^2 / ||W X||^2 per layer, X and X' through the original block."""
        from lowrank.compression.sequential import collect_paired_statistics
        from lowrank.core import decompose

        collector, _ = collect_paired_statistics(original, names, orig_in, shifted_in, extras, "cpu", abs_sums=False)
        out = {}
        for name, rel in names.items():
            w = original.get_submodule(rel).weight.detach()
            compressed = block.get_submodule(rel)
            approx = compressed.up.weight.detach() @ compressed.down.weight.detach()
            err, ref = decompose.anchored_error(w, approx, collector.stats_of(name), name)
            out[name] = err / ref
        return out


def ridge_target(weight, stats, weighting, ridge):
    """W* = (W C + mu s W)(G' + mu s I)^-1: the anchored regression with a ridge of strength mu (relative to s, the
    mean eigenvalue of the damped G') that pulls it toward W instead of toward 0 (mu = 0: lowrank's anchored
    target W C G'^-1; mu -> inf: W, plain whitening of the shifted inputs)."""
    import torch

    w = weight.to(torch.float64)
    basis, root = weighting._eigen_root()
    shift = ridge * float(root.square().mean())
    return (((w @ stats.cross + shift * w) @ basis) / (root.square() + shift)) @ basis.T


def relative(states, targets):
    num = sum(float((a.double() - b.double()).square().sum()) for a, b in zip(states, targets))
    den = sum(float(b.double().square().sum()) for b in targets)
    return num / den


if __name__ == "__main__":
    main()
