"""`lowrank env`: versions, device and platform, to paste into a bug report."""

from typing import Annotated

import typer

from .app import app


@app.command()
def env(
    json_output: Annotated[bool, typer.Option("--json", help="Print as JSON on stdout.")] = False,
    debug: Annotated[bool, typer.Option(help="Show tracebacks.")] = False,
):
    """Print versions, device and platform for bug reports (paste the output into the issue)."""
    from lowrank.environment import env_info

    from .ui import err, print_json

    info = env_info()
    if json_output:
        print_json(info)
        return
    lines = ["Copy and paste this into your bug report:", ""]
    for section, values in info.items():
        lines.append(f"{section}:" + ("" if values else " (none set)"))
        for key, value in values.items():
            if isinstance(value, list):
                value = "; ".join(", ".join(f"{k} {v}" for k, v in item.items()) for item in value)
            lines.append(f"- {key}: {value}")
        lines.append("")
    err.print("\n".join(lines).rstrip(), highlight=False, markup=False, soft_wrap=True)
