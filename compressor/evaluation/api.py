"""`lowrank.evaluate`: perplexity with the fixed protocol, agreement with a baseline, speed, lm-eval tasks.

What can be evaluated (MODEL and the baseline alike): our factorized checkpoints, dense checkpoint directories
(including densified ones), .gguf files, hub ids and pkg:NAME, each optionally with a PEFT adapter on top. The
result is one evaluation entry (schema `lowrank.evaluation`, version 1, described in README "Evaluate") that
`record` appends to a report's `evaluations` list.

Both models are held in memory together, so that KL divergence and top-1 agreement compare the two next-token
distributions position by position on the same windows without storing logits.
"""

import importlib.metadata
import importlib.util
import os
import time
from dataclasses import dataclass

from ..environment import invocation
from ..errors import LowrankError, UsageError
from ..progress import SILENT, ticker
from ..report.files import utc_now

DEFAULT_DATA = "wikitext:wikitext-2-raw-v1"
DEFAULT_SPLIT = "test"
DEFAULT_SEQ_LEN = 2048
SCHEMA = "lowrank.evaluation"
SCHEMA_VERSION = 1
LOCAL_SUFFIXES = (".txt", ".cor", ".md", ".json", ".jsonl", ".parquet", ".csv")


@dataclass
class Subject:
    """A loaded model to evaluate, its tokenizer, and what it is (recorded in the evaluation)."""

    model: object
    tokenizer: object
    info: dict


def _first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _apply_adapter(model, adapter):
    if importlib.util.find_spec("peft") is None:
        raise UsageError("--adapter needs PEFT: pip install 'lowrank[peft]' (or pip install peft)")
    if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        raise UsageError(f"{adapter} is not a PEFT adapter directory (it has no adapter_config.json)")
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, adapter, is_trainable=False).eval()
    except (ValueError, OSError, RuntimeError, KeyError, TypeError) as error:
        raise LowrankError(f"could not apply the adapter {adapter}: {_first_line(error)}") from error


def load_subject(spec, adapter=None, dtype="auto", trust_remote_code=False):
    """Load MODEL (any kind resolve_model knows, factorized or not) and put the PEFT `adapter` on it."""
    from ..io.checkpoint import load_pretrained
    from ..io.loading import load_model, load_tokenizer, read_config, resolve_model, torch_dtype
    from ..io.modeling_lowrank import MODEL_TYPE_PREFIX
    from ..io.shards import check_checkpoint_files
    from .speed import weights_bytes

    source = resolve_model(spec)
    config = read_config(source) or {}
    if str(config.get("model_type", "")).startswith(MODEL_TYPE_PREFIX):
        check_checkpoint_files(source.path)
        try:
            model = load_pretrained(source.path, dtype=torch_dtype(dtype)).eval()
        except (OSError, ValueError, RuntimeError, AttributeError, KeyError) as error:
            raise LowrankError(f"could not load {spec}: {_first_line(error)}") from error
        tokenizer, kind = load_tokenizer(source), "lowrank"
    else:
        model, tokenizer = load_model(source, dtype=dtype, trust_remote_code=trust_remote_code)
        kind = "densified" if config.get("lowrank_densified") else source.kind
    if adapter:
        model = _apply_adapter(model, adapter)
    parameter = next(model.parameters())
    info = {"source": spec, "kind": kind, "adapter": adapter, "architecture": type(_base(model)).__name__,
            "dtype": str(parameter.dtype).removeprefix("torch."),
            "params": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
            "weights_bytes": weights_bytes(model)}
    return Subject(model, tokenizer, info)


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_causal_lm(model):
    base = _base(model)
    if getattr(base.config, "is_encoder_decoder", False):
        raise UsageError(f"{type(base).__name__} is an encoder-decoder model; lowrank eval scores decoder-only "
                         "language models and encoders")
    return bool(type(base).can_generate())


def _max_positions(model):
    config = _base(model).config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


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
    limits = [limit for limit in (_max_positions(s.model) for s in subjects) if limit]
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


