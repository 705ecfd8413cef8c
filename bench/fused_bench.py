"""Fused projections, whole or per output slice: SmolLM2-135M in the Phi-3 layout against the Llama layout (issue 16,
item 2).

    OMP_NUM_THREADS=1 python bench/fused_bench.py --ratios 0.8,0.6
    python bench/fused_bench.py --render          # the markdown table from bench/results/fused.json

Phi-3's decoder is Llama's with q/k/v fused into one `qkv_proj` (rows q, then k, then v) and gate/up into one
`gate_up_proj` (gate, then up). SmolLM2 rewritten in the Phi-3 layout (the same weights concatenated, the same
sizes, RoPE, norm and tied head; the logits are checked equal to the Llama model's before anything is measured)
is therefore a realistic model with fused projections. Three runs per keep ratio, same weights, same calibration
windows, same defaults (whiten, --alloc auto, propagation), same targeted parameter count, hence the same
parameter budget (the targeted parameters after compression are recorded for each):
  phi3         the Phi-3 layout with `--fused whole`: each fused matrix factorized whole, one rank (the only
               behaviour before per-slice factorization existed; the runs recorded then had no --fused option)
  phi3-slices  the Phi-3 layout with the defaults, i.e. per slice under the Fisher allocation: SlicedLowRankLinear
               (under --alloc uniform, `--fused slices` is passed, since auto keeps the matrix whole there)
  llama        the Llama layout: each slice a separate layer, what per-slice factorization should reproduce.
Llama-layout float32 runs already in bench/results/dtype.json (bench/dtype_bench.py, identical command apart
from -o) are reused instead of re-run.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

PHI3_DIR = os.path.join(common.WORK, "smollm2-135m-phi3")

CONVERT = r"""
import json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Phi3Config, Phi3ForCausalLM
from lowrank.io.publish import staged

torch.manual_seed(0)
llama = AutoModelForCausalLM.from_pretrained({src!r}, dtype=torch.float32).eval()
c = llama.config
config = Phi3Config(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                    num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                    num_key_value_heads=c.num_key_value_heads, hidden_act=c.hidden_act,
                    max_position_embeddings=c.max_position_embeddings,
                    original_max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
                    rope_parameters=dict(c.rope_parameters), tie_word_embeddings=c.tie_word_embeddings,
                    pad_token_id=c.pad_token_id, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
                    sliding_window=None, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)
phi3 = Phi3ForCausalLM(config).eval()
source = llama.state_dict()
state = {{}}
for name, tensor in source.items():
    if ".self_attn.q_proj." in name:
        stem = name.replace(".q_proj.", ".{{}}.")
        state[name.replace(".q_proj.", ".qkv_proj.")] = torch.cat([source[stem.format(p)] for p in
                                                                 ("q_proj", "k_proj", "v_proj")])
    elif ".mlp.gate_proj." in name:
        stem = name.replace(".gate_proj.", ".{{}}.")
        state[name.replace(".gate_proj.", ".gate_up_proj.")] = torch.cat([source[stem.format(p)] for p in
                                                                        ("gate_proj", "up_proj")])
    elif not any(p in name for p in (".k_proj.", ".v_proj.", ".up_proj.")):
        state[name] = tensor
missing, unexpected = phi3.load_state_dict(state, strict=False)
assert not unexpected and set(missing) <= {{"lm_head.weight"}}, (missing, unexpected)
phi3.tie_weights()
ids = torch.randint(0, c.vocab_size, (2, 256))
with torch.no_grad():
    a, b = llama(input_ids=ids).logits, phi3(input_ids=ids).logits
error = (a - b).abs().max().item()
assert error < 1e-3, error
with staged({dst!r}) as staging:
    phi3.save_pretrained(staging)
    AutoTokenizer.from_pretrained({src!r}).save_pretrained(staging)
print(json.dumps({{"max_logit_error": error, "logit_scale": a.abs().max().item(),
                  "params": sum(p.numel() for p in phi3.parameters()),
                  "llama_params": sum(p.numel() for p in llama.parameters())}}))
