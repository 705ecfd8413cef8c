"""GitHub-flavoured markdown of one run or two runs side by side, fit for $GITHUB_STEP_SUMMARY.

GitHub refuses a step summary over 1 MiB, so `report_markdown(..., limit=...)` shortens the collapsed per-layer
table (worst layers are kept) until the document fits, and says how many layers it left out. Long tables sit in
<details> blocks so the summary page stays readable.
"""

from .evaluations import evaluations_markdown
from .format import fmt_number, human_bytes, markdown_table
from .summary import run_rows

STEP_SUMMARY_LIMIT = 1024 * 1024  # bytes GitHub accepts per step summary
TOP = 10  # layers shown open; the rest are collapsed
ICONS = {"pass": "✅", "fail": "❌", "missing": "⚠️"}


def gates_markdown(results, verdict):
    if not results:
        return []
    failed = sum(r["status"] == "fail" for r in results)
    missing = sum(r["status"] == "missing" for r in results)
    headline = {"pass": f"✅ all {len(results)} gates passed",
                "fail": f"❌ {failed} of {len(results)} gates failed",
                "incomplete": f"⚠️ report incomplete: {missing} of {len(results)} gates cannot be checked"
                              + (f", {failed} failed" if failed else "")}[verdict]
    rows = [(f"--{r['option']}", r["metric"], r["value_text"] or "missing", f"{r['op']} {r['threshold_text']}",
             f"{ICONS[r['status']]} {r['status']}") for r in results]
    lines = [f"**{headline}**", ""] + markdown_table(("gate", "metric", "value", "threshold", "result"), rows)
    notes = [f"- {ICONS[r['status']]} {r['message']}" for r in results if r["status"] != "pass"]
    return lines + ([""] + notes if notes else [])


def layer_header(layers):
    """(whether any layer has a shape, the extra columns, the header) of a per-layer table."""
    has_shape = any("shape" in layer for layer in layers)
    extra = extra_columns(layers)
    return has_shape, extra, (["layer"] + (["shape"] if has_shape else []) +
                              ["rank", "params kept", "energy kept", "rel. error"] + extra)


KNOWN = {"name", "shape", "rank", "dense", "params_before", "params_after", "energy_kept", "rel_error",
         "predicted_energy_kept", "dense_reason", "info"}


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def extra_columns(layers):
    """Kind-specific numeric per-layer fields (e.g. compensate's error_before, squeeze's sigmas), in the order the
    report writes them: those every layer has, as a number or null, and at least one as a number."""
    if not layers:
        return []
    common = set.intersection(*(set(layer) for layer in layers)) - KNOWN
    return [key for key in layers[0] if key in common and all(_number(layer[key]) or layer[key] is None
                                                             for layer in layers)
            and any(_number(layer[key]) for layer in layers)]


def layer_row(layer, has_shape, extra):
    kept = f"{layer['params_after'] / layer['params_before']:.1%}" if layer["params_before"] else \
        f"+{layer['params_after']:,}"
    rank = "dense" if layer.get("dense") or layer["rank"] is None else layer["rank"]
    row = [layer["name"]] + (["x".join(map(str, layer.get("shape", [])))] if has_shape else [])
    row += [rank, kept, f"{layer['energy_kept']:.4f}", f"{layer['rel_error']:.4f}"]
    return row + [fmt_number(layer[key]) for key in extra]


def layers_markdown(layers, heading, top=TOP, collapsed_limit=None):
    """The `top` worst layers open, every layer (or the worst `collapsed_limit`) in a <details> block."""
    if not layers:
        return []
    has_shape, extra, header = layer_header(layers)
    rows = [layer_row(layer, has_shape, extra) for layer in layers]
    lines = [f"{heading} Layers, worst first ({min(top, len(rows))} of {len(rows)})", ""]
    lines += markdown_table(header, rows[:top])
    if len(rows) > top:
        shown = rows if collapsed_limit is None else rows[:collapsed_limit]
        lines += ["", f"<details><summary>All {len(rows)} layers, worst first</summary>", ""]
        lines += markdown_table(header, shown)
        if len(shown) < len(rows):
            lines += ["", f"{len(rows) - len(shown)} more layers are left out to keep this summary under GitHub's "
                          "1 MiB limit; the report JSON has them all."]
        lines += ["", "</details>"]
    return lines


def _run_markdown(run, top, collapsed_limit, heading="###"):
    lines = [f"{heading} Summary", ""] + markdown_table(("", ""), run_rows(run)) + [""]
    lines += evaluations_markdown(run["evaluations"], heading)
    if run["evaluations"]:
        lines.append("")
    lines += layers_markdown(run["layers"], heading, top, collapsed_limit)
    return lines


