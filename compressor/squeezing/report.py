"""The squeeze report: squeeze_report.json is the source of truth; squeeze_report.md and the CLI tables render it."""

import json
import math
import os
import time

from ..report.compression import human_bytes, peak_rss_bytes, versions
from .config import POLICY_TEXT
from .ranks import ENERGY_DEFINITION, energy_curve

SCHEMA = "lowrank.squeeze"
SCHEMA_VERSION = 1
WORST = 5
THRESHOLDS = [0.5, 0.8, 0.9, 0.95, 0.99]  # energies the analysis reports the ranks for


def _g(value, digits=6):
    return None if value is None else float(f"{value:.{digits}g}")


def percentile(values, fraction):
    """Nearest-rank percentile (the value below which `fraction` of the values lie), for small lists."""
    ordered = sorted(values)
    return ordered[max(math.ceil(fraction * len(ordered)) - 1, 0)] if ordered else None


def squeeze_layer_entry(job, rank, scale_out, alpha_out, stored_error_sq=None, true_error=None):
    """One module's line: what it was, what it became, and what the truncation kept."""
    sigma = [float(s) for s in job.decomposition.sigma]
    curve = energy_curve(sigma, job.decomposition.total)
    k = min(rank, len(sigma))
    total = job.decomposition.total
    entry = {
        "name": job.name,
        "kind": job.kind,
        "shape": job.shape,
        "rank_before": job.rank_before,
        "rank": rank,
        "alpha_before": job.alpha_before,
        "alpha": alpha_out,
        "scale_before": _g(job.scale_before, 12),
        "scale": _g(scale_out, 12),
        "energy_kept": round(curve[k], 6),
        "rel_error": round(math.sqrt(max(1.0 - curve[k], 0.0)), 6),
        "sigma_1": _g(sigma[0]) if sigma else 0.0,
        "sigma_k": _g(sigma[k - 1]) if k else None,
        "sigma_first_dropped": _g(sigma[k]) if k < len(sigma) else None,
        "params_before": job.params_before,
        "params_after": rank * job.cost,
    }
    if not total > 0:
        entry["zero_update"] = True
    if stored_error_sq is not None:
        entry["stored_rel_error"] = round(math.sqrt(stored_error_sq / total), 6) if total > 0 else 0.0
    if job.dora:
        entry["dora"] = True
        if true_error is not None:
            entry["dora_true_rel_error"] = round(true_error, 6)
    return entry


def totals(layers, bytes_before=None, bytes_after=None):
    energies = [layer["energy_kept"] for layer in layers]
    before = sum(layer["params_before"] for layer in layers)
    after = sum(layer["params_after"] for layer in layers)
    ranks = [layer["rank"] for layer in layers]
    worst = sorted(layers, key=lambda layer: (layer["energy_kept"], layer["name"]))[:WORST]
    return {
        "modules": len(layers),
        "params_before": before,
        "params_after": after,
        "params_kept": round(after / before, 6) if before else 1.0,
        "bytes_before": bytes_before,
        "bytes_after": bytes_after,
        "energy_kept": {"mean": round(sum(energies) / len(energies), 6) if energies else None,
                        "min": min(energies, default=None), "p10": percentile(energies, 0.1)},
        "rank": {"min": min(ranks, default=None), "max": max(ranks, default=None),
                 "mean": round(sum(ranks) / len(ranks), 3) if ranks else None},
        "worst": [{"name": layer["name"], "rank": layer["rank"], "energy_kept": layer["energy_kept"],
                   "rel_error": layer["rel_error"]} for layer in worst],
    }


