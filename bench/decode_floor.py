"""Where batch-1 decode in transformers stops: the ceiling of a factorized model's speed-up, from a profile.

    python bench/decode_floor.py                      # the default keep 0.5 checkpoint (bench/serve_bench.py's)
    python bench/decode_floor.py --compile            # also transformers' torch.compile path (static cache)
    python bench/decode_floor.py --checkpoint PATH    # any factorized checkpoint of SmolLM2

Issue 18 asks transformers decode at keep 0.5 to be 1.5x dense. This measures what bounds it. One decode step
(batch 1, greedy, after a 32-token prompt) of the dense model and of the factorized one, float32, split by
torch.profiler into three parts: the LM head's GEMV (tied to the embeddings, never factorized), the block linear
layers' GEMVs (all aten::mm but the head's), and everything else (norms, rotary, attention, cache, sampling: the
same ops in both models, though not quite the same time: 13.2 and 14.9 ms at keep 0.5). A GEMV at batch 1
streams its weight from memory once, so the block part can at best shrink by the checkpoint's ratio of block
linear bytes; the other two parts do not shrink at all. The ceiling
printed is the dense step over (head + dense block GEMVs x that bytes ratio + dense other work): the speed-up of a
factorized model whose every GEMV ran at the dense GEMVs' bandwidth and whose extra calls cost nothing.

Also timed, without the profiler, interleaved (dense, factorized, dense, ...; median of --trials): generate()'s
ms per new token (128 new tokens minus a one-token run) and a bare forward loop's. With --compile, the same
generate() with cache_implementation="static" and a CompileConfig that transformers honours on CPU (it compiles
on accelerators only by default): the first call of each length compiles (about 45 s here) and is not timed.
Four models: the dense one as transformers loads it ("dense") and with `lowrank.decode_layout` ("dense_laid"), the
factorized one row-major (`load_pretrained(..., decode_layout=False)`, "factorized_rowmajor") and as
`load_pretrained` loads it by default ("factorized": wide weights column-major up to the twenty-first session,
the decode kernel since, BENCHMARKS.md "Decode kernel"). The ceiling is computed for each
layout from its own dense split. Results: bench/results/decode-floor.json.
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common

PROMPT, NEW, PROFILED_STEPS = 32, 128, 32


def block_linear_bytes(model):
    """Bytes of every weight the blocks' linear layers read per token (the LM head and embeddings excluded)."""
    head = model.get_output_embeddings().weight
    embed = model.get_input_embeddings().weight
    skip = {head.data_ptr(), embed.data_ptr()}
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.dim() == 2 and p.data_ptr() not in skip)


def prompt_ids(vocab):
    import torch

    return torch.randint(0, vocab, (1, PROMPT), generator=torch.Generator().manual_seed(0))


def generate_ms(model, ids, compile_config=None):
    """ms per new token of greedy generate(): NEW + 1 tokens minus one token (the prompt's prefill)."""
    import torch

    extra = {"cache_implementation": "static", "compile_config": compile_config} if compile_config else {}

    def run(new):
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=0, **extra)
        return time.perf_counter() - start

    return (run(NEW + 1) - run(1)) / NEW * 1000


