"""Per-expert whitening vs `--experts shared-basis` at equal parameters, on an upcycled SmolLM2 (issue 17 item 4).

    python bench/moe_standin.py --ratios 0.8,0.6 --deltas 0.15,0.4 --modes per-expert,shared-basis,shared-gate-up

No mixture-of-experts model is available offline, so the stand-in is SmolLM2-135M (bench/work/smollm2-135m, fp32)
upcycled into a Mixtral-layout model: its attention, embeddings and norms as they are, and in every layer E = 4
experts, top-2, each a copy of the layer's MLP plus a seeded random low-rank perturbation (rank 64, Frobenius norm
DELTA x the matrix's, separately for gate, up and down): the low-rank shape of a fine-tuning update, at two
strengths. The router of each layer is +-(its top two principal directions) of the MLP inputs on 4 calibration
windows, scaled to logit standard deviation 2: routing follows the dominant features of the hidden states and is
far from uniform (the shares are in the results), as a trained router's is.

Every compression is `lowrank compress` (whiten, --alloc uniform, the benchmarks' 16 x 512 calibration tokens)
of the expert matrices only (--targets '*experts*': attention stays dense, so the comparison is the experts
alone); the two modes then hold the same parameters up to rank rounding (both numbers are in the table).
shared-gate-up is an ablation (down_proj per expert), run through the Python API. Perplexity: bench/common.py's
protocol on the held-out text, in a fresh process. Results: bench/results/moe-standin.json.

What it can show: whether one basis per layer beats per-expert factors at equal parameters when experts are
related copies, with the real data path (routing, per-expert statistics, the loader). What it cannot: experts
that were trained apart (real MoE experts share far less than copies do; near-copies favour sharing), routers
that were trained, or E = 64-128 experts, where the basis is amortised over many more experts.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

EXPERTS, TOP_K, PERTURB_RANK = 4, 2, 64

ABLATION = r"""
import json, sys, time
sys.path.insert(0, {bench!r})
import common
import lowrank
from lowrank.compression import shared_basis
shared_basis.SIDES = {{"gate_up_proj": "in"}}  # the ablation: down_proj per expert
start = time.perf_counter()
report = lowrank.compress({source!r}, {out!r}, ratio={ratio}, method="whiten", alloc="uniform", targets=["*experts*"],
                          calib=common.CALIB_FILE, num_samples=common.CALIB_SAMPLES, seq_len=common.CALIB_SEQ_LEN,
                          experts="shared-basis", overwrite=True)
print(json.dumps({{"report": report, "wall": time.perf_counter() - start}}))
"""


def upcycle(delta, seed, out):
    """Write the stand-in Mixtral checkpoint for perturbation strength `delta` to `out` (once)."""
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralConfig, MixtralForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(common.MODEL_DIR, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(common.MODEL_DIR)
    c = dense.config
    config = MixtralConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                           num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                           num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, hidden_act=c.hidden_act,
                           max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
                           rope_parameters=dict(c.rope_parameters), tie_word_embeddings=True, sliding_window=None,
                           num_local_experts=EXPERTS, num_experts_per_tok=TOP_K, bos_token_id=c.bos_token_id,
                           eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id)
    model = MixtralForCausalLM(config).eval()
    state = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    missing, _ = model.load_state_dict(state, strict=False)
    routers = router_weights(dense, tokenizer)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, layer in enumerate(dense.model.layers):
            moe = model.model.layers[i].mlp
            moe.gate.weight.copy_(routers[i])
            gate, up, down = (getattr(layer.mlp, n).weight for n in ("gate_proj", "up_proj", "down_proj"))
            for e in range(EXPERTS):
                g, u, d = (perturbed(w, delta, generator) for w in (gate, up, down))
                moe.experts.gate_up_proj[e].copy_(torch.cat([g, u]))
                moe.experts.down_proj[e].copy_(d)
    assert all(".mlp." in name for name in missing), missing
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def perturbed(weight, delta, generator):
    """W + a random rank-PERTURB_RANK matrix of Frobenius norm delta ||W||: a fine-tuning-like update."""
    import torch

    m, n = weight.shape
    update = torch.randn(m, PERTURB_RANK, generator=generator) @ torch.randn(PERTURB_RANK, n, generator=generator)
    return weight + update * (delta * weight.norm() / update.norm())


def router_weights(dense, tokenizer):
    """Per layer [E, H]: +-the top two principal directions of the MLP's inputs on 4 calibration windows, scaled to
    logit standard deviation 2."""
    import torch

    inputs = {}
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: inputs.setdefault(i, []).append(a[0].flatten(0, 1)))
             for i, layer in enumerate(dense.model.layers)]
    with torch.no_grad():
        dense(input_ids=common.calibration_windows(tokenizer, 4))
    for hook in hooks:
        hook.remove()
    routers = []
    for i in range(len(dense.model.layers)):
        x = torch.cat(inputs[i]).double()
        x = x - x.mean(0)
        _, _, vh = torch.linalg.svd(x, full_matrices=False)
        directions = torch.stack([vh[0], -vh[0], vh[1], -vh[1]])
        logits = torch.cat(inputs[i]).double() @ directions.T
        routers.append((directions * (2.0 / logits.std())).float())
    return routers


def routing_shares(path):
    """The fraction of (token, slot) routes each expert gets in layers 0, 14 and 29 on the calibration windows."""
    code = f"""
