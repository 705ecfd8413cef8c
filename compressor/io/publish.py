"""Outputs written atomically: checks before any work, a hidden staging sibling, and the rename that publishes it.

Every output lowrank writes goes through here. A directory (a checkpoint, an adapter) is written into its staging
sibling `.NAME.lowrank-partial` (`staged` or `new_staging_dir`) and renamed into place by `publish`; a single file
(a report, a shard, a plot) is written into the same kind of sibling and renamed over the target by `replacing` or
`write_atomic`. A reader sees the old output or the new one, never half of one. `check_output`, before any work,
refuses an output that --overwrite must not replace: anything lowrank did not write, the current directory, the input.

Kept apart from the checkpoint code (which needs transformers) so that `lowrank squeeze` never imports it.
"""

import contextlib
import errno
import json
import os
import shutil
import struct

from ..errors import UsageError

PARTIAL_SUFFIX = ".lowrank-partial"
DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}  # a write that failed for want of space, not for a bug


# What marks an output as lowrank's, so that --overwrite replaces it: a report in a directory, the provenance block
# densify puts in config.json, the provenance metadata squeeze puts in a single .safetensors file.
REPORT_NAMES = ("compression_report.json", "squeeze_report.json", "compensation_report.json")
DENSIFY_MARKER = "lowrank_densified"
SQUEEZE_MARKER = "lowrank_squeeze"


def check_output(output, source, overwrite, directory=True):
    """Refuse an output that overlaps the input `source`, or that exists and is not a `directory` (or file) lowrank
    wrote, or that exists without --overwrite. --overwrite never replaces anything else: not a folder or file lowrank
    did not write, not the current directory or one holding it, not one holding the input."""
    out = os.path.abspath(output)
    if os.path.islink(out) and not os.path.exists(out):
        raise UsageError(f"{output} is a broken symbolic link; remove it or write the output somewhere else")
    real = os.path.realpath(out)
    src = os.path.realpath(source) if source else None
    if real == src:
        raise UsageError(f"{output} is the input; write the output somewhere else")
    if src and real.startswith(src + os.sep):
        raise UsageError(f"{output} overlaps the input {source}; write the output somewhere else")
    if os.path.exists(out):
        reason = _not_replaceable(real, src, directory)
        if reason:
            raise UsageError(f"{output} already exists and {reason}, so lowrank will not replace it; write the output "
                             "somewhere else")
        if not overwrite:
            raise UsageError(f"{output} already exists; pass --overwrite to replace it")
    if not os.path.isdir(os.path.dirname(out)):
        raise UsageError(f"the parent directory of {output} does not exist")


def _not_replaceable(path, source, directory):
    """Why existing `path` (resolved) must not be replaced, or None if it is an output lowrank wrote."""
    here = os.path.realpath(os.getcwd())
    if path == here or here.startswith(path + os.sep):
        return "is the current directory" if path == here else "holds the current directory"
    if source and source.startswith(path + os.sep):
        return "holds the input"
    if directory != os.path.isdir(path):
        return "is not a directory" if directory else "is a directory"
    if not written_by_lowrank(path):
        return ("is not a lowrank output (it has no lowrank report)" if directory else
                f"is not a file lowrank wrote (no {SQUEEZE_MARKER} metadata)")
    return None


def written_by_lowrank(path):
    """Whether `path` is an output lowrank wrote: a directory with a lowrank report or a densified config.json,
    or a .safetensors file with squeeze's provenance metadata."""
    if os.path.isdir(path):
        return (any(os.path.isfile(os.path.join(path, name)) for name in REPORT_NAMES)
                or DENSIFY_MARKER in _read_json(os.path.join(path, "config.json")))
    return path.endswith(".safetensors") and SQUEEZE_MARKER in _safetensors_metadata(path)


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _safetensors_metadata(path):
    """The string metadata of a safetensors file's header; {} if it is not one (the header is read, never the data)."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(min(length, 100 << 20)))
    except (OSError, ValueError, struct.error):
        return {}
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else {}


def name_failed_write(error, output):
    """A disk-full OSError from write() names no file: give it the output it was for, so its one line says which."""
    if isinstance(error, OSError) and error.errno in DISK_FULL and error.filename is None:
        error.filename = os.path.abspath(output)


def published_path(path):
    """The output a path inside a staging sibling (`.NAME.lowrank-partial/...`) is written for; else `path`."""
    head = os.path.abspath(path)
    while head != os.path.dirname(head):
        head, name = os.path.split(head)
        if name.startswith(".") and name.endswith(PARTIAL_SUFFIX):
            return os.path.join(head, name[1: -len(PARTIAL_SUFFIX)])
    return path


def partial_path(path):
    """The hidden sibling `.NAME.lowrank-partial` that file or directory `path` is written to before it is renamed
    into place (the same directory, so the rename is atomic)."""
    out = os.path.abspath(path)
    return os.path.join(os.path.dirname(out), f".{os.path.basename(out)}{PARTIAL_SUFFIX}")


def staging_dir(output):
    """The staging directory of output directory `output` (its partial sibling)."""
    return partial_path(output)


def new_staging_dir(output):
    """An empty staging directory for `output`; an earlier run's leftover is discarded. Returns its path."""
    staging = staging_dir(output)
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    return staging


def publish(staging, output):
    """Move the finished staging directory into place; an existing output (--overwrite) goes only at the end."""
    out = os.path.abspath(output)
    if os.path.exists(out):
        trash = f"{staging}-old"
        os.replace(out, trash)
        try:
            os.replace(staging, out)
        except BaseException:
            os.replace(trash, out)  # the old output stays
            raise
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, out)


@contextlib.contextmanager
def staged(output):
    """Write output directory `output` atomically: yields a new, empty staging directory to fill, published (renamed
    into place) when the block ends; if the block fails, the staging directory is removed and `output` is untouched."""
    staging = new_staging_dir(output)
    try:
        yield staging
        publish(staging, output)
    except BaseException as error:
        name_failed_write(error, output)
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _fsync(path, flags):
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_directory(directory):
    """Make a rename in `directory` durable (where a directory can be opened: not on Windows)."""
    try:
        _fsync(directory, os.O_RDONLY)
    except OSError:
        pass


@contextlib.contextmanager
def replacing(path):
    """Write file `path` atomically: yields the partial sibling to write, which is then made durable (fsync) and
    renamed over `path`, keeping an existing file's permissions, and the rename made durable too. If the block fails,
    the sibling is removed and `path` is untouched."""
    temporary = partial_path(path)
    try:
        yield temporary
        _fsync(temporary, os.O_RDWR)
        if os.path.exists(path):
            os.chmod(temporary, os.stat(path).st_mode & 0o7777)
        os.replace(temporary, path)
    except BaseException as error:
        name_failed_write(error, path)
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    _fsync_directory(os.path.dirname(temporary))


def write_atomic(path, data):
    """Replace `path` with `data` (str, written as UTF-8, or bytes) through a temporary sibling, so a reader never
    sees half a file (see `replacing`)."""
    with replacing(path) as temporary:
        if isinstance(data, bytes):
            with open(temporary, "wb") as f:
                f.write(data)
        else:
            with open(temporary, "w", encoding="utf-8") as f:
                f.write(data)
