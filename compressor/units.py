"""Sizes as people write them ('5GB', '500MB', '2GiB') and as bytes. No heavy imports: the CLI parses sizes."""

import re

from .errors import UsageError


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB', '1000000' -> bytes; anything else is a usage error (exit code 2)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?|\.[0-9]+)\s*([kmgt]?i?b?)\s*", str(text).lower())
    if not match:
        raise UsageError(f"cannot read size {text!r}; write it like 5GB, 500MB or 2GiB")
    number, unit = float(match.group(1)), match.group(2).rstrip("b")
    base = 1024 if unit.endswith("i") else 1000
    power = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}[unit.rstrip("i")]
    return int(number * base**power)
