"""`lowrank compensate ORIGINAL COMPRESSED --rank K -o OUT`: EoRA repair."""

from typing import Annotated

import typer

from .app import app
from .ui import split_patterns

CAL, OUT, PERF, DANGER = "Calibration", "Output", "Performance", "Dangerous"


@app.command(epilog="Example:  lowrank compensate ./SmolLM2-135M ./smollm2-lr50 --rank 32 -o repair-adapter")
def compensate(
    original: Annotated[str, typer.Argument(help="The original (dense) model: directory, .gguf, hub id or pkg:NAME.")],
    compressed: Annotated[str, typer.Argument(help="The compressed model: a lowrank checkpoint, or any dense "
                          "checkpoint with the same module names (pruned, dequantized, ...).")],
    rank: Annotated[int, typer.Option("--rank", "-r", help="Rank k of the correction of each layer.")] = 32,
    output: Annotated[str, typer.Option("--output", "-o", help="Output: a PEFT LoRA adapter directory (or, with "
                      "--merge, a factorized checkpoint).", rich_help_panel=OUT)] = "repair-adapter",
    merge: Annotated[bool, typer.Option(help="Fold the correction into the factors of a lowrank checkpoint "
                     "(every factorized rank grows by k) instead of writing an adapter.")] = False,
    targets: Annotated[list[str] | None, typer.Option(help="Layers to correct (default: every block linear that "
                       "differs between the two models).")] = None,
    ignore: Annotated[list[str] | None, typer.Option(help="Layers to leave alone.")] = None,
    damp: Annotated[float, typer.Option(help="Damping of the covariance, relative to its mean diagonal.")] = 1e-4,
    calib: Annotated[str, typer.Option(help="Calibration data, as for compress.", rich_help_panel=CAL)] = "auto",
    num_samples: Annotated[int, typer.Option(rich_help_panel=CAL)] = 128,
    seq_len: Annotated[int | None, typer.Option(rich_help_panel=CAL)] = None,
    text_column: Annotated[str, typer.Option(rich_help_panel=CAL)] = "text",
    calib_split: Annotated[str, typer.Option(rich_help_panel=CAL)] = "train",
    seed: Annotated[int, typer.Option(rich_help_panel=CAL)] = 0,
    batch_size: Annotated[int, typer.Option(rich_help_panel=PERF)] = 8,
    device: Annotated[str, typer.Option(rich_help_panel=PERF)] = "auto",
    dtype: Annotated[str, typer.Option(rich_help_panel=PERF)] = "auto",
    overwrite: Annotated[bool, typer.Option(rich_help_panel=OUT)] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.",
                           rich_help_panel=OUT)] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", rich_help_panel=OUT)] = False,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, rich_help_panel=OUT)] = 0,
    debug: Annotated[bool, typer.Option(help="Show tracebacks.", rich_help_panel=OUT)] = False,
    trust_remote_code: Annotated[bool, typer.Option(rich_help_panel=DANGER)] = False,
):
    """EoRA: a training-free low-rank correction of a compressed model, from the original's input covariance.

    The error W_original - W_compressed of each layer is projected into the eigenspace of the original model's
    input covariance and truncated to rank k; the result is a standard PEFT LoRA adapter (load it with
    PeftModel.from_pretrained(compressed_model, OUT)) whose report gives each layer's error before and after.
    """
    from lowrank.repair.eora import compensate as run

    from .ui import RichProgress, err, key_value_table, print_json, quiet_libraries

    quiet_libraries(verbose)  # the options are checked by run(), before any model is loaded
    with RichProgress(quiet=quiet, verbose=verbose) as progress:
        report = run(original, compressed, output, rank=rank, merge=merge, targets=split_patterns(targets),
                     ignore=split_patterns(ignore), calib=calib, num_samples=num_samples, seq_len=seq_len,
                     batch_size=batch_size, seed=seed, device=device, dtype=dtype, damp=damp,
                     text_column=text_column, calib_split=calib_split, overwrite=overwrite,
                     trust_remote_code=trust_remote_code, progress=progress)
    if json_output:
        print_json(report)
    if not quiet:
        s = report["summary"]
        err.print(key_value_table("lowrank compensate (EoRA)", [
            ("layers corrected", f"{s['layers']} at rank {report['rank']} (+{s['params_added']:,} parameters)"),
            ("mean rel. output error", f"{s['mean_error_before']:.4f} -> {s['mean_error_after']:.4f}"),
            ("max rel. output error", f"{s['max_error_before']:.4f} -> {s['max_error_after']:.4f}"),
            ("output", output + (" (merged: ranks grew by %d)" % report["rank"] if report["merged"] else
                                 " (PEFT LoRA adapter)")),
        ]))