def analysis(jobs, thresholds):
    """What uniform ranks and energy thresholds would keep: rank -> mean/min/p10 energy and parameters, and for each
    threshold the smallest uniform rank whose WORST module reaches it (the mean hides weak modules)."""
    curves = [energy_curve([float(s) for s in job.decomposition.sigma], job.decomposition.total) for job in jobs]
    top = max(len(curve) - 1 for curve in curves)
    ks = sorted({2**i for i in range(int(math.log2(top)) + 1)} | {top})
    rows = []
    for k in ks:
        energies = [curve[min(k, len(curve) - 1)] for curve in curves]
        rows.append({"rank": k, "energy_mean": round(sum(energies) / len(energies), 6),
                     "energy_min": round(min(energies), 6), "energy_p10": round(percentile(energies, 0.1), 6),
                     "params": sum(min(k, len(c) - 1) * job.cost for c, job in zip(curves, jobs))})
    needed = []
    for threshold in thresholds:
        uniform = next((k for k in range(1, top + 1)
                        if all(c[min(k, len(c) - 1)] >= threshold - 1e-12 for c in curves)), None)
        per_module = [next((k for k in range(1, len(c)) if c[k] >= threshold - 1e-12), len(c) - 1) for c in curves]
        needed.append({"energy": threshold, "uniform_rank_for_worst_module": uniform,
                       "per_module_params": sum(k * job.cost for k, job in zip(per_module, jobs)),
                       "per_module_rank_max": max(per_module)})
    return {"ranks": rows, "thresholds": needed,
            "spectra": {job.name: [_g(float(s), 5) for s in job.decomposition.sigma] for job in jobs}}


def build(*, command, source, rule, algorithm, scaling, layers, output, bytes_before, bytes_after, warnings,
          timings, dora=None, extra=None):
    report = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "kind": "squeeze",
        "versions": versions(),
        "command": command,
        "source": source,
        "output": output,
        "rule": rule,
        "energy_definition": ENERGY_DEFINITION,
        "algorithm": algorithm,
        "scaling": scaling,
        "totals": totals(layers, bytes_before, bytes_after),
        "layers": {"list": layers},
        "warnings": warnings,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "peak_rss_bytes": peak_rss_bytes(),
        "evaluations": [],
    }
    if dora:
        report["dora"] = dora
    report.update(extra or {})
    return report


def source_info(source, jobs):
    """The report's source block for an adapter (formats.Adapter)."""
    ranks = [job.rank_before for job in jobs]
    info = {"path": source.path, "format": source.format, "modules": len(jobs), "rank_min": min(ranks),
            "rank_max": max(ranks), "weights": os.path.basename(source.weights),
            "dora_modules": sum(job.dora for job in jobs)}
    if source.format == "peft":
        info.update(r=source.config["r"], lora_alpha=source.config["lora_alpha"], use_rslora=source.use_rslora,
                    use_dora=source.use_dora, subfolder=source.subfolder,
                    rank_pattern=bool(source.config.get("rank_pattern")),
                    alpha_pattern=bool(source.config.get("alpha_pattern")))
    return info


def rule_info(plan):
    return {"name": plan.rule, "value": plan.value, "max_rank": plan.max_rank, "min_rank": plan.min_rank,
            "min_energy": plan.min_energy, "allow_pad": plan.allow_pad}


def algorithm_info(plan):
    import torch

    info = {"name": plan.algorithm, "threads": plan.workers, "torch_threads": torch.get_num_threads()}
    if plan.algorithm == "rsvd":
        info.update(oversample=plan.oversample, power_iters=plan.power_iters, seed=plan.seed)
    else:
        info["method"] = "QR (CholeskyQR, float64 Gram) of B and A^T, SVD of the r x r core in float64"
    return info


def scaling_info(layers, plan, notes, peft=True):
    scales = {layer["scale"] for layer in layers}
    uniform = len(scales) == 1
    info = {"policy": plan.policy, "definition": POLICY_TEXT[plan.policy], "uniform": uniform,
            "scale": next(iter(scales)) if uniform else None,
            "description": plan.policy + (f": scale {next(iter(scales)):g} in every module" if uniform
                                          else ": the scale differs between modules")}
    if peft and not uniform and not any("scale differs" in w for w in notes.warnings):
        notes.warnings.append("the scale differs between modules: consumers that ignore rank_pattern / "
                              "alpha_pattern (vLLM) will mis-scale some of them; the default keep-scale or unit "
                              "policies keep it uniform")
    return info


def analysis_report(info, jobs, plan, command, timings, started):
    """--analyze without a rule: the spectra of every module, nothing written."""
    timings["total"] = time.perf_counter() - started
    return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "kind": "squeeze", "mode": "analyze",
            "versions": versions(), "command": command, "source": info, "algorithm": algorithm_info(plan),
            "analysis": analysis(jobs, THRESHOLDS), "output": None,
            "timings_s": {k: round(v, 3) for k, v in timings.items()}, "evaluations": []}


