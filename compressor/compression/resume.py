"""Durable progress: after every block the staging directory holds a journal, so `--resume` continues an
interrupted run (crash, Ctrl-C, SIGKILL) from the first unfinished block and writes the same bytes.

The journal records the settings' fingerprint, the blocks done, the shard writer's state, the per-layer
results and the allocated ranks (an allocation is the costliest pass before the blocks and is never recomputed);
beside it each finished block's spectra (for the report's spectra file). Nothing else is saved: on resume the calibration states are recomputed by running the calibration
windows through the already-compressed blocks, rebuilt from the factors already written, which is what the
interrupted run did too, so the resumed blocks see bit-identical inputs.
"""

import hashlib
import json
import os

import torch

from ..errors import UsageError
from ..io.publish import staging_dir, write_atomic
from ..io.shards import DTYPES

JOURNAL = ".lowrank-journal.json"
TORCH_DTYPES = {name: dtype for dtype, name in DTYPES.items()}


def fingerprint(**parts):
    """sha256 of everything that determines the output."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def tensor_digest(tensor):
    if hasattr(tensor, "digest"):  # calibration.audio.AudioWindows
        return tensor.digest()
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


def load(staging):
    path = os.path.join(staging, JOURNAL)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def save(staging, journal):
    # durable: write_atomic fsyncs the file before the rename and the directory after it; if it fails (a full
    # disk), the previous journal stays whole, and with it what --resume continues from (see kept_blocks)
    write_atomic(os.path.join(staging, JOURNAL), json.dumps(journal))


def kept_blocks(output):
    """(staging directory, blocks done) if a failed run of `output` left a journal behind for --resume, else None.
    After a failure only a journaled run's staging directory stays (the writer removes it otherwise)."""
    staging = staging_dir(output)
    try:
        journal = load(staging)
    except (OSError, ValueError):
        return None
    if not isinstance(journal, dict) or not isinstance(journal.get("blocks_done"), int):
        return None
    return staging, journal["blocks_done"]


def check(journal, expected, staging):
    if journal is None:
        return None
    if journal.get("fingerprint") != expected:
        raise UsageError(f"the partial output in {staging} was made with other settings, inputs or version; "
                         "delete it, or run without --resume to start afresh")
    return journal


class StagedTensors:
    """Read back tensors already written to the staging directory (closed shards and the open shard's data)."""

    def __init__(self, staging, writer_state):
        self.staging = staging
        self.closed = {name: path for path, names in writer_state["shards"] for name in names}
        self.entries = writer_state["entries"]
        self.open_data = os.path.join(staging, f".shard-{len(writer_state['shards']):05d}.data")

    def get(self, name):
        from safetensors import safe_open

        if name in self.closed:
            with safe_open(self.closed[name], "pt") as f:
                return f.get_tensor(name)
        entry = self.entries[name]
        start, end = entry["data_offsets"]
        with open(self.open_data, "rb") as f:
            f.seek(start)
            raw = bytearray(f.read(end - start))
        dtype = TORCH_DTYPES[entry["dtype"]]
        return torch.frombuffer(raw, dtype=dtype).reshape(entry["shape"]) if raw else torch.empty(
            entry["shape"], dtype=dtype)


def _spectra_path(staging, index):
    return os.path.join(staging, f".spectra-{index:05d}.safetensors")  # a dot file: finish() drops it


def save_spectra(staging, index, layers):
    """The singular values of block `index`'s factorized layers, durable before the journal names the block."""
    from safetensors.torch import save

    spectra = {name: sigma for layer in layers for name, sigma in layer.spectra().items()}
    if not spectra:
        return
    with open(_spectra_path(staging, index), "wb") as f:
        f.write(save(spectra))
        f.flush()
        os.fsync(f.fileno())


def load_spectra(staging, blocks_done, layers):
    """Give the journaled layers of blocks before `blocks_done` their spectra back."""
    from safetensors.torch import load_file

    sigma = {}
    for index in range(blocks_done):
        if os.path.exists(_spectra_path(staging, index)):
            sigma.update(load_file(_spectra_path(staging, index)))
    for layer in layers:
        layer.take_spectra(sigma)


LOSS_CURVE = ".loss-curve.safetensors"  # a dot file: finish() drops it


def save_loss_curve(staging, curve):
    """The allocation's loss curve (allocation.LossCurve: spectra, their loss weights, shapes), durable before the
    first block is journaled: a resumed run's verdict suggests the same --ratio as a straight run's."""
    from safetensors.torch import save

    tensors = {f"sigma.{name}": sigma.contiguous() for name, sigma in curve.spectra.items()}
    tensors.update({f"weight.{name}": weight.contiguous() for name, weight in (curve.weights or {}).items()})
    metadata = {"shapes": json.dumps(curve.shapes), "min_fraction": repr(curve.min_fraction),
                **({"speed": json.dumps(curve.speed)} if curve.speed is not None else {})}
    with open(os.path.join(staging, LOSS_CURVE), "wb") as f:
        f.write(save(tensors, metadata=metadata))
        f.flush()
        os.fsync(f.fileno())


def load_loss_curve(staging):
    """The journaled loss curve, or None when the interrupted run had none."""
    from safetensors import safe_open

    from .allocation import LossCurve

    path = os.path.join(staging, LOSS_CURVE)
    if not os.path.exists(path):
        return None
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    spectra = {name[len("sigma."):]: t for name, t in tensors.items() if name.startswith("sigma.")}
    weights = {name[len("weight."):]: t for name, t in tensors.items() if name.startswith("weight.")} or None
    shapes = {name: tuple(shape) for name, shape in json.loads(metadata["shapes"]).items()}
    speed = json.loads(metadata["speed"]) if "speed" in metadata else None  # --speed-aware's timings
    return LossCurve(spectra, shapes, weights, float(metadata["min_fraction"]), speed)
