"""Terminal output: rich progress and tables on stderr, so that stdout carries only `--json` results."""

import json
import logging
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from lowrank.progress import Progress as LibraryProgress

err = Console(stderr=True)


def quiet_libraries(verbose):
    """Keep third-party progress bars and chatter out of our output unless -vv."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity(logging.INFO if verbose >= 2 else logging.ERROR)
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.utils.logging.set_verbosity(logging.INFO if verbose >= 2 else logging.ERROR)
    except ImportError:
        pass
    import warnings

    if verbose < 2:
        warnings.filterwarnings("ignore")


class RichProgress(LibraryProgress):
    """A rich progress bar per stage on a terminal; one line per step when stderr is a log file."""

    def __init__(self, quiet=False, verbose=0):
        self.quiet, self.verbose = quiet, verbose
        self.bar = None
        self.tasks = {}

    def __enter__(self):
        if not self.quiet and err.is_terminal:
            self.bar = Progress(TextColumn("[bold]{task.fields[stage]}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                TextColumn("{task.description}"), console=err)
            self.bar.start()
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()

    def start(self, stage, total):
        """`total` None: a phase of unknown length (a pulsing bar with the time elapsed)."""
        if self.bar is not None:
            self.tasks[stage] = self.bar.add_task("", total=total, stage=stage)
        elif not self.quiet:
            err.print(f"{stage}: " + ("started" if total is None else f"{total} steps"), highlight=False)

    def advance(self, stage, detail=""):
        if self.bar is not None and stage in self.tasks:
            task = self.tasks[stage]
            if self.bar.tasks[task].total is None:  # an open-ended phase ends with its one advance
                self.bar.update(task, total=1, completed=1, description=detail)
            else:
                self.bar.update(task, advance=1, description=detail)
        elif not self.quiet and (self.verbose or not err.is_terminal):
            err.print(f"{stage}: {detail}", highlight=False, soft_wrap=True)

    def log(self, message):
        if not self.quiet:
            (self.bar.console if self.bar else err).print(message, highlight=False, markup=False, soft_wrap=True)


def print_json(data):
    sys.stdout.write(json.dumps(data, indent=2) + "\n")
    sys.stdout.flush()


def print_document(text):
    """A machine-readable result other than JSON (`lowrank report --format markdown|junit`), on stdout."""
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


def key_value_table(title, rows):
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, str(value))
    return table


def split_patterns(values):
    """--targets / --ignore values: comma-separated or repeated patterns, as one list (None when empty)."""
    return [p.strip() for value in values or [] for p in value.split(",") if p.strip()] or None
