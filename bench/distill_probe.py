"""Whole-model distillation after compression (issue 19, a probe; not in lowrank): does training every factor of
a compressed model toward the original model's next-token distributions, on the calibration windows, lower the
held-out perplexity beyond what block refinement reaches?

    python bench/distill_probe.py CHECKPOINT --steps 32 --lr 2e-5 --evals 8,16,32 --out distill-probe.json

CHECKPOINT is a `lowrank compress` output of SmolLM2 (bench/common.py's model). Each step reads one of the
protocol's 16 calibration windows of 512 tokens (a seeded order, a new pass every 16 steps), runs the compressed
model with gradients on its factors only (embeddings, norms and the tied head stay fixed), and takes one Adam step
on KL(original || compressed) averaged over the window's positions. The original model's log-probabilities are
computed once per window before training (its forward time is recorded apart). The held-out perplexity is the
protocol's (the first 8,192 tokens of bench/work/eval.txt) at the steps in --evals.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--evals", default="0,8,16,32")
    parser.add_argument("--out", default="distill-probe.json")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import lowrank
    from lowrank.evaluation.perplexity import perplexity
    from lowrank.io.modeling_lowrank import LowRankLinear, SlicedLowRankLinear

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(common.MODEL_DIR)
    windows = common.calibration_windows(tokenizer)
    stream, _ = common.eval_stream(tokenizer)
    dense = AutoModelForCausalLM.from_pretrained(common.MODEL_DIR, dtype=torch.float32).eval()
    start = time.perf_counter()
    with torch.no_grad():
        teacher = [torch.log_softmax(dense(input_ids=w[None]).logits[0].float(), -1) for w in windows]
    teacher_s = time.perf_counter() - start
    del dense
    model = lowrank.load_pretrained(args.checkpoint).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    factors = [p for m in model.modules() if isinstance(m, (LowRankLinear, SlicedLowRankLinear))
               for p in m.parameters() if p.dim() == 2]
    for p in factors:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(factors, lr=args.lr)
    evals = {int(s) for s in args.evals.split(",") if s}
    run = {"checkpoint": os.path.relpath(args.checkpoint, common.HERE), "steps": args.steps, "lr": args.lr,
           "trained_params": sum(p.numel() for p in factors), "teacher_forward_s": teacher_s, "perplexity": {},
           "loss": [], "train_s": 0.0}

    def evaluate(step):
        with torch.no_grad():
            run["perplexity"][step] = perplexity(model, stream, common.EVAL_SEQ_LEN, batch_size=4,
                                                 max_tokens=common.EVAL_MAX_TOKENS)["perplexity"]
        print(step, round(run["perplexity"][step], 3), flush=True)

    if 0 in evals:
        evaluate(0)
    generator, order = torch.Generator().manual_seed(0), []
    for step in range(1, args.steps + 1):
        if not order:
            order = torch.randperm(len(windows), generator=generator).tolist()
        index = order.pop(0)
        start = time.perf_counter()
        logp = torch.log_softmax(model(input_ids=windows[index][None]).logits[0].float(), -1)
        target = teacher[index]
        loss = (target.exp() * (target - logp)).sum(-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        run["train_s"] += time.perf_counter() - start
        run["loss"].append(round(loss.item(), 5))
        if step in evals:
            evaluate(step)
    path = os.path.join(common.RESULTS, args.out)
    results = {"runs": {}}
    if os.path.exists(path):
        with open(path) as f:
            results = json.load(f)
    results["machine"] = common.machine()
    results["runs"][f"{os.path.basename(args.checkpoint)} lr={args.lr} steps={args.steps}"] = run
    common.save(args.out, results)


if __name__ == "__main__":
    main()