def forward_steps(model, ids, steps, around=None):
    """Run `steps` bare decode forwards after the prompt (inside `around`, if given); returns ms per step."""
    import contextlib

    import torch

    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)  # transformers 5.25 names it cache
        start = time.perf_counter()
        with around or contextlib.nullcontext():
            for _ in range(steps):
                out = model(token, cache=cache, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
    return (time.perf_counter() - start) / steps * 1000


def profile_step(model, ids):
    """ms per decode step in the head's GEMV, the other GEMVs and everything else, under torch.profiler."""
    from torch.profiler import profile

    vocab = model.get_output_embeddings().weight.shape[0]
    prof = profile(record_shapes=True)
    forward_steps(model, ids, PROFILED_STEPS, around=prof)  # the prompt's forward runs before the profile starts
    parts = {"head_gemv": 0.0, "block_gemv": 0.0, "other": 0.0}
    for event in prof.key_averages(group_by_input_shape=True):
        if event.key != "aten::mm":
            part = "other"
        else:
            part = "head_gemv" if event.input_shapes[1][-1] == vocab else "block_gemv"
        parts[part] += event.self_cpu_time_total / 1000
    return {part: round(ms / PROFILED_STEPS, 2) for part, ms in parts.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a factorized SmolLM2 checkpoint (default: serve_bench's keep 0.5)")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    common.prepare()
    import serve_bench  # its checkpoints and its loader (lowrank.load_pretrained for a factorized one)

    if args.checkpoint is None:
        args.checkpoint = serve_bench.checkpoints(["keep 0.5"])["keep 0.5"]
    models = {name: serve_bench.EagerRun(path, "float32", layout).model
              for name, path, layout in (("dense", common.MODEL_DIR, "default"),
                                         ("dense_laid", common.MODEL_DIR, "decode"),
                                         ("factorized_rowmajor", args.checkpoint, "row-major"),
                                         ("factorized", args.checkpoint, "default"))}
    ids = prompt_ids(models["dense"].config.vocab_size)
    compile_config = None
    if args.compile:
        from transformers import CompileConfig

        compile_config = CompileConfig()
        compile_config._compile_all_devices = True  # transformers' own switch for compiling generate() on CPU
    kinds = {"generate": lambda m: generate_ms(m, ids), "forward": lambda m: forward_steps(m, ids, NEW)}
    if compile_config is not None:
        kinds["generate_compiled"] = lambda m: generate_ms(m, ids, compile_config)
    for model in models.values():  # warm-ups (and compilation), untimed
        for measure in kinds.values():
            measure(model)
    times = {name: {kind: [] for kind in kinds} for name in models}
    splits = {name: [] for name in models}
    for _ in range(args.trials):
        for kind, measure in kinds.items():
            for name, model in models.items():
                times[name][kind].append(round(measure(model), 2))
        for name, model in models.items():
            splits[name].append(profile_step(model, ids))
    split = {name: {part: statistics.median(one[part] for one in runs) for part in runs[0]}
             for name, runs in splits.items()}
    bytes_ratio = block_linear_bytes(models["factorized"]) / block_linear_bytes(models["dense"])
    result = {
        "machine": common.machine(), "checkpoint": args.checkpoint, "load_average": os.getloadavg(),
        "protocol": f"float32, batch 1, greedy, {PROMPT}-token prompt, {NEW} new tokens, median of {args.trials}",
        "ms_per_token": {name: {kind: statistics.median(v) for kind, v in t.items()} for name, t in times.items()},
        "trials": times, "profiled_trials": splits, "profiled_ms_per_step": split,
        "block_linear_bytes_ratio": round(bytes_ratio, 4),
    }
    for layout, (dense_name, name) in {"row_major": ("dense", "factorized_rowmajor"),
                                       "decode_layout": ("dense_laid", "factorized")}.items():
        dense = split[dense_name]
        floor = dense["head_gemv"] + dense["block_gemv"] * bytes_ratio + dense["other"]
        result[layout] = {
            "profiled_floor_ms": round(floor, 2),
            "ceiling_speedup": round(sum(dense.values()) / floor, 3),
            "profiled_speedup": round(sum(dense.values()) / sum(split[name].values()), 3),
            "block_gemv_vs_bytes": round(split[name]["block_gemv"] / (dense["block_gemv"] * bytes_ratio), 3),
        }
        for kind in kinds:
            result[layout][f"speedup_{kind}"] = round(result["ms_per_token"][dense_name][kind]
                                                      / result["ms_per_token"][name][kind], 3)
    for kind in kinds:  # what a user sees: lowrank's default load against transformers' dense model
        result[f"speedup_{kind}"] = round(result["ms_per_token"]["dense"][kind]
                                          / result["ms_per_token"]["factorized"][kind], 3)
    print(json.dumps({k: v for k, v in result.items() if k not in ("trials", "profiled_trials")}, indent=2))
    common.save("decode-floor.json", result)


if __name__ == "__main__":
    main()
