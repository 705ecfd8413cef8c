"""`lowrank squeeze ADAPTER (--rank K | --energy E | --budget B | --analyze) [-o OUT]`."""

import time
from typing import Annotated

import typer
from typer.core import TyperCommand

from lowrank.squeezing.config import DEFAULTS as D
from lowrank.squeezing.config import SqueezeConfig

from .app import app

RULE, ALG, SCALE, OUT, DANGER = "Rank rule", "Algorithm", "Scaling and DoRA", "Output", "Dangerous"

# The options, one alias each: the command's signature below then reads as a table of names and defaults, and
# every default comes from SqueezeConfig (lowrank/squeezing/config.py), where it is written once.
Adapter = Annotated[str | None, typer.Argument(help="PEFT adapter directory (adapter_config.json + "
                    "adapter_model.safetensors/.bin, or one sub-folder holding them), or a kohya / diffusers LoRA "
                    ".safetensors file. Required, except with --base-model and --finetuned.", show_default=False,
                    metavar="ADAPTER")]
Rank = Annotated[int | None, typer.Option("--rank", "-r", help="Uniform target rank K for every module (the "
                 "paper's setting).", rich_help_panel=RULE, show_default=False)]
Energy = Annotated[float | None, typer.Option(help="Per module, the smallest rank keeping this fraction of "
                   "sum(sigma^2) of its update s·B·A (energy; not kohya's Frobenius ratio sv_fro, which is "
                   "sqrt(energy)).", rich_help_panel=RULE, show_default=False)]
Budget = Annotated[str | None, typer.Option(help="Global parameter budget: a fraction of the adapter's LoRA "
                   "parameters (0.25) or a count (2M), allocated across modules by energy gained per parameter.",
                   rich_help_panel=RULE, show_default=False)]
Analyze = Annotated[bool, typer.Option("--analyze", help="Print the spectra (energy kept per rank, mean/min/p10 "
                    "over modules) and, with a rule, the plan; write nothing.", rich_help_panel=RULE)]
MaxRank = Annotated[int | None, typer.Option(help="Cap on any module's rank (--energy, --budget; required for "
                    "extraction without --rank).", rich_help_panel=RULE, show_default=False)]
MinRank = Annotated[int, typer.Option(help="Floor on any module's rank (--energy, --budget).", rich_help_panel=RULE)]
MinEnergy = Annotated[float | None, typer.Option(help="--budget: every module first gets the rank that keeps this "
                      "energy, so that none starves.", rich_help_panel=RULE, show_default=False)]
AllowPad = Annotated[bool, typer.Option(help="Allow --rank above a module's source rank (zero padding).",
                     rich_help_panel=RULE)]
Algorithm = Annotated[str | None, typer.Option(help="exact: SVD of the r x r core from QRs of B and A^T (never "
                      "forms B·A); rsvd: randomized SVD (the paper's; default for --finetuned extraction).",
                      rich_help_panel=ALG, show_default="exact; rsvd when extracting")]
Oversample = Annotated[int, typer.Option(help="rsvd: extra sketch columns.", rich_help_panel=ALG)]
PowerIters = Annotated[int, typer.Option(help="rsvd: power iterations (QR re-orthonormalised).",
                       rich_help_panel=ALG)]
Seed = Annotated[int, typer.Option(help="rsvd: seed (the same seed gives the same bytes).", rich_help_panel=ALG)]
Threads = Annotated[int | None, typer.Option(help="Modules decomposed at once, each on one torch thread "
                    "(extraction: torch threads).", rich_help_panel=ALG, show_default="the CPU count, at most 8")]
AlphaPolicy = Annotated[str | None, typer.Option(help="keep-scale: every module keeps the adapter's scale alpha/r "
                        "(alpha/sqrt(r) with rsLoRA), uniform so vLLM scales it right; unit: alpha = r, scale 1; "
                        "keep-alpha: alpha unchanged, scale alpha/k.", rich_help_panel=SCALE,
                        show_default="keep-scale; unit when extracting")]
BaseModel = Annotated[str | None, typer.Option(help="The base model (checkpoint directory or pkg:NAME): for a DoRA "
                      "adapter, measures the true error of the DoRA weights; with --finetuned, the base of the "
                      "extraction.", rich_help_panel=SCALE, show_default=False)]
Finetuned = Annotated[str | None, typer.Option(help="Extract a LoRA from the dense difference FINETUNED - "
                      "BASE_MODEL instead of squeezing an adapter (streams one tensor pair at a time).",
                      rich_help_panel=SCALE, show_default=False)]
Output = Annotated[str | None, typer.Option("--output", "-o", help="Output directory (PEFT) or .safetensors file "
                   "(kohya / diffusers) (default: the input's name + -r8, -e0.95 or -b0.25).", rich_help_panel=OUT,
                   show_default=False)]
Dtype = Annotated[str, typer.Option(help="Dtype of the new factors: auto (as the input's), float32, bfloat16 or "
                  "float16.", rich_help_panel=OUT)]
Overwrite = Annotated[bool, typer.Option(help="Replace an existing output.", rich_help_panel=OUT)]
Json = Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.", rich_help_panel=OUT)]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or summary.", rich_help_panel=OUT)]
Verbose = Annotated[int, typer.Option("--verbose", "-v", count=True, help="More detail: every module (-vv: library "
                    "logs).", rich_help_panel=OUT)]
Debug = Annotated[bool, typer.Option(help="Show tracebacks.", rich_help_panel=OUT)]
TrustRemoteCode = Annotated[bool, typer.Option(help="Allow a model's own Python code to run (--base-model, "
                            "--finetuned).", rich_help_panel=DANGER)]


