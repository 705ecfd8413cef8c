"""One view of any lowrank report (compress, squeeze, compensate, eval): what `lowrank report` renders and gates.

`make_run(path, report_file, report)` turns the report of a checkpoint directory, an adapter directory or a report
file, and returns a "run": the report's common fields (the report contract, described in report/schema.py),
summary statistics over its layers, its size, whether the directory is a densified checkpoint, and its
evaluations. Kind-specific fields are kept where the report has them and rendered only then.
"""

import json
import os

from .compression import compression_rows
from .format import human_bytes

DENSIFY_MARKER = "lowrank_densified"  # the config.json block lowrank densify writes
JSON_SCHEMA = "lowrank.report"  # `lowrank report --format json`, documented in README "Report and CI gates"
JSON_SCHEMA_VERSION = 1
RUN_FIELDS = ("path", "report_file", "schema", "schema_version", "kind", "command", "versions", "method", "summary",
              "calibration", "densified", "layers", "evaluations")


def quantile(values, q):
    """Linear-interpolation quantile of a list of numbers."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


def _fraction(after, before):
    return after / before if before else None


def _method(report):
    """compress: method.name; compensate: method (text); squeeze: algorithm.name."""
    for key in ("method", "algorithm"):
        value = report.get(key)
        if isinstance(value, dict) and isinstance(value.get("name"), str):
            return value["name"]
        if isinstance(value, str):
            return value
    return None


def _size(report):
    """(bytes before, bytes after): compress writes size.bytes_dense/bytes_after, compensate size.bytes, squeeze
    totals.bytes_before/bytes_after."""
    size = report.get("size") if isinstance(report.get("size"), dict) else {}
    totals = report.get("totals") if isinstance(report.get("totals"), dict) else {}
    after = size.get("bytes_after", size.get("bytes", totals.get("bytes_after")))
    before = size.get("bytes_dense", size.get("bytes_before", totals.get("bytes_before")))
    return (before if isinstance(before, (int, float)) else None), (after if isinstance(after, (int, float)) else None)


def _densified(directory):
    """The densify marker of the checkpoint in `directory`, with the bytes its weights take on disk, or None."""
    path = os.path.join(directory, "config.json")
    try:
        with open(path) as f:
            marker = json.load(f).get(DENSIFY_MARKER)
    except (OSError, ValueError, AttributeError):
        return None
    return marker if isinstance(marker, dict) else None


def worst_first(layers):
    """Layers ordered worst first: highest relative error, then lowest energy kept, then name."""
    return sorted(layers, key=lambda layer: (-layer["rel_error"], layer["energy_kept"], layer["name"]))


def decomposed_layers(layers):
    """The layers that were decomposed (compress lists layers it kept dense too; they lose nothing)."""
    return [layer for layer in layers if not layer.get("dense") and layer.get("rank") is not None]


def summarize(report):
    """Summary statistics of a validated report (kind-independent, from the contract fields)."""
    layers = report["layers"]["list"]
    decomposed = decomposed_layers(layers)
    before = sum(layer["params_before"] for layer in layers)
    after = sum(layer["params_after"] for layer in layers)
    bytes_before, bytes_after = _size(report)
    summary = {
        "layers": len(layers), "decomposed": len(decomposed), "params_before": before, "params_after": after,
        "params_kept": _fraction(after, before), "model_params_before": None, "model_params_after": None,
        "model_params_kept": None, "bytes_before": bytes_before, "bytes_after": bytes_after,
        "energy_kept_mean": None, "energy_kept_min": None, "energy_kept_p10": None, "rel_error_mean": None,
        "rel_error_max": None, "worst_layer": None,
    }
    model = report.get("ratio", {}).get("model") if isinstance(report.get("ratio"), dict) else None
    if isinstance(model, dict) and "params_before" in model:
        summary.update(model_params_before=model["params_before"], model_params_after=model["params_after"],
                       model_params_kept=_fraction(model["params_after"], model["params_before"]))
    if decomposed:
        energy = [layer["energy_kept"] for layer in decomposed]
        error = [layer["rel_error"] for layer in decomposed]
        summary.update(energy_kept_mean=sum(energy) / len(energy), energy_kept_min=min(energy),
                       energy_kept_p10=quantile(energy, 0.1), rel_error_mean=sum(error) / len(error),
                       rel_error_max=max(error), worst_layer=worst_first(decomposed)[0]["name"])
    return summary


# What a report that passes the contract check can still get wrong in the fields the renderers read (a field
# the contract leaves optional, of the wrong type or shape): a damaged report, not a bug of lowrank report.
DAMAGE = (KeyError, TypeError, AttributeError, ValueError, IndexError, ZeroDivisionError, OverflowError)


def damaged(report_file, error):
    from ..errors import ReportError

    detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return ReportError(f"{report_file} is damaged: a field lowrank report reads is missing or malformed "
                       f"({type(error).__name__}: {detail[:200]!r})")


def make_run(path, report_file, report):
    directory = os.path.dirname(os.path.abspath(report_file))
    summary = summarize(report)
    densified = _densified(directory)
    if densified is not None:
        # The directory holds the dense product, not the factors: its size is what is on disk now.
        summary["bytes_after"] = densified.get("bytes", summary["bytes_after"])
    return {
        "path": path, "report_file": report_file, "directory": directory, "schema": report["schema"],
        "schema_version": report["schema_version"], "kind": report["kind"], "command": report["command"],
        "versions": report["versions"], "method": _method(report), "summary": summary,
        "calibration": report.get("calibration") if isinstance(report.get("calibration"), dict) else None,
        "densified": densified, "layers": worst_first(report["layers"]["list"]),
        "evaluations": report["evaluations"], "report": report,
    }


def _flat(value):
    """A field as one line: scalars as they are, a dict as "key value" pairs of its scalars."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (str, int, bool)):
        return value
    if isinstance(value, dict):
        parts = [f"{k.replace('_', ' ')} {_flat(v)}" for k, v in value.items() if isinstance(v, (str, int, float))]
        return ", ".join(parts) or None
    return None


