"""Calibration hidden states: in memory up to a budget, in memory-mapped files beyond it; and the Gram matrices
of a mixture-of-experts block, which can outgrow memory too.

The layer-major loop holds the calibration hidden states of one stream (two while a block's outputs are being
produced, twice that when anchoring). With many long windows on a wide model they outgrow memory before the
weights do (4096 windows x 2048 tokens x 8192 wide in float16 is 128 GiB), so `--offload-budget` caps what is
kept in memory: batches beyond it are written to files in a private temporary directory and mapped back one at
a time when the loop reads them. The page cache does the rest; the bytes are identical either way.

A MoE block's statistics are 16 E (H^2 + I^2) bytes (Mixtral-8x7B: 26.5 GiB a block); past the same budget the
walk collects them in groups of experts and parks each finished group here (SpilledSum), see
sequential.collect_statistics.
"""

import contextlib
import errno
import math
import os
import shutil
import tempfile
import weakref

import torch

from ..errors import LowrankError
from ..io.publish import DISK_FULL
from ..io.shards import tensor_bytes


class HiddenStates:
    """A list of per-batch tensors (append, len, index, iterate) that spills to disk past `budget` bytes."""

    def __init__(self, budget=None, directory=None):
        self.budget = budget  # bytes kept in memory; None: no limit
        self.directory = directory  # where the spill directory is made; None: the system's temporary directory
        self._items = []  # a tensor, or (path, shape, dtype) of a spilled batch
        self._in_memory = 0
        self._spill_dir = None

    def append(self, tensor):
        tensor = tensor.detach().to("cpu")
        size = tensor.numel() * tensor.element_size()
        if self.budget is None or self._in_memory + size <= self.budget:
            self._in_memory += size
            self._items.append(tensor)
            return
        if self._spill_dir is None:
            self._spill_dir = tempfile.mkdtemp(prefix="lowrank-states-", dir=self.directory)
            weakref.finalize(self, shutil.rmtree, self._spill_dir, True)  # removed with this object
        path = os.path.join(self._spill_dir, f"{len(self._items)}.bin")
        _write(path, [tensor], self._spill_dir, "calibration states")
        self._items.append((path, tuple(tensor.shape), tensor.dtype))

    def release(self, index):
        """Drop batch `index` (the loop has used it for the last time): its memory or its file goes."""
        item = self._items[index]
        if isinstance(item, torch.Tensor):
            self._in_memory -= item.numel() * item.element_size()
        elif item is not None:
            os.remove(item[0])
        self._items[index] = None

    @property
    def spilled(self):
        """How many batches live on disk."""
        return sum(isinstance(item, tuple) for item in self._items)

    def __len__(self):
        return len(self._items)

    def __getitem__(self, index):
        item = self._items[index]
        if isinstance(item, torch.Tensor):
            return item
        if item is None:
            raise RuntimeError(f"calibration batch {index} was released; the loop read it after its last use")
        path, shape, dtype = item
        # a private mapping: pages come in as the block reads them and leave when the tensor is dropped
        return torch.from_file(path, shared=False, size=math.prod(shape), dtype=dtype).view(shape)

    def __iter__(self):
        return (self[index] for index in range(len(self)))


def _spill_failed(error, spill_dir, what="calibration states"):
    """One line for a spill file that found no room: it is not the output, so name where it went and what helps
    (the write() error names no file: a disk-full message would otherwise blame the output)."""
    reason = {errno.EFBIG: "file too large (a limit of the file system or of ulimit -f)",
              errno.EDQUOT: "disk quota exceeded"}.get(error.errno, "no space left on device")
    return LowrankError(f"could not spill {what} to the offload directory {os.path.dirname(spill_dir)} "
                        f"({reason}); pass "
                        "--offload-dir DIR on a disk with room, or a larger --offload-budget to keep more in memory")


def _write(path, tensors, spill_dir, what):
    """Write `tensors`' raw bytes one after the other to `path`; a full disk is one line (_spill_failed)."""
    try:
        with open(path, "wb") as f:
            for tensor in tensors:  # (write, not writelines: the disk-full test's stand-in file has write only)
                f.write(tensor_bytes(tensor))
    except OSError as error:
        if error.errno not in DISK_FULL:
            raise
        if os.path.exists(path):
            os.remove(path)
        raise _spill_failed(error, spill_dir, what) from None


def _remove(path):
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


class SpilledSum:
    """A float64 ExactSum (core/stats.py) parked in a file, hi then lo: what InputStats.spill puts in place of its
    Gram accumulator. Reading maps the file back privately (`hi`, `lo`, `value`); `add` adds in memory with the
    same TwoSum steps and writes the result back, so every value is bit for bit the in-memory one's. The file goes
    with this object."""

    def __init__(self, exact, spill_dir):
        self.shape, self.spill_dir = tuple(exact.hi.shape), spill_dir
        handle, self.path = tempfile.mkstemp(suffix=".bin", dir=spill_dir)
        os.close(handle)
        weakref.finalize(self, _remove, self.path)
        self._store(exact)

    def _store(self, exact):
        # a new file put in place: `exact` may be a mapping of the old one, which truncating would pull away
        _write(self.path + ".new", [exact.hi, exact.lo], self.spill_dir, "calibration statistics")
        os.replace(self.path + ".new", self.path)

    def _parts(self):
        size = math.prod(self.shape)
        both = torch.from_file(self.path, shared=False, size=2 * size, dtype=torch.float64)
        return both[:size].view(self.shape), both[size:].view(self.shape)

    @property
    def hi(self):
        return self._parts()[0]

    @property
    def lo(self):
        return self._parts()[1]

    @property
    def value(self):
        hi, lo = self._parts()
        return hi.add_(lo)  # a private mapping: the file is not changed

    def add(self, x):
        from ..core.stats import ExactSum

        exact = ExactSum.__new__(ExactSum)
        exact.hi, exact.lo = self._parts()
        exact.add(x)
        self._store(exact)


def spill_dir_for(owner, directory):
    """A private directory under `directory` (None: the system's temporary one) for spilled statistics, removed
    with `owner`."""
    path = tempfile.mkdtemp(prefix="lowrank-stats-", dir=directory)
    weakref.finalize(owner, shutil.rmtree, path, True)
    return path


def release_batch(states, index):
    """Drop batch `index` of a stream (a plain list or HiddenStates)."""
    if isinstance(states, HiddenStates):
        states.release(index)
    else:
        states[index] = None


def states_factory(budget=None, directory=None):
    """What the loop calls to start a stream: a plain list when there is no budget."""
    if budget is None:
        return list
    return lambda: HiddenStates(budget, directory)
