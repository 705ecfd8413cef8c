"""Pass/fail gates over a run, like coverage's --fail-under: each threshold becomes one line with its value.

A gate whose metric the report does not have (no evaluation yet, no baseline, no layers, no size) is "missing",
never a pass: the report is incomplete for that question. Values are compared unrounded, and a failing value is
printed with as many digits as it takes to differ from the threshold (no "70% fails --fail-under 70%").
"""

import math
from dataclasses import dataclass

from ..errors import UsageError
from ..units import parse_size
from .format import human_bytes
from .summary import DAMAGE, damaged, decomposed_layers, latest


@dataclass(frozen=True)
class Spec:
    option: str  # the command-line option, without dashes
    metric: str  # what is measured, in words
    op: str  # "<=" or ">="
    unit: str  # "fraction" (written 10% or 0.10), "number" or "bytes"
    per_layer: bool = False


SPECS = {spec.option: spec for spec in [
    Spec("max-ppl-increase", "perplexity increase over the baseline", "<=", "fraction"),
    Spec("max-ppl", "perplexity", "<=", "number"),
    Spec("min-top1-agreement", "top-1 agreement with the baseline", ">=", "fraction"),
    Spec("max-kl", "mean KL divergence from the baseline (nats/token)", "<=", "number"),
    Spec("min-cosine", "mean pooled-embedding cosine similarity with the baseline", ">=", "number"),
    Spec("max-size", "size on disk", "<=", "bytes"),
    Spec("max-kept", "fraction of parameters kept", "<=", "fraction"),
    Spec("min-energy", "energy kept, every layer", ">=", "fraction", per_layer=True),
    Spec("max-rel-error", "relative error, every layer", "<=", "number", per_layer=True),
]}


@dataclass
class Gate:
    spec: Spec
    threshold: float
    text: str  # the threshold as the user wrote it


def parse_gate(option, text):
    """A Gate from `--OPTION TEXT`; a malformed threshold is a usage error (exit 2)."""
    spec = SPECS[option]
    raw = str(text).strip()
    try:
        if spec.unit == "bytes":

            value = parse_size(raw)
        elif spec.unit == "fraction" and raw.endswith("%"):
            value = float(raw[:-1]) / 100
        else:
            value = float(raw)
    except ValueError:
        raise UsageError(f"--{option} {text!r}: not a number") from None
    if not math.isfinite(value) or value < 0:
        raise UsageError(f"--{option} {text!r}: must be a finite number >= 0")
    if spec.unit == "fraction" and not raw.endswith("%") and value > 1:
        raise UsageError(f"--{option} {text!r} is ambiguous: write a percentage ({raw}%) or a fraction "
                         f"({value / 100:g})")
    if option in ("min-top1-agreement", "max-kept", "min-energy") and value > 1:
        raise UsageError(f"--{option} {text!r}: a fraction cannot exceed 100%")
    return Gate(spec, value, raw)


def show(value, unit, digits=None):
    if unit == "bytes":
        return human_bytes(value) if digits is None else f"{value:,.0f} B"
    if unit == "fraction":
        return f"{value * 100:.{2 if digits is None else digits}f}%"
    return f"{value:.{4 if digits is None else digits}g}"


def _shown(value, gate, passed):
    """`value` as text, with enough digits that a failing value never reads like the threshold itself."""
    unit, digits = gate.spec.unit, None
    text = show(value, unit)
    while not passed and text == show(gate.threshold, unit, digits) and (digits or 0) < 16:
        digits = 3 if digits is None else digits + 1
        text = show(value, unit, digits)
    return text


def _evaluation_metric(option):
    return {
        "max-ppl-increase": lambda e: (e.get("perplexity") or {}).get("increase"),
        "max-ppl": lambda e: (e.get("perplexity") or {}).get("model"),
        "min-top1-agreement": lambda e: (e.get("agreement") or {}).get("top1"),
        "max-kl": lambda e: (e.get("agreement") or {}).get("kl_mean"),
        "min-cosine": lambda e: (e.get("embeddings") or {}).get("cosine_mean"),
    }.get(option)


