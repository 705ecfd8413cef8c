"""The report contract: the fields every lowrank report has, whatever wrote it, and the check that enforces them.

Every command that changes a model writes a JSON report beside its output, and `lowrank eval` appends to it:

| kind | schema | file | built by |
|---|---|---|---|
| `compress` | `lowrank.compression` | `compression_report.json` | report/compression.py |
| `squeeze` | `lowrank.squeeze` | `squeeze_report.json`, or `<stem>.squeeze_report.json` | squeezing/report.py |
| `compensate` | `lowrank.compensate` | `compensation_report.json` | repair/eora.py |
| `eval` | `lowrank.evaluation` | any name: `lowrank eval --output FILE`, evaluations only | report/files.py |

Every report is one JSON object with at least:

- `schema`: "lowrank.<...>", the format's name (another tool's JSON is refused by this prefix);
- `schema_version`: a positive integer per kind. Fields may be added within a version; a reader refuses a version
  newer than it knows (READABLE_VERSIONS), so an old lowrank never misreads a newer report;
- `kind`: one of READABLE_VERSIONS' keys (compress, squeeze, compensate, eval);
- `versions`: {package: version} of what produced it (lowrank, torch, transformers, python, ...);
- `command`: the command line (or API call) that produced it;
- `layers`: an object whose `list` has one entry per layer, each with at least `name`, `rank` (null for a layer
  kept dense), `params_before`, `params_after`, `energy_kept` and `rel_error` (numbers; LAYER_FIELDS). Kinds add
  their own per-layer fields (compensate's `error_before`, squeeze's sigmas), which `lowrank report` shows when
  every layer has them;
- `evaluations`: a list, oldest first, of evaluation entries (schema `lowrank.evaluation`, their own
  `schema_version`, at most EVALUATION_VERSION; described in README "Evaluate"), appended by `lowrank eval`.

Most kinds also record `calibration` (source, num_samples, seq_len, seed, sha256_text; a speech model's has `kind:
"audio"`, sha256_audio, window_seconds and end_of_text_suppressed instead of the text hash), `timings_s`,
`peak_rss_bytes` and a size (`size` or squeeze's `totals`); readers use them when present and never require them.
A `lowrank squeeze --analyze` result has the common fields but no `layers`: nothing was squeezed.

`validate_report` is the one place this contract is checked: anything else (not an object, another tool's JSON, a
newer version, a missing field, a non-numeric layer value) is a ReportError (exit code 3) that names the problem.
"""

from ..errors import ReportError

# The newest schema_version of each kind's report that this lowrank reads.
READABLE_VERSIONS = {"compress": 1, "squeeze": 1, "compensate": 1, "eval": 1}
EVALUATION_SCHEMA = "lowrank.evaluation"  # one evaluation entry, and a report of kind `eval`
EVALUATION_VERSION = 1  # schema_version of one evaluation entry
LAYER_FIELDS = ("name", "rank", "params_before", "params_after", "energy_kept", "rel_error")
TOP_FIELDS = ("schema", "schema_version", "kind", "versions", "command", "evaluations", "layers")


def _check_number(value, where):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ReportError(f"{where} is not a number ({value!r}); the report is damaged")


def _check_header(report, where):
    """The schema, its version and the kind: is this a lowrank report this lowrank can read?"""
    if not isinstance(report, dict):
        raise ReportError(f"{where} is not a lowrank report: it holds a JSON {type(report).__name__}, not an object")
    schema = report.get("schema")
    if not isinstance(schema, str) or not schema.startswith("lowrank."):
        found = f"its schema is {schema!r}" if "schema" in report else "it has no 'schema' field"
        raise ReportError(f"{where} is not a lowrank report ({found}); give a file written by lowrank")
    version, kind = report.get("schema_version"), report.get("kind")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ReportError(f"{where}: schema_version {version!r} is not a positive integer; the report is damaged")
    if kind not in READABLE_VERSIONS:
        raise ReportError(f"{where}: report kind {kind!r} is unknown to this lowrank (it reads "
                          f"{', '.join(READABLE_VERSIONS)}); upgrade lowrank")
    if version > READABLE_VERSIONS[kind]:
        raise ReportError(f"{where} was written by a newer lowrank ({schema} version {version}; this lowrank reads up "
                          f"to version {READABLE_VERSIONS[kind]}); upgrade lowrank")


def _check_layers(report, where):
    layers = report["layers"].get("list") if isinstance(report["layers"], dict) else None
    if not isinstance(layers, list):
        raise ReportError(f"{where} is incomplete: 'layers' has no 'list' of layers")
    for index, layer in enumerate(layers):
        if not isinstance(layer, dict):
            raise ReportError(f"{where}: layers.list[{index}] is not an object; the report is damaged")
        absent = [key for key in LAYER_FIELDS if key not in layer]
        if absent:
            raise ReportError(f"{where}: layer {layer.get('name', index)!r} lacks {', '.join(absent)}")
        for key in ("params_before", "params_after", "energy_kept", "rel_error"):
            _check_number(layer[key], f"{where}: layer {layer['name']!r} {key}")


def _check_evaluations(report, where):
    if not isinstance(report["evaluations"], list):
        raise ReportError(f"{where}: 'evaluations' is not a list; the report is damaged")
    for index, evaluation in enumerate(report["evaluations"]):
        if not isinstance(evaluation, dict) or not isinstance(evaluation.get("schema_version"), int):
            raise ReportError(f"{where}: evaluations[{index}] is not a lowrank evaluation; the report is damaged")
        if evaluation["schema_version"] > EVALUATION_VERSION:
            raise ReportError(f"{where}: evaluations[{index}] was written by a newer lowrank (evaluation version "
                              f"{evaluation['schema_version']}; this lowrank reads up to {EVALUATION_VERSION}); "
                              "upgrade lowrank")


def validate_report(report, where):
    """Raise ReportError unless `report` follows the report contract in a version this lowrank reads; return it."""
    _check_header(report, where)
    missing = [key for key in TOP_FIELDS if key not in report]
    if report.get("mode") == "analyze" and "layers" in missing:
        raise ReportError(f"{where} is a `lowrank squeeze --analyze` result: nothing was squeezed, so there are no "
                          "layers to report")
    if missing:
        raise ReportError(f"{where} is incomplete: it lacks {', '.join(missing)}")
    _check_layers(report, where)
    _check_evaluations(report, where)
    return report
