"""How reports write numbers, byte counts, percentages and markdown table cells.

A leaf: it imports nothing of lowrank, so every report module (and the commands' tables) can use it without
depending on another report module.
"""


def human_bytes(count):
    """A byte count in decimal units: 512 B, 1.5 KB, 300.0 MB (the units disks and hubs show)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000


def fmt_number(value, spec=".4g"):
    """`value` in format `spec`, or "" when there is none (a table cell for a metric that was not measured)."""
    return "" if value is None else format(value, spec)


def fmt_percent(value, signed=False):
    """A fraction as a percentage with two decimals (+1.25% when `signed`), or "" when there is none."""
    return fmt_number(value, "+.2%" if signed else ".2%")


def fmt_ratio(value, reference):
    """How many times `reference` `value` is (x1.85), or "" when either is missing or zero."""
    return f"x{value / reference:.2f}" if value and reference else ""


def fmt_change(value, reference):
    """The relative change from `reference` to `value` (+12.50%), or "" when it cannot be computed."""
    return f"{value / reference - 1:+.2%}" if value is not None and reference else ""


def markdown_cell(value):
    """A markdown table cell: pipes escaped, newlines flattened."""
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def markdown_table(header, rows):
    """The lines of a GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(map(markdown_cell, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(markdown_cell, row)) + " |" for row in rows]
    return lines
