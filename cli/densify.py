"""`lowrank densify CHECKPOINT -o OUT`: a plain checkpoint of the original architecture, factors multiplied back."""

import time
from typing import Annotated

import typer

from .app import app


@app.command(epilog="Example:  lowrank densify ./smollm2-lr50 -o smollm2-lr50-dense")
def densify(
    checkpoint: Annotated[str, typer.Argument(help="A lowrank factorized checkpoint directory.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Output directory.")],
    max_shard_size: Annotated[str, typer.Option(help="Largest safetensors shard.")] = "5GB",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output directory.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress or summary.")] = False,
    debug: Annotated[bool, typer.Option(help="Show tracebacks.")] = False,
):
    """Multiply the factors back into a plain checkpoint of the original architecture (no custom code).

    For runtimes that cannot run custom code (vLLM, llama.cpp converters): the original model_type and
    architectures, each factorized layer stored as one dense weight. Streams tensor by tensor; config.json records
    the provenance (`lowrank_densified`), which `lowrank report` shows. The compression's quality loss stays; its
    size and speed gains do not.
    """
    from lowrank.repair.densify import densify as run
    from lowrank.report.format import human_bytes

    from .ui import RichProgress, err, key_value_table, print_json

    started = time.perf_counter()
    with RichProgress(quiet=quiet) as progress:
        summary = run(checkpoint, output, max_shard_size=max_shard_size, overwrite=overwrite, progress=progress)
    if json_output:
        print_json(summary)
    if not quiet:
        err.print(key_value_table("lowrank densify", [
            ("source", checkpoint), ("architecture", ", ".join(summary["architectures"])),
            ("densified layers", summary["densified_layers"]), ("params", f"{summary['params']:,}"),
            ("size", human_bytes(summary["bytes"])), ("files", ", ".join(summary["files"]))]))
        err.print(f"wrote {output} in {time.perf_counter() - started:.0f}s; it loads with "
                  f"AutoModelForCausalLM.from_pretrained({output!r}) (no trust_remote_code)", highlight=False,
                  soft_wrap=True)
