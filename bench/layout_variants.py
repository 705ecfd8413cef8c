"""Which weights should `lowrank.decode_layout` store column-major (its mechanism up to the twenty-first session)? Batch-1 and batch-16 eager decode under four
choices, interleaved in one process.

    python bench/layout_variants.py              # bench/results/layout-variants.json, then its table
    python bench/layout_variants.py --render     # the table only

At one row the column-major layout wins on every wide weight (bench/gemv_layout.py); at 16 rows the factors' up
halves still gain (0.77-0.85x) but a dense 1536 x 576 loses (1.06x), and the dense model laid out decoded batch 16
at 0.89x itself (bench/eager_rounds.py). So: lay out fewer weights? Layouts: "row-major" (none), "factors" (only
the factors' wide halves, the Projection modules), "factors+head" (those and the LM head, the largest single
weight), "all" (the rule lowrank ships: every float32 weight with out > in >= 128). Models: the dense SmolLM2 and
the default keep 0.8 and keep 0.5 checkpoints (bench/serve_bench.py's), float32. Each round runs every model once,
the order turned by one place per round: greedy decode of 64 new tokens after 32-token prompts at batch 1 (ms
per token) and batch 16 (tokens/s), each prompt's prefill timed apart and subtracted. One untimed warm-up round.
Ratios to the row-major dense model are taken within each round; the table gives the median over rounds and, in
brackets, the lowest and highest round.
"""

import itertools
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common
import eager_rounds
import serve_bench

NEW = 64
LAYOUTS = ("row-major", "factors", "factors+head", "all")
MODELS = [("dense", layout) for layout in ("row-major", "all")] + [
    (f"keep {keep}", layout) for keep in (0.8, 0.5) for layout in LAYOUTS]


def column_major(model):
    """The rule `lowrank.decode_layout` applied up to the twenty-first session (the decode kernel replaced it):
    every float32 linear weight with more outputs than inputs and at least 128 inputs stored column-major."""
    from torch import nn

    for module in model.modules():
        weight = module._parameters.get("weight")
        if (isinstance(module, nn.Linear) or type(module).__name__ == "Projection") and weight is not None \
                and weight.dim() == 2 and weight.shape[0] > weight.shape[1] >= 128 and weight.is_contiguous():
            weight.data = weight.data.t().contiguous().t()


def lay_out(model, layout):
    """Apply `layout` to a model loaded row-major (F.linear); returns it."""
    if layout == "row-major":
        return model
    column_major(model)
    if layout in ("factors", "factors+head"):
        # By parameter, not module: a tied LM head shares its weight with the embedding module.
        keep = {id(m.weight) for m in model.modules() if type(m).__name__ == "Projection"}
        if layout == "factors+head":
            keep.add(id(model.get_output_embeddings().weight))
        for weight in model.parameters():
            if id(weight) not in keep and not weight.is_contiguous():
                weight.data = weight.data.contiguous()
    return model


def one_round(runs, turn):
    labels = list(runs)
    figures = {}
    for label in labels[turn % len(labels):] + labels[:turn % len(labels)]:
        run = runs[label]
        one, sixteen = run.prompts(1, serve_bench.PROMPT), run.prompts(16, serve_bench.PROMPT)
        b1 = (eager_rounds.seconds(run, one, NEW + 1) - eager_rounds.seconds(run, one, 1)) / NEW * 1000
        first = eager_rounds.seconds(run, sixteen, 1)
        b16 = 16 * NEW / (eager_rounds.seconds(run, sixteen, NEW + 1) - first)
        figures[label] = {"b1_ms_per_token": b1, "b16_tokens_per_s": b16}
    return figures


def markdown(results):
    rounds = results["rounds"]
    dense = "dense, row-major"
    lines = ["| model, layout | batch 1: ms/token (speed-up) | batch 16: tok/s (speed-up) |", "|---|---|---|"]
    for label in (f"{checkpoint}, {layout}" for checkpoint, layout in MODELS):
        b1 = [r[dense]["b1_ms_per_token"] / r[label]["b1_ms_per_token"] for r in rounds]
        b16 = [r[label]["b16_tokens_per_s"] / r[dense]["b16_tokens_per_s"] for r in rounds]
        cells = [f"{statistics.median(r[label][key] for r in rounds):.{digits}f} "
                 f"({statistics.median(x):.2f}x, {min(x):.2f}-{max(x):.2f})"
                 for key, digits, x in (("b1_ms_per_token", 2, b1), ("b16_tokens_per_s", 1, b16))]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = common.bench_parser(__doc__, "layout-variants.json", "")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    if common.rendered(args, markdown):
        return
    common.prepare()
    paths = serve_bench.checkpoints(sorted({checkpoint for checkpoint, _ in MODELS}))
    runs = {}
    for checkpoint, layout in MODELS:
        run = serve_bench.EagerRun(paths[checkpoint], "float32", "row-major")
        lay_out(run.model, layout)
        runs[f"{checkpoint}, {layout}"] = run
    turns = itertools.count()
    print(markdown(eager_rounds.interleaved(__doc__, args.out, runs, lambda r: one_round(r, next(turns)),
                                            args.rounds)))


if __name__ == "__main__":
    main()
