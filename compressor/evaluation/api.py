"""`lowrank.evaluate`: perplexity with the fixed protocol, agreement with a baseline, speed, lm-eval tasks.

What can be evaluated (MODEL and the baseline alike): our factorized checkpoints, dense checkpoint directories
(including densified ones), .gguf files, hub ids and pkg:NAME, each optionally with a PEFT adapter on top
(evaluation/subjects.py loads them). The result is one evaluation entry (schema `lowrank.evaluation`, version 1,
described in README "Evaluate") that `record` appends to a report's `evaluations` list.

Both models are held in memory together, so that KL divergence and top-1 agreement compare the two next-token
distributions position by position on the same windows without storing logits.
"""

import importlib.metadata
import importlib.util
import os
import time

from ..environment import invocation
from ..errors import UsageError
from ..progress import SILENT, Progress, ticker
from ..report.files import utc_now
from ..report.schema import EVALUATION_SCHEMA, EVALUATION_VERSION
from .subjects import check_measurable, load_subjects, max_positions

DEFAULT_DATA = "wikitext:wikitext-2-raw-v1"
DEFAULT_SPLIT = "test"
DEFAULT_SEQ_LEN = 2048
SCHEMA = EVALUATION_SCHEMA
SCHEMA_VERSION = EVALUATION_VERSION  # the newest this lowrank reads is the one it writes
LOCAL_SUFFIXES = (".txt", ".cor", ".md", ".json", ".jsonl", ".parquet", ".csv")


def _check_data_source(spec):
    """Fail at once, before any model is loaded, for a missing local file or an unreachable hub."""
    from ..calibration.text import hub_reachable

    path = os.path.expanduser(spec)
    if os.path.exists(path):
        return
    if spec.lower().endswith(LOCAL_SUFFIXES) or spec.startswith((".", "/", "~")):
        raise UsageError(f"--data {spec}: no such file or directory")
    offline = any(os.environ.get(name, "0").lower() in ("1", "true", "yes")
                  for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if not offline and not hub_reachable():
        raise UsageError(f"--data {spec}: the Hugging Face hub is unreachable and there is no local file of that name; "
                         "pass a local text/jsonl/parquet/csv file, or set HF_HUB_OFFLINE=1 to use a cached copy")


def _validate(seq_len, max_tokens, batch_size, decode_tokens, baseline, baseline_adapter):
    if seq_len is not None and seq_len < 2:
        raise UsageError("--seq-len must be at least 2 (one token of context, one scored)")
    if max_tokens is not None and max_tokens < 1:
        raise UsageError("--max-tokens must be at least 1")
    if batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if decode_tokens < 0:
        raise UsageError("--decode-tokens cannot be negative")
    if baseline_adapter and not baseline:
        raise UsageError("--baseline-adapter needs --baseline (the model the adapter goes on)")


def _choose_seq_len(seq_len, subjects, progress):
    limits = [limit for limit in (max_positions(s.model) for s in subjects) if limit]
    limit = min(limits) if limits else None
    if seq_len is None:
        seq_len = min(DEFAULT_SEQ_LEN, limit) if limit else DEFAULT_SEQ_LEN
        if limit and limit < DEFAULT_SEQ_LEN:
            progress.log(f"--seq-len {seq_len}: the model's maximum ({DEFAULT_SEQ_LEN} is the papers' length)")
    elif limit and seq_len > limit:
        raise UsageError(f"--seq-len {seq_len} exceeds the model's maximum of {limit} positions")
    return seq_len


def _same_width(model, baseline, stream, device):
    import torch

    probe = stream[:2].reshape(1, -1).to(device)
    with torch.no_grad():
        return model(input_ids=probe).logits.shape[-1] == baseline(input_ids=probe).logits.shape[-1]


def _evaluation_text(data, split, text_column, tokenizer, seq_len, max_tokens):
    """(texts, data provenance, token stream, windows): the text tokenized once, cut into --seq-len windows."""
    from ..calibration import JOIN, tokenize_stream
    from ..calibration.text import load_texts
    from .perplexity import windows

    texts, data_info = load_texts(data, split=split, text_column=text_column, tokenizer=tokenizer, keep_empty=True,
                                  what="evaluation")
    stream, digest = tokenize_stream(texts, tokenizer)
    data_info.update(sha256_text=digest, characters=sum(map(len, texts)) + len(JOIN) * (len(texts) - 1),
                     stream_tokens=int(stream.numel()))
    batches = windows(stream, seq_len, max_tokens)
    if batches.shape[0] == 0:
        raise UsageError(f"the evaluation text has {stream.numel():,} tokens, fewer than one window of {seq_len}; "
                         "use a shorter --seq-len or more text")
    return texts, data_info, stream, batches


def _new_evaluation(command, device, subject, reference, data_info, seq_len, batches, stream, peft_used):
    """The evaluation entry before anything is measured: what, on what text, under which protocol."""
    from ..report.compression import versions
    from .perplexity import protocol

    evaluation = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "created": utc_now().isoformat(timespec="seconds"),
        "command": command or invocation(),
        "versions": versions(), "device": device, "model": subject.info,
        "baseline": reference.info if reference else None, "data": data_info,
        "protocol": protocol(seq_len, int(batches.shape[0]), int(stream.numel())),
        "perplexity": None, "agreement": None, "agreement_note": None, "embeddings": None, "speed": None,
        "tasks": None,
    }
    if importlib.util.find_spec("peft") is not None and peft_used:
        evaluation["versions"]["peft"] = importlib.metadata.version("peft")
    return evaluation


