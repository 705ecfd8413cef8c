"""`lowrank compensate ORIGINAL COMPRESSED --rank K -o OUT`: EoRA repair."""

from typing import Annotated

import typer

from .app import app
from .options import (
    CAL,
    OUT,
    BatchSize,
    CalibSplit,
    Debug,
    Device,
    Dtype,
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
    num_samples: NumSamples = 128, seq_len: SeqLen = None, text_column: TextColumn = "text",
    calib_split: CalibSplit = "train", seed: Seed = 0, batch_size: BatchSize = 8, device: Device = "auto",
    dtype: Dtype = "auto", overwrite: Overwrite = False, json_output: Json = False, quiet: Quiet = False,
    verbose: Verbose = 0, debug: Debug = False, trust_remote_code: TrustRemoteCode = False,
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

