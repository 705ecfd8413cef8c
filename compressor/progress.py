"""Progress reporting that the library calls and a front end renders (the CLI draws rich bars on stderr)."""


class Progress:
    """Silent by default; subclass to show progress."""

    def start(self, stage, total):
        """A stage of `total` steps begins (e.g. "blocks", 30); total None: one step of unknown length, ended by
        one advance (loading a model)."""

    def advance(self, stage, detail=""):
        """One step of `stage` is done; `detail` is a short status line."""

    def log(self, message):
        """A message worth showing once (a warning, a fallback taken)."""


SILENT = Progress()


def ticker(progress, stage, total, detail, steps=40):
    """Start `stage` for `total` items and return a function to call once per item. It advances the stage at most
    `steps` times, so that a CI log (one line per advance) gets a few dozen lines, not one per window or tensor.
    `detail(done)` is the status text after `done` items."""
    every = max(1, -(-total // steps))
    progress.start(stage, -(-total // every))
    done = 0

    def tick():
        nonlocal done
        done += 1
        if done % every == 0 or done == total:
            progress.advance(stage, detail(done))

    return tick