def _details(report):
    """Kind-specific summary fields worth a line each (only those the report has)."""
    details = {}
    if isinstance(report.get("ratio"), dict) and "requested" in report["ratio"]:
        details["ratio requested"] = f"{report['ratio']['requested']:g} ({report['ratio'].get('definition', '')})"
    for key in ("original", "compressed", "source", "base_model", "rank", "merged", "rule", "algorithm", "scaling",
                "energy_definition"):
        line = _flat(report.get(key))
        if line is not None and line != "":
            details[key.replace("_", " ")] = line
    for block in ("summary", "totals"):  # compensate's summary, squeeze's totals
        values = report.get(block)
        for key, value in (values.items() if isinstance(values, dict) else ()):
            line = _flat(value)
            if line not in (None, "") and not key.startswith("bytes"):
                label = key.replace("_", " ")
                details[label if block == "summary" else f"{block}: {label}"] = line
    return details


def latest(run, needs):
    """(index, evaluation) of the most recent evaluation for which `needs(evaluation)` is not None, or (None, None)."""
    for index in range(len(run["evaluations"]) - 1, -1, -1):
        evaluation = run["evaluations"][index]
        if needs(evaluation) is not None:
            return index, evaluation
    return None, None


def describe_calibration(calibration):
    """The calibration line of any report kind: whatever provenance it recorded (source, windows, seed, text
    hash), or None without one. A compress run shows its report's own row instead (compression_calibration)."""
    if not calibration:
        return None
    parts = [str(calibration.get("source", "?"))]
    if calibration.get("num_samples") and calibration.get("seq_len"):
        parts.append(f"{calibration['num_samples']} x {calibration['seq_len']} tokens")
    if "seed" in calibration:
        parts.append(f"seed {calibration['seed']}")
    if calibration.get("sha256_text"):
        parts.append(f"text sha256 {calibration['sha256_text'][:12]}")
    return ", ".join(parts)


def _compression_rows(report):
    """The compression report's own summary rows (compression.compression_rows), or None if it lacks a field."""
    try:
        return compression_rows(report)
    except (KeyError, TypeError, ValueError):
        return None


def run_rows(run):
    """(label, value) rows of a run's summary, shared by `lowrank report`'s table, markdown and JUnit output."""
    s = run["summary"]
    rows = [("report", f"{run['report_file']} ({run['schema']} v{run['schema_version']}, kind {run['kind']})")]
    own = _compression_rows(run["report"]) if run["kind"] == "compress" else None
    if own:
        rows += own
    else:
        if run["method"]:
            rows.append(("method", run["method"]))
        rows += [(label, value) for label, value in _details(run["report"]).items()]
        if s["layers"]:
            kept = f", kept {s['params_kept']:.1%}" if s["params_kept"] is not None else ""
            rows.append(("listed layers", f"{s['layers']} ({s['decomposed']} with a rank): {s['params_before']:,} "
                                          f"-> {s['params_after']:,} params{kept}"))
        if s["bytes_after"] is not None:
            before = f"{human_bytes(s['bytes_before'])} -> " if s["bytes_before"] else ""
            rows.append(("size", before + human_bytes(s["bytes_after"])))
        calibration = describe_calibration(run["calibration"])
        if calibration:
            rows.append(("calibration", calibration))
    if s["energy_kept_mean"] is not None:
        rows.append(("energy kept per layer", f"mean {s['energy_kept_mean']:.4f}, min {s['energy_kept_min']:.4f}, "
                                              f"10th percentile {s['energy_kept_p10']:.4f}"))
        rows.append(("rel. error per layer", f"mean {s['rel_error_mean']:.4f}, max {s['rel_error_max']:.4f} "
                                             f"({s['worst_layer']})"))
    if run["densified"]:
        d = run["densified"]
        rows.append(("densified", f"yes: a plain {', '.join(d.get('architectures') or [])} checkpoint without custom "
                                  f"code, {human_bytes(s['bytes_after'])}, made by lowrank densify from "
                                  f"{d.get('source')}"))
    rows.append(("evaluations", str(len(run["evaluations"]))))
    rows.append(("versions", ", ".join(f"{k} {v}" for k, v in run["versions"].items())))
    return rows


def _latest_metrics(run):
    evaluation = run["evaluations"][-1] if run["evaluations"] else {}
    ppl, agreement = evaluation.get("perplexity") or {}, evaluation.get("agreement") or {}
    return {"perplexity": ppl.get("model"), "ppl_increase": ppl.get("increase"), "kl_mean": agreement.get("kl_mean"),
            "top1_agreement": agreement.get("top1")}


def to_json(runs, results, verdict, exit_code):
    """The `lowrank.report` v1 document: the runs (worst-first layers, all evaluations), the gates, the verdict,
    and for two runs the change of every numeric summary field and latest-evaluation metric from A to B."""
    document = {"schema": JSON_SCHEMA, "schema_version": JSON_SCHEMA_VERSION, "status": verdict,
                "exit_code": exit_code, "gates": results, "runs": [{k: run[k] for k in RUN_FIELDS} for run in runs],
                "comparison": None}
    if len(runs) == 2:
        first, second = ({**run["summary"], **_latest_metrics(run)} for run in runs)
        document["comparison"] = {
            key: {"a": first[key], "b": second[key],
                  "change": second[key] - first[key] if None not in (first[key], second[key]) else None}
            for key in first if isinstance(first[key], (int, float)) or isinstance(second[key], (int, float))}
    return document
