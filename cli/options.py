"""The options several commands share (calibration, performance, output), one alias each: a help text is
written once, and `lowrank compress` and `lowrank compensate` say the same thing about the same option."""

from typing import Annotated

import typer

CAL, OUT, PERF, DANGER = "Calibration", "Output", "Performance", "Dangerous"

NumSamples = Annotated[int, typer.Option(help="Calibration windows.", rich_help_panel=CAL)]
SeqLen = Annotated[int | None, typer.Option(help="Tokens per window (default: 2048, or the model's maximum if "
                   "smaller).", rich_help_panel=CAL)]
TextColumn = Annotated[str, typer.Option(help="Text column of the calibration data.", rich_help_panel=CAL)]
CalibSplit = Annotated[str, typer.Option(help="Split of a hub calibration dataset.", rich_help_panel=CAL)]
Seed = Annotated[int, typer.Option(help="Seed for the window draw and any sampling.", rich_help_panel=CAL)]
BatchSize = Annotated[int, typer.Option(help="Calibration windows per forward pass.", rich_help_panel=PERF)]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.", rich_help_panel=PERF)]
Dtype = Annotated[str, typer.Option(help="auto (each checkpoint's), float32, bfloat16 or float16.",
                  rich_help_panel=PERF)]
Overwrite = Annotated[bool, typer.Option(help="Replace an existing output (only one that lowrank wrote).",
                      rich_help_panel=OUT)]
Json = Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.", rich_help_panel=OUT)]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or summary.", rich_help_panel=OUT)]
Verbose = Annotated[int, typer.Option("--verbose", "-v", count=True, help="More detail (-vv: library logs).",
                    rich_help_panel=OUT)]
Debug = Annotated[bool, typer.Option(help="Show tracebacks.", rich_help_panel=OUT)]
TrustRemoteCode = Annotated[bool, typer.Option(help="Allow the checkpoint's own Python code to run.",
                            rich_help_panel=DANGER)]
