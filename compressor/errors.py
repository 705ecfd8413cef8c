"""Errors that reach the user as one clear line and an exit code, never a traceback (unless --debug)."""


class LowrankError(Exception):
    """Something went wrong that the user can act on; the message says what and what to do. Exit code 1."""

    exit_code = 1


class UsageError(LowrankError):
    """The command line or its inputs are invalid (bad path, bad ratio, output exists...). Exit code 2."""

    exit_code = 2


class ReportError(LowrankError):
    """A report is unreadable, incomplete, or of an unknown schema. Exit code 3."""

    exit_code = 3


class Interrupted(LowrankError):
    """The user interrupted a run (Ctrl-C); what is durable is kept for --resume. Exit code 130."""

    exit_code = 130


def overflow(what: str) -> LowrankError:
    """The one line for activations (or gradients) that overflowed: a float16 model whose values exceed float16's
    range gives Inf, then NaN; statistics built from them must stop the run, not pass for a dead input."""
    return LowrankError(f"the {what} are not finite (the model's activations overflowed on the calibration text); "
                        "run with --dtype float32, --compute-dtype float32 (float32 arithmetic, the output in the "
                        "checkpoint's dtype), or --dtype bfloat16 for a float16 model")
