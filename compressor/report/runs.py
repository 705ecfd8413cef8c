"""`load_run`: a report read into a run (report/summary.py), checked by rendering it once.

Apart from summary.py because the check needs the renderers (markdown.py), which build on summary.py.
"""

from .evaluations import evaluation_header, evaluation_rows
from .files import read_report, require_report
from .markdown import layer_header, layer_row, report_markdown
from .summary import DAMAGE, damaged, make_run, run_rows


def load_run(path):
    """Read the report for `path` (a directory or a report file) into a run (see summary.py). A report whose
    optional fields are malformed (what the contract check does not cover but rendering reads) is a ReportError:
    it is rendered once here (markdown, the summary rows, the last evaluation, the layer rows)."""
    report_file = require_report(path)
    report = read_report(report_file)
    try:
        run = make_run(path, report_file, report)
        _render_once(run)
    except DAMAGE as error:
        raise damaged(report_file, error) from None
    return run


def _render_once(run):
    report_markdown([run], [], "no-gates")
    run_rows(run)
    for evaluation in run["evaluations"][-1:]:
        evaluation_header(evaluation)
        evaluation_rows(evaluation)
    if run["layers"]:
        has_shape, extra, _ = layer_header(run["layers"])
        for layer in run["layers"]:
            layer_row(layer, has_shape, extra)
