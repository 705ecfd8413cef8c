"""Outputs written atomically: checks before any work, a hidden staging sibling, and the rename that publishes it.

Every output lowrank writes goes through here. A directory (a checkpoint, an adapter) is written into its staging
sibling `.NAME.lowrank-partial` (`staged` or `new_staging_dir`) and renamed into place by `publish`; a single file
(a report, a shard, a plot) is written into the same kind of sibling and renamed over the target by `replacing` or
`write_atomic`. A reader sees the old output or the new one, never half of one.

Kept apart from the checkpoint code (which needs transformers) so that `lowrank squeeze` never imports it.
"""

import contextlib
import os
import shutil

from ..errors import UsageError

PARTIAL_SUFFIX = ".lowrank-partial"


def check_output(output, source_dir, overwrite):
    """Refuse an output that exists (without --overwrite) or that overlaps the input model."""
    out = os.path.abspath(output)
    if os.path.islink(out) and not os.path.exists(out):
        raise UsageError(f"{output} is a broken symbolic link; remove it or write the output somewhere else")
    if os.path.exists(out) and not overwrite:
        raise UsageError(f"{output} already exists; pass --overwrite to replace it")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"{output} exists and is not a directory")
    if source_dir:
        src = os.path.abspath(source_dir)
        if out == src or out.startswith(src + os.sep) or src.startswith(out + os.sep):
            raise UsageError(f"{output} overlaps the input model {source_dir}; write the output somewhere else")
    parent = os.path.dirname(out) or "."
    if not os.path.isdir(parent):
        raise UsageError(f"the parent directory of {output} does not exist")


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
        os.replace(staging, out)
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
    except BaseException:
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
    except BaseException:
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
