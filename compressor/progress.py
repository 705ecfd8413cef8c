"""Progress reporting that the library calls and a front end renders (the CLI draws rich bars on stderr)."""


class Progress:
    """Silent by default; subclass to show progress."""

    def start(self, stage, total):
        """A stage of `total` steps begins (e.g. "blocks", 30)."""

    def advance(self, stage, detail=""):
        """One step of `stage` is done; `detail` is a short status line."""

    def log(self, message):
        """A message worth showing once (a warning, a fallback taken)."""


SILENT = Progress()