def _score_encoder(subject, reference, batches, batch_size, device, progress):
    """The cosine similarity of the two encoders' pooled embeddings, window by window."""
    from .embeddings import embedding_similarity

    steps = -(-int(batches.shape[0]) // batch_size)
    tick = ticker(progress, "windows", steps, lambda done: f"{done}/{steps} batches · pooled embeddings")
    return embedding_similarity(subject.model, reference.model, batches, batch_size, device, tick)


def _measure_speed(subjects, window, device, decode_tokens, causal, progress):
    """Prefill (and, for a causal LM, decode) throughput and memory of the model and the baseline."""
    from .speed import measure

    progress.start("speed", len(subjects))
    speed = {}
    for role, item in zip(("model", "baseline"), subjects):
        speed[role] = measure(item.model, window, device, decode_tokens if causal else 0, causal=causal)
        progress.advance("speed", f"{role}: prefill and decode")
    return speed


def _run_lm_eval(subjects, tasks, manager, batch_size, limit, num_fewshot):
    """lm-eval's results for the model and the baseline, each already loaded (lm-eval does not load them again)."""
    from .harness import run_tasks

    return {role: run_tasks(item.model, item.tokenizer, tasks, manager, batch_size, limit, num_fewshot)
            for role, item in zip(("model", "baseline"), subjects)}


def evaluate(
    model: str,
    *,
    baseline: str | None = None,
    adapter: str | None = None,
    baseline_adapter: str | None = None,
    data: str = DEFAULT_DATA,
    split: str = DEFAULT_SPLIT,
    text_column: str = "text",
    seq_len: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 1,
    device: str = "auto",
    dtype: str = "auto",
    speed: bool = True,
    decode_tokens: int = 32,
    tasks: list[str] | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    include_path: str | None = None,
    trust_remote_code: bool = False,
    progress: Progress = SILENT,
    command: str | None = None,
) -> dict:
    """Evaluate `model` (optionally + `adapter`) against `baseline` (optionally + `baseline_adapter`).

    Returns the evaluation entry (a dict; see README "Evaluate"). Nothing is written: `record` does that.
    """
    from ..device import resolve_device
    from ..io.loading import resolve_model
    from .harness import task_manager

    _validate(seq_len, max_tokens, batch_size, decode_tokens, baseline, baseline_adapter)
    device = resolve_device(device)
    for spec in (model, baseline):
        if spec:
            resolve_model(spec)  # a mistyped path fails now, not after minutes of loading
    _check_data_source(data)
    manager = task_manager(tasks, include_path) if tasks else None
    timings = {}

    start = time.perf_counter()
    subject, reference = load_subjects(model, adapter, baseline, baseline_adapter, dtype, trust_remote_code,
                                       progress)
    timings["load"] = time.perf_counter() - start
    causal = check_measurable(model, subject, reference, tasks)
    subjects = [subject] + ([reference] if reference else [])
    seq_len = _choose_seq_len(seq_len, subjects, progress)

    start = time.perf_counter()
    texts, data_info, stream, batches = _evaluation_text(data, split, text_column, subject.tokenizer, seq_len,
                                                         max_tokens)
    timings["data"] = time.perf_counter() - start
    for item in subjects:
        item.model.to(device)
    evaluation = _new_evaluation(command, device, subject, reference, data_info, seq_len, batches, stream,
                                 bool(adapter or baseline_adapter))

    start = time.perf_counter()
    if causal:
        evaluation.update(_score_causal(subject, reference, texts, stream, batches, max_tokens, batch_size, device,
                                        progress))
    else:
        evaluation["embeddings"] = _score_encoder(subject, reference, batches, batch_size, device, progress)
    timings["score"] = time.perf_counter() - start

    if speed:
        start = time.perf_counter()
        evaluation["speed"] = _measure_speed(subjects, batches[0], device, decode_tokens, causal, progress)
        timings["speed"] = time.perf_counter() - start

    if tasks:
        start = time.perf_counter()
        progress.log(f"lm-eval tasks: {', '.join(tasks)}")
        evaluation["tasks"] = _run_lm_eval(subjects, tasks, manager, batch_size, limit, num_fewshot)
        timings["tasks"] = time.perf_counter() - start
    evaluation["timings_s"] = {key: round(value, 3) for key, value in timings.items()}
    return evaluation


def _score_causal(subject, reference, texts, stream, batches, max_tokens, batch_size, device, progress):
    """Perplexity of the model (and baseline), and their agreement when both see the same tokens."""
    import torch

    from ..calibration import tokenize_stream
    from .perplexity import score, windows

    steps = -(-int(batches.shape[0]) // batch_size)
    joint = reference is not None
    note = None
    if reference is not None:
        base_stream = stream if reference.tokenizer is None else tokenize_stream(texts, reference.tokenizer)[0]
        if not torch.equal(base_stream, stream):
            joint, note = False, "the model and the baseline tokenize the text differently"
        elif not _same_width(subject.model, reference.model, stream, device):
            joint, note = False, "the model and the baseline have vocabularies of different sizes"
    total = steps * (1 if joint or reference is None else 2)
    what = "perplexity, KL and top-1 vs baseline" if joint else "perplexity"
    tick = ticker(progress, "windows", total, lambda done: f"{done}/{total} batches · {what}")
    result = score(subject.model, batches, baseline=reference.model if joint else None, batch_size=batch_size,
                   device=device, progress=tick)
    base = result.get("baseline")
    if reference is not None and not joint:
        # No position-by-position comparison: each model is scored on its own tokenization of the same text.
        base_batches = windows(base_stream, batches.shape[1], max_tokens)
        if base_batches.shape[0] == 0:
            raise UsageError(f"with the baseline's tokenizer the text is shorter than one window of "
                             f"{batches.shape[1]} tokens; use a shorter --seq-len or more text")
        base = score(reference.model, base_batches, batch_size=batch_size, device=device, progress=tick)
    perplexity = {"model": result["perplexity"], "nll_model": result["nll"],
                  "baseline": base["perplexity"] if base else None, "nll_baseline": base["nll"] if base else None,
                  "increase": result["perplexity"] / base["perplexity"] - 1 if base else None}
    return {"perplexity": perplexity, "agreement": result.get("agreement"),
            "agreement_note": (note + ", so KL and top-1 agreement cannot be compared position by position; each "
                               "perplexity is on its own tokens") if note else None}


def default_report(model, adapter=None):
    """The report an evaluation is recorded into by default: the evaluated artifact's own (the adapter's when an
    adapter is given; else MODEL's, when it is a directory holding one), or None."""
    from ..io.loading import resolve_model
    from ..report.files import REPORT_FILES

    if adapter:
        directory = adapter
    else:
        source = resolve_model(model)
        directory = source.path if source.kind == "dir" else None
    if not directory or not os.path.isdir(directory):
        return None
    for name in REPORT_FILES:
        if os.path.isfile(os.path.join(directory, name)):
            return os.path.join(directory, name)
    return None


def record(evaluation: dict, report_path: str | os.PathLike) -> int:
    """Append `evaluation` to the report at `report_path` (created as an `eval` report if missing). Returns its
    index in `evaluations`. A compression report's markdown rendering beside it is refreshed too."""
    from ..report.compression import compression_markdown
    from ..report.files import append_evaluation

    def rerender(report):
        markdown = os.path.join(os.path.dirname(os.path.abspath(report_path)), "compression_report.md")
        if report.get("kind") == "compress" and os.path.exists(markdown):
            return {"compression_report.md": compression_markdown(report)}
        return {}

    return append_evaluation(report_path, evaluation, rerender)
