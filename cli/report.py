"""`lowrank report PATH [PATH2] [--format ...] [gates]`: render a report, gate it in CI, compare two runs."""

import enum
import io
import os
from typing import Annotated

import typer

from .app import app

GATES, OUT = "Gates (exit 1 if one fails, 3 if the report cannot answer one)", "Output"


class Format(str, enum.Enum):
    table = "table"
    markdown = "markdown"
    json = "json"
    junit = "junit"


def _gate(help_text):
    return typer.Option(help=help_text, rich_help_panel=GATES)


@app.command(
    epilog="Exit codes: 0 every gate passed (or none given) · 1 a gate failed · 2 usage error · 3 the report is "
    "unreadable, incomplete, or cannot answer a gate.  Examples:  lowrank report ./smollm2-lr50  ·  lowrank report "
    "./smollm2-lr50 --max-ppl-increase 10% --min-energy 0.9 --format junit -o junit.xml  ·  lowrank report "
    "main/compression_report.json pr/compression_report.json",
)
def report(
    paths: Annotated[list[str], typer.Argument(help="A checkpoint or adapter directory, or a report JSON file. Two "
                     "paths (A B) are compared side by side; gates then apply to B.", show_default=False)],
    output_format: Annotated[Format, typer.Option("--format", "-f", help="table (terminal, on stderr), markdown, "
                             "json (schema lowrank.report v1) or junit (one testcase per gate).",
                             case_sensitive=False, rich_help_panel=OUT)] = Format.table,
    output: Annotated[str | None, typer.Option("--output", "-o", help="Write the rendering to FILE instead of the "
                      "terminal (and do not append to $GITHUB_STEP_SUMMARY).", rich_help_panel=OUT)] = None,
    plot: Annotated[str | None, typer.Option(help="Also write a PNG of per-layer ranks and energy and of the "
                    "singular-value spectra (needs lowrank[plot]).", rich_help_panel=OUT)] = None,
    top: Annotated[int, typer.Option(help="Worst layers shown in the open table.", min=0, rich_help_panel=OUT)] = 10,
    json_output: Annotated[bool, typer.Option("--json", help="Same as --format json.", rich_help_panel=OUT)] = False,
    max_ppl_increase: Annotated[str | None, _gate("Largest perplexity increase over the baseline, e.g. 10% or "
                                "0.10 (latest evaluation with a baseline).")] = None,
    max_ppl: Annotated[str | None, _gate("Largest perplexity.")] = None,
    min_top1_agreement: Annotated[str | None, typer.Option("--min-top1-agreement", "--min-kl-agreement",
                                  help="Smallest top-1 agreement with the baseline, e.g. 95% or 0.95.",
                                  rich_help_panel=GATES)] = None,
    max_kl: Annotated[str | None, _gate("Largest mean KL(baseline || model), nats per token.")] = None,
    min_cosine: Annotated[str | None, _gate("Smallest mean cosine similarity of pooled embeddings (encoders).")] = None,
    max_size: Annotated[str | None, _gate("Largest size of the weights on disk, e.g. 300MB or 2GiB.")] = None,
    max_kept: Annotated[str | None, _gate("Largest fraction of parameters kept (whole model when recorded), e.g. "
                        "55%.")] = None,
    min_energy: Annotated[str | None, _gate("Smallest energy kept, in every layer, e.g. 0.9.")] = None,
    max_rel_error: Annotated[str | None, _gate("Largest relative error, in every layer.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only failing and incomplete gates.",
                                        rich_help_panel=OUT)] = False,
    debug: Annotated[bool, typer.Option(help="Show tracebacks.", rich_help_panel=OUT)] = False,
):
    """Render what compress, squeeze, compensate and eval recorded, and check it against gates.

    Reads a checkpoint directory, an adapter directory or a report JSON: summary, evaluations against the
    baseline (with the perplexity protocol), layers worst first. Each gate is one pass/fail line, like coverage's
    --fail-under; a gate the report cannot answer (e.g. a perplexity gate with no evaluation) is not a pass.
    With $GITHUB_STEP_SUMMARY set and no --output, the markdown is appended to the job summary (under 1 MiB).
    """
    from lowrank.errors import UsageError
    from lowrank.report.gates import check, parse_gate, status
    from lowrank.report.runs import load_run

    if len(paths) > 2:
        raise UsageError(f"give one report, or two to compare (got {len(paths)})")
    if json_output:
        output_format = Format.json
    chosen = {"max-ppl-increase": max_ppl_increase, "max-ppl": max_ppl, "min-top1-agreement": min_top1_agreement,
              "max-kl": max_kl, "min-cosine": min_cosine, "max-size": max_size, "max-kept": max_kept,
              "min-energy": min_energy, "max-rel-error": max_rel_error}
    gates = [parse_gate(option, value) for option, value in chosen.items() if value is not None]
    _check_outputs(output, plot, paths)
    runs = [load_run(path) for path in paths]
    results = check(gates, runs[-1])
    verdict, code = status(results)

    _show(render(output_format, runs, results, verdict, code, top), output_format, output, quiet)
    _step_summary(runs, results, verdict, top, output)
    if plot:
        _plot(runs, plot)
    _print_verdicts(results, output, quiet)
    raise typer.Exit(code)