class _Usage(TyperCommand):
    """ADAPTER is required except in the extraction mode, which click cannot express: the usage says both."""

    def collect_usage_pieces(self, ctx):
        return ["[OPTIONS] ADAPTER", "|", "[OPTIONS] --base-model BASE --finetuned FT"]


@app.command(
    cls=_Usage,
    epilog="Examples:  lowrank squeeze ./my-adapter --rank 8 -o ./my-adapter-r8  ·  "
    "lowrank squeeze ./my-adapter --energy 0.95 --max-rank 32  ·  lowrank squeeze ./my-adapter --budget 0.25  ·  "
    "lowrank squeeze ./my-adapter --analyze  ·  lowrank squeeze --base-model ./base --finetuned ./ft --rank 16",
)
def squeeze(
    adapter: Adapter = None, rank: Rank = D["rank"], energy: Energy = D["energy"], budget: Budget = D["budget"],
    analyze: Analyze = D["analyze"], max_rank: MaxRank = D["max_rank"], min_rank: MinRank = D["min_rank"],
    min_energy: MinEnergy = D["min_energy"], allow_pad: AllowPad = D["allow_pad"],
    algorithm: Algorithm = D["algorithm"], oversample: Oversample = D["oversample"],
    power_iters: PowerIters = D["power_iters"], seed: Seed = D["seed"], threads: Threads = D["threads"],
    alpha_policy: AlphaPolicy = D["alpha_policy"], base_model: BaseModel = D["base_model"],
    finetuned: Finetuned = D["finetuned"], output: Output = None, dtype: Dtype = D["dtype"],
    overwrite: Overwrite = D["overwrite"], json_output: Json = False, quiet: Quiet = False, verbose: Verbose = 0,
    debug: Debug = False, trust_remote_code: TrustRemoteCode = D["trust_remote_code"],
):
    """Squeeze a LoRA adapter to lower ranks (LoRA-Squeeze), exactly and without the base model.

    The output is in the input's format, with alpha, rank_pattern and alpha_pattern rewritten so that the
    effective update s'·B'·A' is exactly the truncated SVD of s·B·A. Writes squeeze_report.json and .md.
    """
    options = {name: value for name, value in locals().items() if name in D}  # the SqueezeConfig fields

    from lowrank.squeezing.api import squeeze as run

    from .ui import RichProgress, print_json, quiet_libraries

    config = SqueezeConfig(**options)  # every option checked before any file is opened
    if base_model is not None or finetuned is not None:
        quiet_libraries(verbose)
    started = time.perf_counter()
    with RichProgress(quiet=quiet, verbose=verbose) as progress:
        report = run(adapter, output, config, progress=progress)
    if json_output:
        print_json(report)
    if not quiet:
        if report.get("mode") == "analyze":
            show_analysis(report)
        else:
            show_summary(report, verbose, time.perf_counter() - started)


def _layer_table(title, layers):
    from rich import box
    from rich.table import Table

    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("module", overflow="fold", ratio=1)
    for column in ("shape", "r->k", "energy", "error", "σ1", "σk", "σk+1"):
        table.add_column(column, justify="right", no_wrap=True)
    for layer in layers:
        before = "dense" if layer["rank_before"] is None else layer["rank_before"]
        table.add_row(layer["name"], "x".join(map(str, layer["shape"])), f"{before}->{layer['rank']}",
                      f"{layer['energy_kept']:.4f}", f"{layer['rel_error']:.4f}", f"{layer['sigma_1']:.3g}",
                      _num(layer["sigma_k"]), _num(layer["sigma_first_dropped"]))
    return table


def _num(value):
    return "-" if value is None else f"{value:.3g}"


def show_summary(report, verbose, seconds):
    from lowrank.squeezing.report import squeeze_summary_rows

    from .ui import err, key_value_table

    err.print(key_value_table("lowrank squeeze" + (" (plan: nothing written)" if report.get("mode") == "plan"
                                                   else ""), squeeze_summary_rows(report)))
    layers = report["layers"]["list"]
    if verbose:
        err.print(_layer_table("Modules", layers))
    else:
        worst = sorted(layers, key=lambda layer: (layer["energy_kept"], layer["name"]))[:5]
        err.print(_layer_table("Least energy kept (energy = fraction of sum sigma^2 kept; error = sqrt(1 - "
                               "energy); -v lists every module)", worst))
    for warning in report["warnings"]:
        err.print(f"warning: {warning}", highlight=False, soft_wrap=True, markup=False)
    if report.get("output"):
        err.print(f"wrote {report['output']['path']} in {seconds:.1f}s", highlight=False, soft_wrap=True)


def show_analysis(report):
    from rich.table import Table

    from .ui import err

    analysis, source = report["analysis"], report["source"]
    table = Table(title=f"{source['path']}: energy kept at a uniform rank ({source['modules']} modules)",
                  title_justify="left")
    for column in ("rank", "mean", "min", "p10", "LoRA params"):
        table.add_column(column, justify="right")
    for row in analysis["ranks"]:
        table.add_row(str(row["rank"]), f"{row['energy_mean']:.4f}", f"{row['energy_min']:.4f}",
                      f"{row['energy_p10']:.4f}", f"{row['params']:,}")
    err.print(table)
    table = Table(title="Rank needed per energy target (energy = fraction of sum sigma^2 kept)", title_justify="left")
    for column in ("energy", "uniform rank (worst module)", "--energy: params", "--energy: max rank"):
        table.add_column(column, justify="right")
    for row in analysis["thresholds"]:
        uniform = row["uniform_rank_for_worst_module"]
        table.add_row(f"{row['energy']:g}", "-" if uniform is None else str(uniform),
                      f"{row['per_module_params']:,}", str(row["per_module_rank_max"]))
    err.print(table)
