"""Sizes as people write them ('5GB', '500MB', '2GiB') and as bytes. No heavy imports: the CLI parses sizes."""

import re
from fractions import Fraction

from .errors import UsageError


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB', '1000000' -> bytes (a fraction of a byte rounded down); anything else is a usage
    error (exit code 2). Exact arithmetic: '4.35KB' is 4350 bytes (a float gives 4349), and no number of digits
    overflows or rounds (a float's infinity did)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?|\.[0-9]+)\s*([kmgt]?i?b?)\s*", str(text).lower())
    if not match:
        raise UsageError(f"cannot read size {text!r}; write it like 5GB, 500MB or 2GiB")
    number, unit = Fraction(match.group(1)), match.group(2).rstrip("b")
    base = 1024 if unit.endswith("i") else 1000
    power = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}[unit.rstrip("i")]
    return int(number * base**power)