def evaluate(
    model,
    *,
    baseline=None,
    adapter=None,
    baseline_adapter=None,
    data=DEFAULT_DATA,
    split=DEFAULT_SPLIT,
    text_column="text",
    seq_len=None,
    max_tokens=None,
    batch_size=1,
    device="auto",
    dtype="auto",
    speed=True,
    decode_tokens=32,
    tasks=None,
    limit=None,
    num_fewshot=None,
    include_path=None,
    trust_remote_code=False,
    progress=SILENT,
    command=None,
):
    """Evaluate `model` (optionally + `adapter`) against `baseline` (optionally + `baseline_adapter`).

    Returns the evaluation entry (a dict; see README "Evaluate"). Nothing is written: `record` does that.
    """
    from ..calibration import JOIN, tokenize_stream
    from ..calibration.text import load_texts
    from ..device import resolve_device
    from ..io.loading import resolve_model
    from ..report.compression import versions
    from .embeddings import embedding_similarity
    from .harness import run_tasks, task_manager
    from .perplexity import protocol, windows
    from .speed import measure

    _validate(seq_len, max_tokens, batch_size, decode_tokens, baseline, baseline_adapter)
    device = resolve_device(device)
    for spec in (model, baseline):
        if spec:
            resolve_model(spec)  # a mistyped path fails now, not after minutes of loading
    _check_data_source(data)
    manager = task_manager(tasks, include_path) if tasks else None
    timings = {}

    start = time.perf_counter()
    progress.log(f"loading {model}" + (f" + adapter {adapter}" if adapter else ""))
    subject = load_subject(model, adapter, dtype, trust_remote_code)
    reference = None
    if baseline:
        progress.log(f"loading baseline {baseline}" + (f" + adapter {baseline_adapter}" if baseline_adapter else ""))
        reference = load_subject(baseline, baseline_adapter, dtype, trust_remote_code)
    timings["load"] = time.perf_counter() - start
    causal = is_causal_lm(subject.model)
    if not causal and reference is None:
        raise UsageError(f"{model} is not a causal language model, so it has no perplexity; pass --baseline BASE to "
                         "compare its pooled embeddings with the baseline's")
    if not causal and tasks:
        raise UsageError(f"{model} is not a causal language model; lm-eval tasks (--tasks) need one")
    if subject.tokenizer is None:
        raise UsageError(f"{model} has no tokenizer, so the evaluation text cannot be tokenized")
    subjects = [subject] + ([reference] if reference else [])
    seq_len = _choose_seq_len(seq_len, subjects, progress)

    start = time.perf_counter()
    texts, data_info = load_texts(data, split=split, text_column=text_column, tokenizer=subject.tokenizer,
                                  keep_empty=True, what="evaluation")
    stream, digest = tokenize_stream(texts, subject.tokenizer)
    data_info.update(sha256_text=digest, characters=sum(map(len, texts)) + len(JOIN) * (len(texts) - 1),
                     stream_tokens=int(stream.numel()))
    batches = windows(stream, seq_len, max_tokens)
    if batches.shape[0] == 0:
        raise UsageError(f"the evaluation text has {stream.numel():,} tokens, fewer than one window of {seq_len}; "
                         "use a shorter --seq-len or more text")
    timings["data"] = time.perf_counter() - start
    for item in subjects:
        item.model.to(device)

    evaluation = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "created": utc_now().isoformat(timespec="seconds"),
        "command": command or invocation(),
        "versions": versions(), "device": device, "model": subject.info,
        "baseline": reference.info if reference else None, "data": data_info,
        "protocol": protocol(seq_len, int(batches.shape[0]), int(stream.numel())),
        "perplexity": None, "agreement": None, "agreement_note": None, "embeddings": None, "speed": None,
        "tasks": None,
    }
    if importlib.util.find_spec("peft") is not None and (adapter or baseline_adapter):
        evaluation["versions"]["peft"] = importlib.metadata.version("peft")

    start = time.perf_counter()
    count = int(batches.shape[0])
    if causal:
        evaluation.update(_score_causal(subject, reference, texts, stream, batches, max_tokens, batch_size, device,
                                        progress))
    else:
        steps = -(-count // batch_size)
        tick = ticker(progress, "windows", steps, lambda done: f"{done}/{steps} batches · pooled embeddings")
        evaluation["embeddings"] = embedding_similarity(subject.model, reference.model, batches, batch_size, device,
                                                        tick)
    timings["score"] = time.perf_counter() - start

    if speed:
        start = time.perf_counter()
        progress.start("speed", len(subjects))
        evaluation["speed"] = {}
        for role, item in zip(("model", "baseline"), subjects):
            evaluation["speed"][role] = measure(item.model, batches[0], device, decode_tokens if causal else 0,
                                                causal=causal)
            progress.advance("speed", f"{role}: prefill and decode")
        timings["speed"] = time.perf_counter() - start

    if tasks:
        start = time.perf_counter()
        progress.log(f"lm-eval tasks: {', '.join(tasks)}")
        evaluation["tasks"] = {role: run_tasks(item.model, item.tokenizer, tasks, manager, batch_size, limit,
                                               num_fewshot)
                               for role, item in zip(("model", "baseline"), subjects)}
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


def record(evaluation, report_path):
    """Append `evaluation` to the report at `report_path` (created as an `eval` report if missing). Returns its
    index in `evaluations`. A compression report's markdown rendering beside it is refreshed too."""
    from ..report.compression import to_markdown
    from ..report.files import append_evaluation

    def rerender(report):
        markdown = os.path.join(os.path.dirname(os.path.abspath(report_path)), "compression_report.md")
        if report.get("kind") == "compress" and os.path.exists(markdown):
            return {"compression_report.md": to_markdown(report)}
        return {}

    return append_evaluation(report_path, evaluation, rerender)