def describe_rule(rule):
    name, value = rule["name"], rule["value"]
    if name == "rank":
        text = f"uniform rank {value}" + (" (zero-padded where above the source)" if rule.get("allow_pad") else "")
    elif name == "energy":
        text = f"per-module energy >= {value:g}"
    elif name == "budget":
        text = f"global budget {value:,} parameters"
    else:
        return "analysis only"
    if rule.get("max_rank"):
        text += f", max rank {rule['max_rank']}"
    if name in ("energy", "budget") and rule.get("min_rank", 1) > 1:
        text += f", min rank {rule['min_rank']}"
    if rule.get("min_energy"):
        text += f", min energy {rule['min_energy']:g}"
    return text


def squeeze_summary_rows(report):
    t = report["totals"]
    e = t["energy_kept"]
    src = report["source"]
    source_rank = ("dense" if src.get("rank_min") is None
                   else "rank " + _range(src.get("rank_min"), src.get("rank_max")))
    rows = [
        ("source", f"{src['path']} ({src['format']}, {t['modules']} modules, {source_rank})"),
        ("rule", describe_rule(report["rule"])),
        ("algorithm", report["algorithm"]["name"]),
        ("ranks", f"{_range(t['rank']['min'], t['rank']['max'])} (mean {t['rank']['mean']})"),
        ("LoRA parameters", f"{t['params_before']:,} -> {t['params_after']:,} (kept {t['params_kept']:.1%})"),
        ("energy kept", f"mean {e['mean']:.4f}, min {e['min']:.4f}, p10 {e['p10']:.4f}"),
        ("scaling", report["scaling"]["description"]),
    ]
    if t["bytes_before"] is not None and t["bytes_after"] is not None:
        rows.insert(5, ("size", f"{human_bytes(t['bytes_before'])} -> {human_bytes(t['bytes_after'])}"))
    if report.get("dora"):
        rows.append(("DoRA", report["dora"]["note"]))
    return rows


def _range(low, high):
    return f"{low}" if low == high else f"{low}-{high}"


def squeeze_markdown(report, worst=20):
    lines = ["# lowrank squeeze report", "", f"`{report['command']}`", "", "| | |", "|---|---|"]
    lines += [f"| {label} | {value} |" for label, value in squeeze_summary_rows(report)]
    lines += ["", f"Energy: {report['energy_definition']}.", ""]
    for warning in report["warnings"]:
        lines.append(f"- warning: {warning}")
    layers = sorted(report["layers"]["list"], key=lambda layer: (layer["energy_kept"], layer["name"]))
    lines += ["", f"## Modules, least energy kept first ({min(worst, len(layers))} of {len(layers)})", "",
              "| module | shape | rank | alpha | scale | energy kept | rel. error | sigma_1 | sigma_k "
              "| first dropped |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for layer in layers[:worst]:
        before = "dense" if layer["rank_before"] is None else layer["rank_before"]
        lines.append(
            f"| {layer['name']} | {'x'.join(map(str, layer['shape']))} | {before} -> {layer['rank']} "
            f"| {_num(layer['alpha_before'])} -> {layer['alpha']} "
            f"| {_num(layer['scale_before'])} -> {layer['scale']:g} "
            f"| {layer['energy_kept']:.4f} | {layer['rel_error']:.4f} | {layer['sigma_1']:.4g} "
            f"| {_num(layer['sigma_k'])} | {_num(layer['sigma_first_dropped'])} |")
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), ""]
    return "\n".join(lines)


def _num(value):
    return "-" if value is None else f"{value:.4g}"


def write_report_files(report, directory, stem="squeeze_report"):
    """<stem>.json (the source of truth) and <stem>.md in `directory`."""
    _write_text(os.path.join(directory, f"{stem}.json"), json.dumps(report, indent=2) + "\n")
    _write_text(os.path.join(directory, f"{stem}.md"), squeeze_markdown(report))


def _write_text(path, text):
    with open(path, "w") as f:
        f.write(text)