def comparison_rows(first, second):
    """(metric, A, B, change) rows of two runs' summaries and latest evaluations."""
    def pair(label, a, b, fmt, change="relative"):
        if a is None and b is None:
            return None
        delta = ""
        if a is not None and b is not None:
            delta = f"{b / a - 1:+.2%}" if change == "relative" and a else f"{b - a:+.4g}"
        return (label, "" if a is None else fmt(a), "" if b is None else fmt(b), delta)

    s1, s2 = first["summary"], second["summary"]
    rows = [("kind / method", *(f"{run['kind']} / {run['method'] or ''}" for run in (first, second)), "")]
    rows.append(pair("params (listed layers)", s1["params_after"], s2["params_after"], lambda v: f"{v:,}"))
    rows.append(pair("params (whole model)", s1["model_params_after"], s2["model_params_after"], lambda v: f"{v:,}"))
    rows.append(pair("size", s1["bytes_after"], s2["bytes_after"], human_bytes))
    rows.append(pair("energy kept, mean", s1["energy_kept_mean"], s2["energy_kept_mean"], lambda v: f"{v:.4f}",
                     "absolute"))
    rows.append(pair("energy kept, min", s1["energy_kept_min"], s2["energy_kept_min"], lambda v: f"{v:.4f}",
                     "absolute"))
    rows.append(pair("rel. error, max", s1["rel_error_max"], s2["rel_error_max"], lambda v: f"{v:.4f}", "absolute"))
    e1 = first["evaluations"][-1] if first["evaluations"] else {}
    e2 = second["evaluations"][-1] if second["evaluations"] else {}
    p1, p2 = e1.get("perplexity") or {}, e2.get("perplexity") or {}
    a1, a2 = e1.get("agreement") or {}, e2.get("agreement") or {}
    rows.append(pair("perplexity (latest evaluation)", p1.get("model"), p2.get("model"), lambda v: f"{v:.4g}"))
    rows.append(pair("perplexity increase vs baseline", p1.get("increase"), p2.get("increase"),
                     lambda v: f"{v:+.2%}", "absolute"))
    rows.append(pair("KL mean", a1.get("kl_mean"), a2.get("kl_mean"), lambda v: f"{v:.4g}", "absolute"))
    rows.append(pair("top-1 agreement", a1.get("top1"), a2.get("top1"), lambda v: f"{v:.2%}", "absolute"))
    protocols = [e.get("protocol", {}).get("statement") for e in (e1, e2) if e]
    if len(protocols) == 2 and (protocols[0] != protocols[1] or e1["data"]["sha256_text"] != e2["data"]["sha256_text"]):
        rows.append(("warning", "the latest evaluations used different text or protocol", "", ""))
    return [row for row in rows if row is not None]


def comparison_layers(first, second, top):
    """Layers both runs list, worst first by the second run, with both runs' values."""
    by_name = {layer["name"]: layer for layer in first["layers"]}
    rows = []
    for layer in second["layers"]:
        other = by_name.get(layer["name"])
        if other is None:
            continue
        rows.append((layer["name"], other["rank"], layer["rank"], f"{other['energy_kept']:.4f}",
                     f"{layer['energy_kept']:.4f}", f"{other['rel_error']:.4f}", f"{layer['rel_error']:.4f}"))
    return rows[:top], len(rows)


def report_markdown(runs, results, verdict, top=TOP, limit=None):
    """The whole `lowrank report` document: the gates, then one run or two side by side. With `limit` (bytes), the
    collapsed layer tables shrink until it fits."""
    def render(collapsed_limit):
        lines = ["## lowrank report: " + " vs ".join(f"`{run['path']}`" for run in runs), ""]
        if results:
            lines += gates_markdown(results, verdict) + [""]
        if len(runs) == 1:
            lines += _run_markdown(runs[0], top, collapsed_limit)
        else:
            first, second = runs
            lines += ["### Side by side", "", f"A = `{first['path']}`, B = `{second['path']}`", ""]
            lines += markdown_table(("", "A", "B", "change"), comparison_rows(first, second)) + [""]
            rows, total = comparison_layers(first, second, top)
            if rows:
                lines += [f"### Layers, worst first in B ({len(rows)} of {total} in both)", ""]
                lines += markdown_table(("layer", "rank A", "rank B", "energy A", "energy B", "error A", "error B"),
                                        rows)
                lines.append("")
            for name, run in zip("AB", runs):
                lines += [f"<details><summary>{name}: {run['path']}</summary>", ""]
                lines += _run_markdown(run, top, collapsed_limit, heading="####") + ["", "</details>", ""]
        return "\n".join(lines).rstrip() + "\n"

    text = render(None)
    if limit is None or len(text.encode()) <= limit:
        return text
    most = max(len(run["layers"]) for run in runs)
    low, high = 0, most  # the largest collapsed table that fits
    while low < high:
        middle = (low + high + 1) // 2
        if len(render(middle).encode()) <= limit:
            low = middle
        else:
            high = middle - 1
    text = render(low)
    if len(text.encode()) > limit:  # even without layer tables (pathological): cut hard, but say so
        note = "\n\n(truncated to fit GitHub's step summary limit; see the report JSON)\n"
        text = text.encode()[: max(0, limit - len(note.encode()))].decode(errors="ignore") + note
    return text
