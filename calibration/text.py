"""Calibration text from the hub, from local files through datasets' packaged builders, or from disk folders."""

import logging
import os
import socket
from contextlib import contextmanager
from urllib.parse import urlparse

from lowrank.errors import LowrankError, UsageError

BUILDERS = {".txt": "text", ".cor": "text", ".md": "text", ".json": "json", ".jsonl": "json",
            ".parquet": "parquet", ".csv": "csv"}
DEFAULT_HUB_DATASET = "wikitext:wikitext-2-raw-v1"
FORMATS = "UTF-8 text (.txt, .md or any other suffix), .json/.jsonl, .parquet or .csv, or a folder of such files"


def looks_like_path(spec):
    """Whether a data source is meant as a local path rather than a hub dataset `name[:config]`: it starts like a
    path, has a backslash or more than one slash (a hub name, org/name, has at most one) or a data file suffix."""
    return (spec.startswith((".", "/", "~")) or "\\" in spec or spec.count("/") > 1
            or os.path.splitext(spec)[1].lower() in BUILDERS)


def check_source(spec, what="calibration"):
    """Refuse a local path that does not exist, before any model is loaded: taken for a hub name, it would fail
    later as an unreachable hub dataset. `auto`, `self` and hub names pass."""
    if not os.path.exists(os.path.expanduser(spec)) and looks_like_path(spec):
        raise UsageError(f"could not load {what} data: no such file: {spec}; give an existing file or folder, or a "
                         f"hub dataset name such as {DEFAULT_HUB_DATASET}")


def hub_reachable(timeout=3.0):
    """A quick TCP probe of the hub, so that an offline machine falls back at once instead of retrying."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _local_dataset(path, split):
    import datasets

    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "dataset_info.json")) or os.path.exists(os.path.join(path, "state.json")):
            loaded = datasets.load_from_disk(path)
            return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        return datasets.load_dataset(path, split=split)
    builder = BUILDERS.get(os.path.splitext(path)[1].lower(), "text")
    kwargs = {"sample_by": "document"} if builder == "text" else {}
    return datasets.load_dataset(builder, data_files=path, split="train", **kwargs)


def _root_cause(error):
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return error


def _unreadable(spec, path, error, what):
    """One line for a local file or folder datasets could not read: which, what it is not, what is read."""
    cause = _root_cause(error)
    folder = os.path.isdir(path)
    builder = "folder" if folder else BUILDERS.get(os.path.splitext(path)[1].lower(), "text")
    if isinstance(cause, UnicodeDecodeError):
        problem = f"{'holds a file that ' if folder else ''}is not UTF-8 text (byte {cause.start} cannot be decoded)"
    elif builder == "json":
        problem = "is not valid JSON or JSON lines (one object per line)"
    elif builder == "parquet":
        problem = "is not a parquet file"
    elif builder == "csv":
        problem = "is not a CSV file with a header row"
    else:
        # datasets wraps a builder's failure in a sentence that says nothing; the error it wraps says what failed
        shown = cause if type(error).__name__ == "DatasetGenerationError" else error
        detail = str(shown).strip().splitlines()[0] if str(shown).strip() else type(shown).__name__
        problem = f"cannot be read ({detail})"
    return f"{what} {'folder' if folder else 'file'} {spec} {problem}; lowrank reads {FORMATS}"


@contextmanager
def _quiet_datasets():
    """datasets logs its own copy of a reading error; the one line lowrank prints says it better."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _hub_dataset(spec, split):
    import datasets

    name, _, config = spec.partition(":")
    return datasets.load_dataset(name, config or None, split=split)


def _column(dataset, text_column, what="calibration"):
    columns = dataset.column_names
    if text_column in columns:
        return text_column
    strings = [c for c, f in dataset.features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
    if len(strings) == 1:
        return strings[0]
    raise UsageError(f"the {what} data has no column {text_column!r} (columns: {', '.join(columns)}); "
                     "pass --text-column")


def _render(value, tokenizer, what="calibration"):
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[0], dict) and tokenizer is not None:
        # chat data ("messages"): render it the way the model sees it
        return tokenizer.apply_chat_template(value, tokenize=False)
    raise UsageError(f"the {what} text column holds neither strings nor chat messages")


def load_texts(spec, split="train", text_column="text", tokenizer=None, keep_empty=False, what="calibration"):
    """Texts of a calibration source and a description of where they came from.

    `keep_empty` keeps empty rows (perplexity joins every row, as GPTQ does for WikiText-2); `what` names the
    data in error messages ("calibration", "evaluation").
    """
    import datasets

    datasets.disable_progress_bars()
    check_source(spec, what)
    path = os.path.expanduser(spec)
    local = os.path.exists(path)
    if local and os.path.isfile(path) and os.path.getsize(path) == 0:
        raise UsageError(f"{what} file {spec} is empty; give a file with text in it")
    try:
        if local:
            with _quiet_datasets():
                dataset = _local_dataset(path, split)
        else:
            dataset = _hub_dataset(spec, split)
    except Exception as error:  # datasets' builders raise their own, pyarrow's and pandas' errors
        if local:  # the file is the user's: say which, and what lowrank reads
            raise UsageError(_unreadable(spec, path, error, what)) from error
        if not isinstance(error, (FileNotFoundError, ValueError, ConnectionError, OSError)):
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise LowrankError(f"could not load {what} hub dataset (is the hub reachable?) {spec!r}: {message}") from error
    column = _column(dataset, text_column, what)
    texts = [_render(value, tokenizer, what) for value in dataset[column]]
    if not any(text and text.strip() for text in texts):
        raise UsageError(f"the {what} source {spec!r} has no text in column {column!r}")
    texts = [text or "" for text in texts] if keep_empty else [text for text in texts if text and text.strip()]
    provenance = {"source": spec, "kind": "local" if local else "hub", "split": None if local else split,
                  "text_column": column, "documents": len(texts)}
    return texts, provenance
