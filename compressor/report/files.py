"""Finding, reading and appending to the report JSON files that compress, squeeze, compensate and eval write.

Every report follows the report contract described in report/schema.py (`schema` "lowrank.<...>",
`schema_version`, `kind`, `versions`, `command`, `evaluations`, `layers.list`); `read_report` returns only reports
that pass its check, and anything else (not JSON, cut short, another tool's JSON, a newer version than this lowrank
reads, a missing contract field) is a ReportError (exit code 3) that names the problem.

Appending an evaluation rewrites the file atomically (a temporary sibling renamed over it) under an exclusive
lock, re-reading it first, so concurrent `lowrank eval` runs never lose each other's results.
"""

import json
import os
import secrets
import time
from contextlib import contextmanager

from ..errors import ReportError, UsageError
from ..io.publish import DISK_FULL, PARTIAL_SUFFIX, write_atomic
from .schema import EVALUATION_SCHEMA, validate_report

# In a directory, the first of these that exists is its report: the most recent step comes first (a compensate
# or squeeze output may sit on top of a compressed checkpoint).
REPORT_FILES = ("compensation_report.json", "squeeze_report.json", "compression_report.json")


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


def read_report(path: str | os.PathLike) -> dict:
    """Parse and validate a report file (the contract in report/schema.py); every problem is one ReportError line."""
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
    return validate_report(report, path)


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


@contextmanager
def _locked(path):
    """An exclusive lock on `path`'s current file (re-taken if the file was replaced while we waited)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no advisory locks, the atomic rename still protects readers
        yield
        return
    claimed_until = time.monotonic() + 5
    while True:
        handle = open(path, "a")  # noqa: SIM115  (held for the lock's lifetime)
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            status = os.fstat(handle.fileno())
            same = status.st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        # an empty file may be another run's claim, about to be replaced (_claim_and_replace): wait a little
        if same and (status.st_size or time.monotonic() > claimed_until):
            break
        handle.close()
        if same:
            time.sleep(0.01)
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
    return {"schema": EVALUATION_SCHEMA, "schema_version": 1, "kind": "eval",
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
    """Create `path` holding `text` atomically; False if it already exists (then the caller appends instead).

    The text goes into a temporary sibling of this call's own (created exclusively: concurrent runs never share
    one), which is hard-linked to `path`: atomic for readers, and refused if another run created `path` first."""
    directory, name = os.path.split(os.path.abspath(path))
    temporary = os.path.join(directory, f".{name}.{os.getpid()}-{secrets.token_hex(6)}{PARTIAL_SUFFIX}")
    try:
        with open(temporary, "x", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(temporary, path)  # atomic, and fails if another run created the file first
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links
            return _claim_and_replace(temporary, path)
        return True
    except OSError as error:
        if error.errno in DISK_FULL:
            error.filename = os.path.abspath(path)  # the one line names the report, not the temporary file
        raise
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _claim_and_replace(temporary, path):
    """Without hard links: claim `path` by creating it exclusively (False if another run has), then rename the
    full temporary file over the claim, under the claim's lock, so an appender that opened the empty claim waits
    and then finds the new file (`_locked` re-takes the lock when the file was replaced)."""
    try:
        claim = open(path, "x")  # noqa: SIM115  (held until the rename is done)
    except FileExistsError:
        return False
    with claim:
        try:
            import fcntl

            fcntl.flock(claim, fcntl.LOCK_EX)
        except ImportError:  # not POSIX: no advisory locks
            pass
        os.replace(temporary, path)
    return True


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
