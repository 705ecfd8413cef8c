"""Outputs written atomically: checks before any work, a hidden staging sibling, and the rename that publishes it.

Kept apart from the checkpoint code (which needs transformers) so that `lowrank squeeze` never imports it.
"""

import os
import shutil

from ..errors import UsageError


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


def staging_dir(output):
    out = os.path.abspath(output)
    return os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.lowrank-partial")


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
