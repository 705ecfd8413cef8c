"""Renderings of evaluation entries (schema `lowrank.evaluation`, what `lowrank eval` records into a report's
`evaluations`): the lines that say what was measured and how, the metric rows, and the markdown section.

`lowrank eval`'s terminal table, `lowrank report` (table, markdown, JUnit) and the compression report's markdown
all render evaluations through these, so one evaluation reads the same everywhere.
"""

from .format import fmt_change, fmt_number, fmt_percent, fmt_ratio, human_bytes, markdown_table


def evaluation_header(evaluation):
    """Lines that say what was evaluated, on what text, under which protocol."""
    model = evaluation["model"]
    baseline = evaluation.get("baseline")
    data = evaluation["data"]

    def who(info):
        adapter = f" + adapter {info['adapter']}" if info.get("adapter") else ""
        return f"{info['source']}{adapter} ({info['kind']}, {info['dtype']})"

    split = f", split {data['split']}" if data.get("split") else ""
    rows = data.get("documents")
    count = f"{rows:,} row{'' if rows == 1 else 's'}" if isinstance(rows, int) else "? rows"
    lines = [f"model: {who(model)}" + (f" vs baseline {who(baseline)}" if baseline else ""),
             f"data: {data['source']}{split}, {count}, sha256 {data['sha256_text']}",
             f"protocol: {evaluation['protocol']['statement']}",
             f"run: {evaluation.get('created', '?')} on {evaluation.get('device', '?')}"]
    if evaluation.get("agreement_note"):
        lines.append(f"note: {evaluation['agreement_note']}")
    return lines


def _speed_rows(speed):
    """(metric, model, baseline, change) rows of the speed measurement (model against baseline)."""
    rows = []
    model, base = speed.get("model") or {}, speed.get("baseline") or {}

    def rate(label, key):
        rows.append((label, fmt_number(model[key], ".1f"), fmt_number(base.get(key), ".1f"),
                     fmt_ratio(model[key], base.get(key))))

    if model:
        rate(f"prefill tokens/s ({model['prompt_tokens']} tokens, batch 1)", "prefill_tokens_per_s")
        if model.get("decode_tokens_per_s"):
            rate(f"decode tokens/s ({model['decode_tokens']} greedy steps)", "decode_tokens_per_s")
        rows.append(("weights memory", human_bytes(model["weights_bytes"]),
                     human_bytes(base["weights_bytes"]) if base else "",
                     fmt_change(model["weights_bytes"], base.get("weights_bytes"))))
        if model.get("peak_memory_bytes") is not None:
            rows.append(("peak memory (CUDA)", human_bytes(model["peak_memory_bytes"]),
                         human_bytes(base["peak_memory_bytes"]) if base.get("peak_memory_bytes") else "",
                         fmt_change(model["peak_memory_bytes"], base.get("peak_memory_bytes"))))
    return rows


def _task_rows(tasks):
    """(metric, model, baseline, change) rows of the lm-eval tasks (standard errors left out)."""
    rows = []
    for task, metrics in ((tasks.get("model") or {}).get("tasks") or {}).items():
        reference = ((tasks.get("baseline") or {}).get("tasks") or {}).get(task, {})
        for metric, value in metrics.items():
            if "stderr" in metric:
                continue
            other = reference.get(metric)
            delta = f"{value - other:+.4f}" if value is not None and other is not None else ""
            rows.append((f"{task} {metric}", fmt_number(value), fmt_number(other), delta))
    return rows


def evaluation_rows(evaluation):
    """(metric, model, baseline, change) rows of one evaluation."""
    rows = []
    ppl = evaluation.get("perplexity")
    if ppl:
        rows.append(("perplexity", fmt_number(ppl["model"]), fmt_number(ppl.get("baseline")),
                     fmt_percent(ppl.get("increase"), signed=True)))
    agreement = evaluation.get("agreement")
    if agreement:
        rows.append(("KL(baseline || model), mean nats/token", fmt_number(agreement["kl_mean"]), "", ""))
        rows.append(("KL median / p99 / max", " / ".join(fmt_number(agreement[k], ".3g") for k in
                                                         ("kl_median", "kl_p99", "kl_max")), "", ""))
        rows.append(("top-1 agreement", f"{agreement['top1']:.2%}", "", ""))
    embeddings = evaluation.get("embeddings")
    if embeddings:
        rows.append(("pooled-embedding cosine, mean / min",
                     f"{embeddings['cosine_mean']:.4f} / {embeddings['cosine_min']:.4f}", "", ""))
    rows += _speed_rows(evaluation.get("speed") or {})
    rows += _task_rows(evaluation.get("tasks") or {})
    return rows


def evaluations_markdown(evaluations, heading="###"):
    """The most recent evaluation in full (what was measured, on what text, under which protocol); earlier ones
    as one line each."""
    if not evaluations:
        return []
    last = evaluations[-1]
    lines = [f"{heading} Evaluation {len(evaluations)} of {len(evaluations)}", ""]
    lines += [f"- {line}" for line in evaluation_header(last)] + [""]
    lines += markdown_table(("metric", "model", "baseline", "change"), evaluation_rows(last))
    if len(evaluations) > 1:
        lines += ["", "<details><summary>Earlier evaluations</summary>", ""]
        rows = []
        for index, evaluation in enumerate(evaluations[:-1], 1):
            ppl = evaluation.get("perplexity") or {}
            agreement = evaluation.get("agreement") or {}
            rows.append((index, evaluation.get("created", ""), evaluation["data"]["source"],
                         evaluation["protocol"]["seq_len"], evaluation["protocol"]["tokens_scored"],
                         fmt_number(ppl.get("model")), fmt_number(ppl.get("baseline")),
                         fmt_percent(ppl.get("increase"), signed=True), fmt_number(agreement.get("kl_mean")),
                         fmt_percent(agreement.get("top1"))))
        lines += markdown_table(("#", "created", "data", "seq len", "tokens", "ppl", "baseline ppl", "change", "KL",
                                 "top-1"), rows)
        lines += ["", "</details>"]
    return lines