def _check_outputs(output, plot, paths):
    """Fail before reading anything if --output or --plot could not be written, or would replace a report read."""
    from lowrank.errors import UsageError
    from lowrank.report.files import find_report

    if plot is not None and not plot.lower().endswith(".png"):
        raise UsageError(f"--plot {plot}: give a .png file name")
    read = {os.path.realpath(report) for report in map(find_report, paths) if report}
    for path in [p for p in (output, plot) if p]:
        if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise UsageError(f"the directory of {path} does not exist")
        if os.path.isdir(path):
            raise UsageError(f"{path} is a directory; give a file name")
        if os.path.realpath(path) in read:
            raise UsageError(f"{path} is the report being read; write it somewhere else")


def _show(text, output_format, output, quiet):
    """The rendering to --output, else the table on stderr (unless --quiet) or the document on stdout."""
    from .ui import err

    if output:
        _write(output, text)
    elif output_format is Format.table:
        if not quiet:
            err.print(text, end="", highlight=False, markup=False, soft_wrap=True)
    else:
        from .ui import print_document

        print_document(text)


def _print_verdicts(results, output, quiet):
    """One line per failed or unanswerable gate (even with --quiet), then where the rendering went."""
    from .ui import err

    for result in results:
        if result["status"] == "fail":
            err.print(f"FAILED {result['message']}", highlight=False, markup=False, soft_wrap=True)
        elif result["status"] == "missing":
            err.print(f"error: report incomplete: {result['message']}", highlight=False, markup=False,
                      soft_wrap=True)
    if not quiet and output:
        err.print(f"wrote {output}", highlight=False, soft_wrap=True)


def render(output_format, runs, results, verdict, code, top):
    """The rendering as text (the table is rendered without colour, as it would print)."""
    if output_format is Format.markdown:
        from lowrank.report.markdown import report_markdown

        return report_markdown(runs, results, verdict, top)
    if output_format is Format.json:
        import json

        from lowrank.report.summary import to_json

        return json.dumps(to_json(runs, results, verdict, code), indent=2) + "\n"
    if output_format is Format.junit:
        from lowrank.report.junit import to_junit

        return to_junit(runs, results, _plain(runs))
    return _table_text(runs, results, verdict, top)


def _plain(runs):
    """Plain "label: value" lines of each run and its latest evaluation (JUnit's system-out)."""
    from lowrank.report.evaluations import evaluation_header, evaluation_rows
    from lowrank.report.summary import run_rows

    lines = []
    for run in runs:
        lines += [f"{label}: {value}" for label, value in run_rows(run)]
        if run["evaluations"]:
            lines += evaluation_header(run["evaluations"][-1])
            lines += [f"{metric}: {' | '.join(v for v in values if v)}"
                      for metric, *values in evaluation_rows(run["evaluations"][-1])]
        lines.append("")
    return "\n".join(lines)


def _table_text(runs, results, verdict, top):
    from rich.console import Console

    from .ui import err

    buffer = io.StringIO()
    console = Console(file=buffer, width=err.width if err.is_terminal else 120, color_system=None,
                      force_terminal=False, highlight=False)
    for renderable in tables(runs, results, verdict, top):
        console.print(renderable)
    return buffer.getvalue()


