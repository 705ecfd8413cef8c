"""Small checkers for numeric options, shared by every command's validation (one wording for every option).

No heavy imports: configs and the CLI check their options before anything is loaded.
"""

import math

from .errors import UsageError


def check_int(option, value, minimum):
    """A whole number (not a bool) of at least `minimum`, else a UsageError naming the option."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"{option} must be a whole number of at least {minimum}, got {value!r}")


def check_number(option, value, minimum=None, strict=False):
    """A finite number (not a bool), at least `minimum` (above it when `strict`), else a UsageError."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and minimum is not None:
        ok = value > minimum if strict else value >= minimum
    if not ok:
        bound = "" if minimum is None else f" {'above' if strict else 'at least'} {minimum}"
        raise UsageError(f"{option} must be a finite number{bound}, got {value!r}")


def check_calibration(num_samples, seq_len, batch_size):
    """The calibration options every calibrated command shares (compress, compensate): windows, their length
    (None: the default), windows per forward pass."""
    check_int("--num-samples", num_samples, 1)
    if seq_len is not None:
        check_int("--seq-len", seq_len, 2)
    check_int("--batch-size", batch_size, 1)
