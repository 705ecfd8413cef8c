"""Calibration text from the hub, from local files through datasets' packaged builders, or from disk folders."""

import os
import socket
from urllib.parse import urlparse

from lowrank.errors import LowrankError, UsageError

BUILDERS = {".txt": "text", ".cor": "text", ".md": "text", ".json": "json", ".jsonl": "json",
            ".parquet": "parquet", ".csv": "csv"}
DEFAULT_HUB_DATASET = "wikitext:wikitext-2-raw-v1"


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
    path = os.path.expanduser(spec)
    local = os.path.exists(path)
    try:
        dataset = _local_dataset(path, split) if local else _hub_dataset(spec, split)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as error:
        where = "local data" if local else "hub dataset (is the hub reachable?)"
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise LowrankError(f"could not load {what} {where} {spec!r}: {message}") from error
    column = _column(dataset, text_column, what)
    texts = [_render(value, tokenizer, what) for value in dataset[column]]
    if not any(text and text.strip() for text in texts):
        raise LowrankError(f"the {what} source {spec!r} has no text in column {column!r}")
    texts = [text or "" for text in texts] if keep_empty else [text for text in texts if text and text.strip()]
    provenance = {"source": spec, "kind": "local" if local else "hub", "split": None if local else split,
                  "text_column": column, "documents": len(texts)}
    return texts, provenance