import json, sys, torch
sys.path.insert(0, {common.HERE!r})
import common
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({path!r}, dtype=torch.float32).eval()
ids = common.calibration_windows(AutoTokenizer.from_pretrained({path!r}), 4)
counts = {{}}
def hook(i):
    def count(module, args, output):
        counts[i] = torch.bincount(output[2].flatten(), minlength={EXPERTS}).tolist()
    return count
for i in (0, 14, 29):
    model.model.layers[i].mlp.gate.register_forward_hook(hook(i))
with torch.no_grad():
    model(input_ids=ids)
print(json.dumps({{i: [round(c / sum(v), 3) for c in v] for i, v in counts.items()}}))
"""
    return common.run_python(code)


def compress(source, out, ratio, mode):
    if mode == "shared-gate-up":
        result = common.run_python(ABLATION.format(bench=common.HERE, source=source, out=out, ratio=ratio))
        command = f"python -c <bench/moe_standin.py ABLATION> (lowrank.compress ... experts='shared-basis', " \
                  f"shared_basis.SIDES={{'gate_up_proj': 'in'}}, ratio={ratio})"
        return result["report"], result["wall"], command
    args = ["compress", source, "--ratio", str(ratio), "--method", "whiten", "--alloc", "uniform", "--targets",
            "*experts*", "--experts", mode, "--refine-steps", "0", "--no-verify", "-o", out, "--overwrite", *common.calib_args()]
    return common.run_lowrank(args)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", default="0.8,0.6")
    parser.add_argument("--deltas", default="0.15,0.4")
    parser.add_argument("--modes", default="per-expert,shared-basis,shared-gate-up")
    parser.add_argument("--work", default=os.path.join(common.WORK, "moe-standin"))
    parser.add_argument("--out", default="moe-standin.json")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in --out")
    args = parser.parse_args()
    common.prepare()
    path = os.path.join(common.RESULTS, args.out)
    results = json.load(open(path)) if args.resume and os.path.exists(path) else {"runs": [], "standins": {}}
    results.update(machine=common.machine(), protocol=protocol())
    for delta in [float(d) for d in args.deltas.split(",")]:
        source = upcycle(delta, seed=0, out=os.path.join(args.work, f"smollm2-moe4-delta{delta}"))
        if str(delta) not in results["standins"]:
            results["standins"][str(delta)] = {"dense": common.measure(source)["eval"],
                                               "routing_shares": routing_shares(source)}
            common.save(args.out, results)
        for ratio in [float(r) for r in args.ratios.split(",")]:
            for mode in args.modes.split(","):
                if any(r["delta"] == delta and r["ratio"] == ratio and r["mode"] == mode for r in results["runs"]):
                    continue
                out = os.path.join(args.work, "out", f"delta{delta}-{mode}-{ratio}")
                os.makedirs(os.path.dirname(out), exist_ok=True)
                report, wall, command = compress(source, out, ratio, mode)
                evaluation = common.measure(out)
                results["runs"].append(entry(delta, ratio, mode, report, wall, command, evaluation,
                                             results["standins"][str(delta)]["dense"]))
                common.save(args.out, results)
                print(json.dumps(results["runs"][-1]), flush=True)
    print(markdown(results))


def entry(delta, ratio, mode, report, wall, command, evaluation, dense):
    targets = report["ratio"]["targets"]
    return {"delta": delta, "ratio": ratio, "mode": mode, "perplexity": evaluation["eval"]["perplexity"],
            "ppl_vs_dense": evaluation["eval"]["perplexity"] / dense["perplexity"],
            "expert_params_before": targets["params_before"], "expert_params_after": targets["params_after"],
            "params_after": report["ratio"]["model"]["params_after"], "wall_s": round(wall, 1),
            "load_avg": os.getloadavg(), "command": command, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def protocol():
    return {"model": "SmolLM2-135M upcycled: Mixtral layout, E=4, top-2, experts = MLP + rank-64 perturbation of "
                     "norm delta x ||W||, PCA router", "calibration": f"{common.CALIB_SAMPLES} x {common.CALIB_SEQ_LEN}",
            "eval": f"{common.EVAL_MAX_TOKENS} tokens, windows of {common.EVAL_SEQ_LEN}", "targets": "*experts*",
            "method": "whiten, --alloc uniform"}


def markdown(results):
    lines = ["| delta | keep | mode | expert params after | perplexity | vs stand-in dense |", "|---|---|---|---|---|---|"]
    for run in results["runs"]:
        lines.append(f"| {run['delta']} | {run['ratio']} | {run['mode']} | {run['expert_params_after']:,} | "
                     f"{run['perplexity']:.2f} | {run['ppl_vs_dense']:.3f} |")
    dense = ", ".join(f"delta {d}: {s['dense']['perplexity']:.2f}" for d, s in results["standins"].items())
    return "\n".join(lines) + f"\n\nStand-in dense perplexity: {dense}"


if __name__ == "__main__":
    main()
