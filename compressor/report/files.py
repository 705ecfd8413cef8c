"""Finding, reading and appending to the report JSON files that compress, squeeze, compensate and eval write.

Every report follows the contract in CONVENTIONS.md: `schema` ("lowrank.<...>"), `schema_version`, `kind`,
`versions`, `command`, `evaluations` (a list) and `layers.list` (entries with at least name, rank, params_before,
params_after, energy_kept, rel_error). Anything else (not JSON, cut short, another tool's JSON, a newer version
than this lowrank reads, a missing contract field) is a ReportError (exit code 3) that names the problem.

Appending an evaluation rewrites the file atomically (a temporary sibling renamed over it) under an exclusive
lock, re-reading it first, so concurrent `lowrank eval` runs never lose each other's results.
"""

import json
import os
import time
from contextlib import contextmanager

from ..errors import ReportError, UsageError

# In a directory, the first of these that exists is its report: the most recent step comes first (a compensate
# or squeeze output may sit on top of a compressed checkpoint).
REPORT_FILES = ("compensation_report.json", "squeeze_report.json", "compression_report.json")
# The newest schema_version of each kind's report that this lowrank reads.
READABLE_VERSIONS = {"compress": 1, "squeeze": 1, "compensate": 1, "eval": 1}
EVALUATION_VERSION = 1  # schema_version of one evaluation entry (schema "lowrank.evaluation")
LAYER_FIELDS = ("name", "rank", "params_before", "params_after", "energy_kept", "rel_error")
TOP_FIELDS = ("schema", "schema_version", "kind", "versions", "command", "evaluations", "layers")