"""


def convert():
    """bench/work/smollm2-135m-phi3 (once): the float32 SmolLM2 in the Phi-3 layout; returns the logit check."""
    marker = os.path.join(PHI3_DIR, "conversion.json")
    if os.path.exists(marker):
        return json.load(open(marker))
    if os.path.exists(PHI3_DIR):
        raise SystemExit(f"{PHI3_DIR} exists without conversion.json: remove it and run again")
    check = common.run_python(CONVERT.format(src=common.MODEL_DIR, dst=PHI3_DIR))
    with open(marker, "w") as f:
        json.dump(check, f)
    return check


def compress(model_dir, layout, ratio, alloc):
    out = os.path.join(common.WORK, "fused", f"smollm2-{layout}-{ratio}" + ("" if alloc == "auto" else f"-{alloc}"))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    args = ["compress", model_dir, "--ratio", str(ratio), "-o", out, "--overwrite", *common.calib_args()]
    args += [] if alloc == "auto" else ["--alloc", alloc]
    if layout == "phi3":
        args += ["--fused", "whole"]
    elif layout == "phi3-slices" and alloc == "uniform":
        args += ["--fused", "slices"]
    return out, *common.run_lowrank(args)


def reused_llama_run(ratio, alloc):
    """The Llama-layout float32 run of bench/dtype_bench.py at `ratio`, when it was made (the same command)."""
    path = os.path.join(common.RESULTS, "dtype.json")
    if not os.path.exists(path):
        return None
    for run in json.load(open(path))["runs"]:
        if run["dtype"] == "float32" and run["ratio"] == ratio and run.get("alloc", "auto") == alloc:
            return run
    return None


def run_entry(layout, ratio, command, report, wall, evaluation):
    layers = report["layers"]["list"]
    ranks, dense = {}, {}
    # a fused layer factorized per slice: each slice is a kind of its own ("qkv_proj:k"), also where every slice
    # stayed dense (reports written before such layers listed their slices are read through report["fused"])
    sliced = {entry["layer"].rsplit(".", 1)[-1]: [s["name"] for s in entry["slices"]]
              for entry in report.get("fused") or [] if entry["factorized"].startswith("per slice")}
    for layer in layers:  # mean rank over the factorized matrices of each kind; those kept dense are counted
        kind = layer["name"].rsplit(".", 1)[-1]
        parts = [(f"{kind}:{p['name']}", p["rank"]) for p in layer.get("info", {}).get("slices", [])]
        if not parts and layer["rank"] is None and kind in sliced:
            parts = [(f"{kind}:{name}", None) for name in sliced[kind]]
        for kind, rank in parts or [(kind, layer["rank"])]:
            if rank is None:
                dense[kind] = dense.get(kind, 0) + 1
            else:
                ranks.setdefault(kind, []).append(rank)
    return {"layout": layout, "ratio": ratio, "command": command, "perplexity": evaluation["perplexity"],
            "tokens_scored": evaluation["tokens_scored"], "compress_wall_s": wall, "timings_s": report["timings_s"],
            "compress_peak_rss_bytes": report["peak_rss_bytes"],
            "target_params_before": report["ratio"]["targets"]["params_before"],
            "target_params_after": report["ratio"]["targets"]["params_after"],
            "mean_rank": {kind: sum(rs) / len(rs) for kind, rs in ranks.items()}, "kept_dense": dense,
            "fused": report.get("fused"), "verify": report.get("verify")}


def main():
    parser = common.bench_parser(__doc__, "fused.json", "0.8,0.6")
    parser.add_argument("--alloc", default="auto", help="auto (the default) or uniform (one keep ratio for every "
                        "matrix: a fused one keeps `ratio` of its parameters, each slice of the Llama layout too)")
    args = parser.parse_args()
    if common.rendered(args, markdown):
        return
    common.prepare()
    results = {"protocol": protocol(), "machine": common.machine(), "conversion": convert(), "runs": []}
    earlier = common.earlier_results(args, results["protocol"])
    if earlier:
        results.update(runs=earlier["runs"])
    done = {(run["layout"], run["ratio"], run.get("alloc", "auto")) for run in results["runs"]}
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for layout, model_dir in (("phi3", PHI3_DIR), ("phi3-slices", PHI3_DIR), ("llama", common.MODEL_DIR)):
            if (layout, ratio, args.alloc) in done:
                continue
            reused = reused_llama_run(ratio, args.alloc) if layout == "llama" else None
            if reused:
                suffix = "" if args.alloc == "auto" else f"-{args.alloc}"
                report = json.load(open(os.path.join(common.WORK, "dtype", f"smollm2-float32-{ratio}{suffix}",
                                                     "compression_report.json")))
                entry = run_entry(layout, ratio, reused["command"], report, reused["compress_wall_s"], reused)
                entry["from"] = "dtype.json (bench/dtype_bench.py, the same command)"
            else:
                print(f"{layout} keep {ratio} ...", file=sys.stderr)
                out, report, wall, command = compress(model_dir, layout, ratio, args.alloc)
                entry = run_entry(layout, ratio, command, report, wall, common.measure(out)["eval"])
            entry["alloc"] = args.alloc
            results["runs"].append(entry)
            common.save(args.out, results)
    print(markdown(results))


def protocol():
    return {"model": "SmolLM2-135M-Instruct float32 (bench/common.py), and the same weights in the Phi-3 layout",
            "compress": "lowrank compress defaults (whiten, --alloc auto, propagation, verify)",
            "calibration": f"{common.CALIB_SAMPLES} windows x {common.CALIB_SEQ_LEN} tokens, seed 0",
            "evaluation": f"the first {common.EVAL_MAX_TOKENS} held-out tokens, {common.EVAL_SEQ_LEN}-token windows"}


def markdown(results):
    conversion = results["conversion"]
    lines = [f"Phi-3 layout check: max |logit difference| against the Llama layout {conversion['max_logit_error']:.1e} "
             f"(2 x 256 random tokens, logits up to {conversion['logit_scale']:.1f}); "
             f"{conversion['params']:,} parameters in both.", "",
             "| keep | --alloc | fused layers | perplexity | targeted params after | mean rank qkv / q,k,v | "
             "mean rank gate_up / gate,up | compress wall |", "|---|---|---|---|---|---|---|---|"]
    for run in sorted(results["runs"], key=lambda r: (-r["ratio"], r.get("alloc", "auto"), r["layout"])):
        def rank(kind):  # mean rank of the factorized ones, and how many of the 30 stayed dense
            dense = run.get("kept_dense", {}).get(kind, 0)
            mean = run["mean_rank"].get(kind)
            return (f"{mean:.0f}" if mean is not None else "-") + (f" ({dense} dense)" if dense else "")

        if run["layout"] == "phi3":
            how, attn, mlp = "whole (one rank)", rank("qkv_proj"), rank("gate_up_proj")
        elif run["layout"] == "phi3-slices":
            how = "per slice (Phi-3 layout, SlicedLowRankLinear)"
            attn = " / ".join(rank(f"qkv_proj:{k}") for k in ("q", "k", "v"))
            mlp = " / ".join(rank(f"gate_up_proj:{k}") for k in ("gate", "up"))
        else:
            how = "per slice (Llama layout: separate layers)"
            attn = " / ".join(rank(k) for k in ("q_proj", "k_proj", "v_proj"))
            mlp = " / ".join(rank(k) for k in ("gate_proj", "up_proj"))
        lines.append(f"| {run['ratio']} | {run.get('alloc', 'auto')} | {how} | {run['perplexity']:.2f} | {run['target_params_after']:,} | "
                     f"{attn} | {mlp} | {run['compress_wall_s']:.0f} s |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