def _missing_evaluation(option, run):
    what = {"max-ppl-increase": "a perplexity evaluation against a baseline",
            "max-ppl": "a perplexity evaluation",
            "min-top1-agreement": "an evaluation against a baseline with the same tokenizer",
            "max-kl": "an evaluation against a baseline with the same tokenizer",
            "min-cosine": "an embedding evaluation (an encoder against a baseline)"}[option]
    baseline = " --baseline BASE" if option != "max-ppl" else ""
    have = f"its {len(run['evaluations'])} evaluation(s) have none" if run["evaluations"] else "it has no evaluation"
    return f"needs {what}, and {have}: run lowrank eval{baseline} first"


def _value(gate, run):
    """(value, where it came from, failing layer names) or (None, why it is missing, None)."""
    option, summary = gate.spec.option, run["summary"]
    metric = _evaluation_metric(option)
    if metric is not None:
        index, evaluation = latest(run, metric)
        if evaluation is None:
            return None, _missing_evaluation(option, run), None
        data, protocol = evaluation["data"], evaluation["protocol"]
        origin = (f"evaluation {index + 1} of {len(run['evaluations'])} ({evaluation.get('created', '?')}: "
                  f"{data['source']} sha256 {data['sha256_text'][:12]}, {protocol['tokens_scored']:,} tokens in "
                  f"{protocol['windows']:,} windows of {protocol['seq_len']:,})")
        return metric(evaluation), origin, None
    if option == "max-size":
        if summary["bytes_after"] is None:
            return None, "needs the size of the output, and the report records none", None
        return summary["bytes_after"], "size of the weights on disk", None
    if option == "max-kept":
        kept = summary["model_params_kept"] if summary["model_params_kept"] is not None else summary["params_kept"]
        if kept is None:
            return None, "needs parameter counts before and after, and the report has none", None
        where = "whole model" if summary["model_params_kept"] is not None else "listed layers"
        return kept, where, None
    layers = decomposed_layers(run["layers"])
    if not layers:
        return None, "needs per-layer results, and the report lists no decomposed layer", None
    key = "energy_kept" if option == "min-energy" else "rel_error"
    worst = min(layer[key] for layer in layers) if option == "min-energy" else max(layer[key] for layer in layers)
    failing = [layer["name"] for layer in layers if not _passes(layer[key], gate)]
    return worst, f"worst of {len(layers)} layers", failing


def _passes(value, gate):
    return value <= gate.threshold if gate.spec.op == "<=" else value >= gate.threshold


def check(gates, run):
    """One result dict per gate: option, metric, op, threshold(_text), value(_text), status, message."""
    results = []
    for gate in gates:
        try:
            value, origin, failing = _value(gate, run)
            if value is not None:
                _passes(value, gate)
        except DAMAGE as error:  # a malformed optional field the gate reads: the report is damaged
            raise damaged(run.get("report_file", run.get("path")), error) from None
        result = {"option": gate.spec.option, "metric": gate.spec.metric, "op": gate.spec.op,
                  "threshold": gate.threshold, "threshold_text": gate.text, "value": value, "value_text": None,
                  "status": "missing", "source": origin if value is not None else None, "failing_layers": failing}
        if value is None:
            result["message"] = f"--{gate.spec.option} {gate.text}: {origin}"
        else:
            passed = _passes(value, gate)
            result["status"] = "pass" if passed else "fail"
            result["value_text"] = _shown(value, gate, passed)
            op = gate.spec.op if passed else {"<=": ">", ">=": "<"}[gate.spec.op]
            message = f"{gate.spec.metric} {result['value_text']} {op} {gate.text} (--{gate.spec.option})"
            if failing:
                message += f"; failing layers ({len(failing)}): " + ", ".join(failing[:10]) + \
                    (" ..." if len(failing) > 10 else "")
            result["message"] = message + f"; from {origin}"
        results.append(result)
    return results


def status(results):
    """("pass" | "fail" | "incomplete" | "no-gates", exit code). An incomplete report outranks a failed gate:
    until every gate can be evaluated, the run's verdict is unknown (exit 3)."""
    if not results:
        return "no-gates", 0
    if any(r["status"] == "missing" for r in results):
        return "incomplete", 3
    if any(r["status"] == "fail" for r in results):
        return "fail", 1
    return "pass", 0