def find_report(path):
    """The report file for PATH: PATH itself if it is a file, else the first REPORT_FILES entry inside it."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise UsageError(f"{path}: no such file or directory")
    for name in REPORT_FILES:
        candidate = os.path.join(path, name)
        if os.path.isfile(candidate):
            return candidate
    # A squeezed single-file (kohya / diffusers) LoRA has its report beside it as <stem>.squeeze_report.json.
    beside = sorted(name for name in os.listdir(path) if name.endswith(".squeeze_report.json"))
    if len(beside) > 1:
        raise UsageError(f"{path} holds several squeeze reports ({', '.join(beside)}); give the one to read")
    return os.path.join(path, beside[0]) if beside else None


def require_report(path):
    found = find_report(path)
    if found is None:
        raise ReportError(f"{path} has no lowrank report (looked for {', '.join(REPORT_FILES)}); give a checkpoint "
                          "or adapter directory written by lowrank, or a report JSON file")
    return found


def _check_number(value, where):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ReportError(f"{where} is not a number ({value!r}); the report is damaged")


def validate(report, where):
    """Raise ReportError unless `report` follows the report contract in a version this lowrank reads."""
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
    missing = [key for key in TOP_FIELDS if key not in report]
    if report.get("mode") == "analyze" and "layers" in missing:
        raise ReportError(f"{where} is a `lowrank squeeze --analyze` result: nothing was squeezed, so there are no "
                          "layers to report")
    if missing:
        raise ReportError(f"{where} is incomplete: it lacks {', '.join(missing)}")
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
    if not isinstance(report["evaluations"], list):
        raise ReportError(f"{where}: 'evaluations' is not a list; the report is damaged")
    for index, evaluation in enumerate(report["evaluations"]):
        if not isinstance(evaluation, dict) or not isinstance(evaluation.get("schema_version"), int):
            raise ReportError(f"{where}: evaluations[{index}] is not a lowrank evaluation; the report is damaged")
        if evaluation["schema_version"] > EVALUATION_VERSION:
            raise ReportError(f"{where}: evaluations[{index}] was written by a newer lowrank (evaluation version "
                              f"{evaluation['schema_version']}; this lowrank reads up to {EVALUATION_VERSION}); "
                              "upgrade lowrank")
    return report


def read_report(path):
    """Parse and validate a report file; every problem is one ReportError line."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as error:
        raise ReportError(f"cannot read {path}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise ReportError(f"{path} is not a lowrank report (not UTF-8 text)") from None
    if not text.strip():
        raise ReportError(f"{path} is empty")
    try:
        report = json.loads(text)
    except json.JSONDecodeError as error:
        hint = " (the file is cut short: an interrupted write or copy?)" if _left_open(text) else ""
        raise ReportError(f"{path} is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}"
                          f"{hint}") from None
    return validate(report, path)


def _left_open(text):
    """Whether JSON text ends inside a string, object or array: the signature of a truncated file."""
    depth, in_string, escaped = 0, False, False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
    return in_string or depth > 0


def write_atomic(path, text):
    """Replace `path` with `text` through a temporary sibling, so a reader never sees half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(directory, f".{os.path.basename(path)}.lowrank-partial")
    try:
        with open(temporary, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(path):
            os.chmod(temporary, os.stat(path).st_mode & 0o7777)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


@contextmanager
def _locked(path):
    """An exclusive lock on `path`'s current file (re-taken if the file was replaced while we waited)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no advisory locks, the atomic rename still protects readers
        yield
        return
    while True:
        handle = open(path, "a")  # noqa: SIM115  (held for the lock's lifetime)
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            same = os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()
    try:
        yield
    finally:
        handle.close()


def utc_now():
    """The current UTC time, or SOURCE_DATE_EPOCH's (the reproducible-builds convention) for byte-identical output."""
    import datetime

    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    return datetime.datetime.fromtimestamp(int(epoch) if epoch else time.time(), datetime.timezone.utc)


def dump(report):
    return json.dumps(report, indent=2) + "\n"


def new_evaluation_report(evaluation):
    """A report of kind `eval` that holds only evaluations (for `lowrank eval --output FILE`)."""
    return {"schema": "lowrank.evaluation", "schema_version": 1, "kind": "eval",
            "versions": evaluation["versions"], "command": evaluation["command"], "layers": {"list": []},
            "evaluations": []}


def check_writable(path):
    """Fail before any work if an evaluation could not be recorded into `path` (an existing or new report)."""
    directory = os.path.dirname(os.path.abspath(path)) or "."
    if os.path.isdir(path):
        raise UsageError(f"--output {path} is a directory; give a JSON file name")
    if not os.path.isdir(directory):
        raise UsageError(f"the directory of {path} does not exist")
    if os.path.exists(path):
        read_report(path)
        if not os.access(path, os.W_OK):
            raise UsageError(f"{path} is not writable; pass --output FILE to record the evaluation elsewhere, or "
                             "--no-record")
    if not os.access(directory, os.W_OK):
        raise UsageError(f"cannot write in {directory}; pass --output FILE to record the evaluation elsewhere, or "
                         "--no-record")


def _create(path, text):
    """Create `path` holding `text` atomically; False if it already exists (then the caller appends instead)."""
    temporary = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.lowrank-partial")
    with open(temporary, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(temporary, path)  # atomic, and fails if another run created the file first
        return True
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links: the rename is still atomic for readers
        if os.path.exists(path):
            return False
        os.replace(temporary, path)
        return True
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def append_evaluation(path, evaluation, rerender=None):
    """Append `evaluation` to the `evaluations` of the report at `path` (created if missing); returns its index.

    `rerender(report)` may return {file name: text} to rewrite beside the report (its markdown rendering).
    """
    if not os.path.exists(path):
        report = {**new_evaluation_report(evaluation), "evaluations": [evaluation]}
        if _create(path, dump(report)):
            return 0
    with _locked(path):
        report = read_report(path)
        report["evaluations"].append(evaluation)
        write_atomic(path, dump(report))
        for name, text in (rerender(report) if rerender else {}).items():
            write_atomic(os.path.join(os.path.dirname(os.path.abspath(path)), name), text)
    return len(report["evaluations"]) - 1
