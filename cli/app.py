"""The typer application every command module registers on (kept apart so that they need not import the
package that imports them)."""

import typer

from lowrank import __version__

app = typer.Typer(
    name="lowrank",
    help="Post-training low-rank compression of Hugging Face models.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool):
    if value:
        print(f"lowrank {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
):
    """Post-training low-rank compression of Hugging Face models."""