def tables(runs, results, verdict, top):
    """The rich renderables of the table format, in order."""
    from rich.table import Table
    from rich.text import Text

    from lowrank.report.evaluations import evaluation_header, evaluation_rows
    from lowrank.report.markdown import comparison_layers, comparison_rows, layer_header, layer_row
    from lowrank.report.summary import run_rows

    from .ui import key_value_table

    def grid(title, header, rows, right_from=1):
        table = Table(title=title, title_justify="left")
        for index, column in enumerate(header):
            table.add_column(column, justify="right" if index >= right_from else "left")
        for row in rows:
            table.add_row(*map(str, row))
        return table

    out = []
    if results:
        out.append(grid(f"Gates: {verdict}", ("gate", "metric", "value", "threshold", "result"),
                        [(f"--{r['option']}", r["metric"], r["value_text"] or "missing",
                          f"{r['op']} {r['threshold_text']}", r["status"].upper()) for r in results], right_from=2))
    if len(runs) == 2:
        out.append(grid(f"A = {runs[0]['path']}   B = {runs[1]['path']}", ("", "A", "B", "change"),
                        comparison_rows(*runs)))
        rows, total = comparison_layers(runs[0], runs[1], top)
        if rows:
            out.append(grid(f"Layers, worst first in B ({len(rows)} of {total} in both)",
                            ("layer", "rank A", "rank B", "energy A", "energy B", "error A", "error B"), rows))
    for name, run in zip("AB" if len(runs) == 2 else " ", runs):
        label = f"{name}: " if len(runs) == 2 else ""
        out.append(key_value_table(f"{label}lowrank report: {run['path']}", run_rows(run)))
        if run["evaluations"]:
            evaluation = run["evaluations"][-1]
            count = len(run["evaluations"])
            out.append(Text("\n".join([f"evaluation {count} of {count}:"] + evaluation_header(evaluation))))
            out.append(grid("", ("metric", "model", "baseline", "change"), evaluation_rows(evaluation)))
        if run["layers"] and len(runs) == 1:
            layers = run["layers"]
            has_shape, extra, header = layer_header(layers)
            out.append(grid(f"Layers, worst first ({min(top, len(layers))} of {len(layers)})", header,
                            [layer_row(layer, has_shape, extra) for layer in layers[:top]]))
    return out


def _write(path, text):
    from lowrank.errors import LowrankError
    from lowrank.io.publish import write_atomic

    try:
        write_atomic(path, text)
    except OSError as error:
        raise LowrankError(f"could not write {path}: {error.strerror or error}") from error


def _step_summary(runs, results, verdict, top, output):
    """Append the markdown to $GITHUB_STEP_SUMMARY (when set and no --output), within GitHub's 1 MiB per step."""
    from lowrank.report.markdown import STEP_SUMMARY_LIMIT, report_markdown

    from .ui import err

    path = os.environ.get("GITHUB_STEP_SUMMARY")
    if not path or output:
        return
    used = os.path.getsize(path) if os.path.exists(path) else 0
    room = STEP_SUMMARY_LIMIT - used - 1024  # the limit is on this step's whole file; 1 KB to spare
    if room <= 0:
        err.print(f"warning: {path} is already at GitHub's 1 MiB limit; the summary was not appended",
                  highlight=False, soft_wrap=True)
        return
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(("\n" if used else "") + report_markdown(runs, results, verdict, top, limit=room))
    except OSError as error:  # the job summary is a courtesy: it must not change the gates' verdict
        err.print(f"warning: could not append to {path}: {error.strerror or error}", highlight=False,
                  soft_wrap=True)


def _plot(runs, path):
    from lowrank.errors import LowrankError
    from lowrank.report.compression import read_spectra
    from lowrank.report.plot import check_available, plot

    from .ui import err

    check_available()
    try:
        spectra = read_spectra(runs[-1]["directory"])
    except Exception as error:  # the spectra file is optional: a damaged one costs the bottom panel only
        err.print(f"warning: could not read the spectra file ({type(error).__name__}); plotting without spectra",
                  highlight=False, soft_wrap=True)
        spectra = {}
    try:
        plot(runs, path, spectra)
    except OSError as error:
        raise LowrankError(f"could not write {path}: {error.strerror or error}") from error
