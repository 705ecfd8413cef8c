"""The `lowrank` command line: a thin typer layer over the Python API.

Exit codes: 0 success, 1 failure (or a failed report gate), 2 usage error, 3 unreadable or incomplete report.
Errors print one line on stderr; `--debug` shows the traceback instead.
"""

import os
import sys

import typer

from . import compensate, compress, densify, env, evaluate, report, squeeze  # noqa: F401  (they register commands)
from .app import app


def main(argv=None):
    """Console entry point: run the app, turn errors into one line and an exit code."""
    import click

    from lowrank.errors import LowrankError
    from lowrank.io.publish import DISK_FULL

    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or os.environ.get("LOWRANK_DEBUG") == "1"
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF loader draws its own tqdm bar
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        code = app(args=argv, prog_name="lowrank", standalone_mode=False)
        if isinstance(code, int) and code:  # typer.Exit(code) comes back as a return value here (report's gates)
            sys.exit(code)
    except (click.exceptions.Exit, typer.Exit) as done:
        sys.exit(done.exit_code)
    # Usage errors, printed with the usage line. typer >= 0.20 bundles its own click, whose exceptions
    # (typer.TyperException and subclasses) are not click's: both are caught.
    except (click.ClickException, getattr(typer, "TyperException", click.ClickException)) as error:
        error.show() if hasattr(error, "show") else print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    except (click.exceptions.Abort, typer.Abort, KeyboardInterrupt):
        print("interrupted; nothing was written", file=sys.stderr)
        sys.exit(130)
    except LowrankError as error:
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    except MemoryError:
        if debug:
            raise
        print("error: out of memory; try fewer --num-samples, a shorter --seq-len or a smaller --batch-size",
              file=sys.stderr)
        sys.exit(1)
    except Exception as error:  # a bug or an environment problem: say what, offer the traceback
        if debug:
            raise
        if isinstance(error, OSError) and error.errno in DISK_FULL:
            print(f"error: {_disk_full(error)}", file=sys.stderr)
            sys.exit(1)
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        print(f"error: {type(error).__name__}: {message} (run with --debug for the traceback)", file=sys.stderr)
        sys.exit(1)


def _disk_full(error):
    """One line for a write that ran out of space: what could not be written, why, and what to do. The writers
    name the output (not their staging sibling, which is gone: an existing output is untouched)."""
    import errno

    from lowrank.io.publish import published_path

    what = f" {published_path(error.filename)}" if error.filename else ""  # unnamed: a temporary file, maybe
    if error.errno == errno.EFBIG:
        return (f"could not write{what}: file too large (a limit of the file system or of ulimit -f); write the "
                "output elsewhere or raise the limit")
    reason = "disk quota exceeded" if error.errno == errno.EDQUOT else "no space left on device"
    return f"could not write{what}: {reason}; free some space or write the output elsewhere"
