"""The `lowrank` command line: a thin typer layer over the Python API.

Exit codes: 0 success, 1 failure (or a failed report gate), 2 usage error, 3 unreadable or incomplete report,
130 interrupted (Ctrl-C). Errors print one line on stderr; `--debug` shows the traceback instead.
"""

import os
import sys

# what str.splitlines() splits on: inside an error message each is shown escaped (repr-style), so that an input
# string quoted in the message (a dtype, a module name, a field value) cannot split the one `error:` line
LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


# SIGINTs received: a Ctrl-C that lands inside a C extension's import (numpy, under torch) can come back as another
# error ("ImportError: cannot load module more than once per process"); it is still an interruption (exit 130)
_SIGNALLED = []


def _note_sigint(signum, frame):
    _SIGNALLED.append(signum)
    raise KeyboardInterrupt


def main(argv=None):
    """Console entry point: run the app, turn errors into one line and an exit code. The commands are imported
    here, inside the handler, so that a Ctrl-C even while they load is one line too."""
    entry_point, argv = argv is None, sys.argv[1:] if argv is None else list(argv)
    before = _output_identity(argv)
    if entry_point:
        import signal

        signal.signal(signal.SIGINT, _note_sigint)
    try:
        _run(argv, before)
    except KeyboardInterrupt:
        _interrupted(argv, before)
    finally:
        if entry_point:  # the command is over: a late Ctrl-C must not print a traceback while Python shuts down
            import signal

            signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run(argv, before):
    import click
    import typer

    from lowrank.errors import LowrankError
    from lowrank.io.publish import DISK_FULL

    from . import compensate, compress, densify, env, evaluate, report, squeeze  # noqa: F401  (they register commands)
    from .app import app

    debug = "--debug" in argv or os.environ.get("LOWRANK_DEBUG") == "1"
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF loader draws its own tqdm bar
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        code = app(args=argv, prog_name="lowrank", standalone_mode=False)
        if code == 130:  # typer turns a KeyboardInterrupt in a command into a silent typer.Exit(130), returned here
            _interrupted(argv, before)
        if isinstance(code, int) and code:  # typer.Exit(code) comes back as a return value here (report's gates)
            sys.exit(code)
    except (click.exceptions.Exit, typer.Exit) as done:
        if done.exit_code == 130:
            _interrupted(argv, before)
        sys.exit(done.exit_code)
    # Usage errors (a bad option value, an unknown option, a missing argument). typer >= 0.20 bundles its own click,
    # whose exceptions (typer.TyperException and subclasses) are not click's: both are caught.
    except (click.ClickException, getattr(typer, "TyperException", click.ClickException)) as error:
        if type(error).__name__ == "NoArgsIsHelpError" and hasattr(error, "show"):  # bare `lowrank`: the help
            error.show()
        else:
            _say(_usage_line(error, argv))
        sys.exit(getattr(error, "exit_code", 2))
    except (click.exceptions.Abort, typer.Abort):
        _interrupted(argv, before)
    except LowrankError as error:
        if debug:
            raise
        _say(str(error))
        sys.exit(error.exit_code)
    except MemoryError:
        if debug:
            raise
        _say("out of memory; try fewer --num-samples, a shorter --seq-len or a smaller --batch-size")
        sys.exit(1)
    except Exception as error:  # a bug or an environment problem: say what, offer the traceback
        if _SIGNALLED:  # a library turned the Ctrl-C into this error
            _interrupted(argv, before)
        if debug:
            raise
        if isinstance(error, OSError) and error.errno in DISK_FULL:
            _say(_disk_full(error))
            sys.exit(1)
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        _say(f"{type(error).__name__}: {message} (run with --debug for the traceback)")
        sys.exit(1)


def one_line(text):
    """`text` on one line: surrounding whitespace dropped, every line break inside it shown as its escape."""
    return "".join(repr(c)[1:-1] if c in LINE_BREAKS else c for c in str(text).strip())


def _say(message):
    print(f"error: {one_line(message)}", file=sys.stderr)


def _usage_line(error, argv):
    """A click/typer usage error (bad value, unknown option, missing argument) as one line, with where to look."""
    message = one_line(error.format_message() if hasattr(error, "format_message") else str(error))
    context = getattr(error, "ctx", None)
    where = getattr(context, "command_path", "") or " ".join(["lowrank", *_command(argv)[:1]])
    return f"{message.removesuffix('.')} (see {where} --help)"


def _command(argv):
    """[the command's name] as typed (the first argument that is not an option), or []."""
    return [arg for arg in argv if not arg.startswith("-")][:1]


def _interrupted(argv, before):
    """Ctrl-C: one line saying what was interrupted, exit 130. Every output is written into a hidden staging sibling
    and renamed into place only when complete (lowrank.io.publish), so an interrupted run leaves none behind, unless
    the signal came after that rename; compress says itself what its journal keeps for --resume
    (lowrank.errors.Interrupted), before reaching here."""
    what = " ".join(["lowrank", *_command(argv)])
    output, identity = _output(argv), _output_identity(argv)
    if identity is not None and identity != before:
        _say(f"{what} interrupted after it wrote {output}, which is complete (an output appears only when it is)")
    else:
        _say(f"{what} interrupted; nothing was written (an output appears only when it is complete)")
    sys.exit(130)


def _output(argv):
    """The value of -o/--output as typed, or None."""
    for index, arg in enumerate(argv):
        if arg in ("-o", "--output") and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith("--output="):
            return arg[len("--output="):]
    return None


def _output_identity(argv):
    """(inode, modification time) of the output named by -o/--output, or None if there is none yet."""
    try:
        status = os.stat(_output(argv))
    except (OSError, TypeError, ValueError):
        return None
    return status.st_ino, status.st_mtime_ns


def _disk_full(error):
    """One line for a write that ran out of space: what could not be written, why, and what to do. The writers
    name the output (not their staging sibling, which is gone: an existing output is untouched), unless a journal
    keeps the work so far for --resume: then where it is kept."""
    import errno

    from lowrank.io.publish import published_path

    output = published_path(error.filename) if error.filename else None  # unnamed: a temporary file, maybe
    what = f" {output}" if output else ""
    if error.errno == errno.EFBIG:
        reason, remedy = "file too large (a limit of the file system or of ulimit -f)", "raise the limit"
    else:
        reason = "disk quota exceeded" if error.errno == errno.EDQUOT else "no space left on device"
        remedy = "free some space"
    kept = _kept_for_resume(output) if output else None
    if kept:
        staging, blocks = kept
        done = f"{blocks} block{'s' * (blocks != 1)}"
        return (f"could not write{what}: {reason}; the work so far ({done}) is kept in {staging}: {remedy} and run "
                "the same command with --resume, or delete it")
    return f"could not write{what}: {reason}; {remedy} or write the output elsewhere"


def _kept_for_resume(output):
    """(staging, blocks done) if compress left its journal behind for --resume (it needs torch: imported only
    here, after a compress run has loaded it)."""
    if "torch" not in sys.modules:
        return None
    from lowrank.compression.resume import kept_blocks

    return kept_blocks(output)
