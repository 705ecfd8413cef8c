"""Models larger than memory: a weightless skeleton whose blocks are filled from the safetensors shards, one at a
time, and emptied again once their factors are written (mergekit's lazy loader, GPTQModel's meta shell).

Peak memory is one block, the calibration hidden states and the statistics, whatever the depth. Embeddings and
the other tensors outside the blocks are read only when needed: the input embedding to embed the calibration
windows, and the rest is copied tensor by tensor from the source shards into the output.
"""

import contextlib
import json
import os

import torch
import torch.nn as nn

from ..errors import LowrankError, UsageError
from .shards import INDEX_NAME, SINGLE_NAME
from .tensors import resolve_key


class TensorIndex:
    """Lazy access to the tensors of a safetensors checkpoint directory (single file or sharded with an index)."""

    def __init__(self, directory):
        self.directory = directory
        index = os.path.join(directory, INDEX_NAME)
        if os.path.exists(index):
            with open(index) as f:
                self.files = dict(json.load(f)["weight_map"])
        elif os.path.exists(os.path.join(directory, SINGLE_NAME)):
            from safetensors import safe_open

            with safe_open(os.path.join(directory, SINGLE_NAME), "pt") as f:
                self.files = {name: SINGLE_NAME for name in f.keys()}
        else:
            raise UsageError(f"{directory} has no safetensors weights to stream from")

    def __contains__(self, name):
        return name in self.files

    def get(self, name, dtype=None):
        from safetensors import safe_open

        # A fresh handle per read: an open handle keeps the whole shard mapped, and every page read so far would
        # stay resident; this way a tensor's pages go when the tensor does.
        with safe_open(os.path.join(self.directory, self.files[name]), "pt") as handle:
            tensor = handle.get_tensor(name)
        return _aligned(tensor if dtype is None or not tensor.is_floating_point() else tensor.to(dtype))

    def get_row(self, name, row, dtype=None):
        """`name`[row] alone (one expert of a stacked [E, ...] tensor): the other rows are not read."""
        from safetensors import safe_open

        with safe_open(os.path.join(self.directory, self.files[name]), "pt") as handle:
            tensor = handle.get_slice(name)[row]
        return _aligned(tensor if dtype is None or not tensor.is_floating_point() else tensor.to(dtype))


def _aligned(tensor, alignment=64):
    """`tensor`, copied to memory of its own where it sits at an offset of the mapped file that torch's allocator
    would not give it (64 bytes). Matrix products round differently on unaligned operands (MKL takes other code
    paths): a streamed block fed a weight at offset 24 mod 64 computed other last bits than the in-memory run,
    and a refined MoE block's targets, hence its bytes, differed (measured, bench/moe_memory.py)."""
    return tensor.clone() if tensor.data_ptr() % alignment else tensor


def weightless():
    """Build modules on the meta device (no memory; names and shapes only). Affects only this thread."""
    return torch.device("meta")


def build_weightless(cls, config, dtype):
    """The model of `config` built by transformers class `cls` with its parameters and persistent buffers on the
    meta device (no memory) and its non-persistent buffers real.

    This is how transformers' from_pretrained builds a model before it loads the weights, so the skeleton is the
    in-memory model without its weights: construction under `torch.device("meta")` (thread-local, no global
    state of ours), then each non-persistent buffer (rotary frequencies, position ids: computed, not stored) given
    memory and computed by the model's own weight initialisation, which leaves the tensors that the checkpoint
    holds alone (they are marked initialized, as from_pretrained marks the tensors it loaded). Computed this way,
    a buffer is bit for bit the in-memory model's, even where __init__ computes it otherwise (GPT-J's rotary
    table in bfloat16).
    """
    from transformers import initialization

    # from_pretrained's own guard for custom code that calls .item() on torch.linspace in __init__
    safe_creation = getattr(initialization, "meta_device_safe_creation_ops", contextlib.nullcontext)
    build = cls.from_config if cls.__name__.startswith("Auto") else cls._from_config
    with torch.device("meta"), safe_creation():
        model = build(config, dtype=dtype)
    for tensor in model.state_dict(keep_vars=True).values():
        tensor._is_hf_initialized = True
    for module in model.modules():
        for leaf in module._non_persistent_buffers_set:
            if module._buffers.get(leaf) is not None:
                module._buffers[leaf] = torch.empty_like(module._buffers[leaf], device="cpu")
    model.initialize_weights()
    return model


def set_tensor(module, name, tensor):
    """Replace parameter (or buffer) `name` of `module` by `tensor`, keeping its kind."""
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[leaf] = tensor


class Skeleton:
    """The model without its weights, and a way to fill any part of it from the checkpoint."""

    def __init__(self, source, dtype, trust_remote_code=False):
        import transformers

        from .loading import model_class, read_config, torch_dtype

        config_dict = read_config(source)
        config = transformers.AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code)
        cls = model_class(config_dict, trust_remote_code)
        wanted = torch_dtype(dtype)
        if wanted == "auto":
            wanted = getattr(config, "dtype", None) or torch.float32
            wanted = getattr(torch, wanted) if isinstance(wanted, str) else wanted
        self.dtype = wanted
        self.model = build_weightless(cls, config, wanted)
        self.model.eval()
        self.index = TensorIndex(source.path)
        self.prefix = getattr(self.model, "base_model_prefix", "") or ""
        self._rows, self._saved_names = {}, {}  # expert_rows' and _saved_name's answers

    def key(self, name):
        """The checkpoint key of model tensor `name`, or None (checkpoints saved from the base model lack its
        prefix; see resolve_key). A name transformers renames at load (Mixtral's `block_sparse_moe.gate` is the
        model's `mlp.gate`) is looked up under the name its save-time conversion gives it."""
        found = resolve_key(name, self.index, self.prefix)
        if found is None and name not in self._saved_names:
            self._saved_names[name] = _saved_name(self.model, name)
        if found is None and self._saved_names[name] is not None:
            found = resolve_key(self._saved_names[name], self.index, self.prefix)
        return found

    def load(self, name):
        key = self.key(name)
        if key is None and (expert := self._expert_tensor(name)) is not None:
            return expert
        if key is None and (rows := self.expert_rows(name)) is not None:  # a packed experts tensor, older names
            return torch.stack([self._row(name, rows, e) for e in range(len(rows))])
        if key is None:
            raise LowrankError(f"the checkpoint has no tensor for {name}; compress it with --no-stream")
        return self.index.get(key, self.dtype)

    def _expert_tensor(self, name):
        """A tensor of an unpacked MoE experts module (modeling_lowrank.unpack_experts): `...experts.down_proj.3.weight`
        is row 3 of the checkpoint's stacked `...experts.down_proj` (transposed back where the layout is), its
        bias row 3 of `...experts.down_proj_bias`. None for any other name."""
        from .modeling_lowrank import EXPERT_TENSORS, UnpackedExperts, experts_transposed

        stem, _, leaf = name.rpartition(".")
        parent, _, row = stem.rpartition(".")
        owner, _, tensor = parent.rpartition(".")
        if tensor not in EXPERT_TENSORS or not row.isdigit() or leaf not in ("weight", "bias"):
            return None
        try:
            module = self.model.get_submodule(owner)
        except AttributeError:
            return None
        stacked = f"{parent}_bias" if leaf == "bias" else parent
        key = self.key(stacked)
        if not isinstance(module, UnpackedExperts):
            return None
        if key is not None:
            value = self.index.get_row(key, int(row), self.dtype)
        elif (rows := self.expert_rows(stacked)) is not None:
            value = self._row(stacked, rows, int(row))
        else:
            return None
        return value.T.contiguous() if leaf == "weight" and experts_transposed(module) else value

    def _row(self, stacked, rows, expert):
        parts = [self.index.get(key, self.dtype) for key in rows[expert]]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def expert_rows(self, stacked):
        """For a stacked experts tensor that the checkpoint stores one matrix per expert under older names (which
        transformers converts at load: Mixtral's `block_sparse_moe.experts.3.w1` and `w3` make row 3 of
        `mlp.experts.gate_up_proj`): [the checkpoint keys whose matrices, concatenated, make row e, for each e].
        None when the checkpoint does not hold it that way."""
        if stacked not in self._rows:
            self._rows[stacked] = _converted_rows(self.model, stacked, self.key)
        return self._rows[stacked]

    def fill(self, module, prefix):
        """Load every parameter and persistent buffer of `module` (named `prefix` in the model)."""
        persistent = set(module.state_dict(keep_vars=True))
        for name, _ in list(module.named_parameters()) + list(module.named_buffers()):
            if name in persistent:
                set_tensor(module, name, self.load(f"{prefix}{name}"))
        return module

    def empty(self, module):
        """Drop the weights of `module` again (parameters back on the meta device)."""
        for name, param in list(module.named_parameters()):
            set_tensor(module, name, torch.empty_like(param, device="meta"))


def _revert(model, tensors):
    """transformers' save-time conversion of `tensors` ({model name: tensor}) to checkpoint names, or None where
    this transformers has none or it fails on them."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return None
    try:
        return revert_weight_conversion(model, tensors)
    except Exception:  # a conversion this reading does not cover: the caller says what it cannot read
        return None


def _saved_name(model, name):
    """The one checkpoint name transformers saves model tensor `name` under, if that is another name."""
    tag = torch.zeros(1)
    saved = _revert(model, {name: tag}) or {}
    if len(saved) != 1:
        return None
    other, value = next(iter(saved.items()))
    return other if other != name and value is tag else None  # a renaming, not a conversion of the values


def _converted_rows(model, stacked, key, parts=12):
    """Skeleton.expert_rows, found by transformers' own save-time conversion (revert_weight_conversion) of a tagged
    stand-in for `stacked`: [E, parts, 1] holding 0, 1, 2, ... Each tensor the conversion gives back names a
    checkpoint key and, by its tags, the expert and the slice of that expert's row it is (12 parts: a row may be
    made of 2 or 3 matrices). Anything that is not such a clean split of rows into whole matrices gives None."""
    owner, _, tensor = stacked.rpartition(".")
    try:  # the stacked parameter, or the ModuleList it was unpacked into (modeling_lowrank.unpack_experts)
        value = getattr(model.get_submodule(owner), tensor.removesuffix("_bias"))
    except AttributeError:
        return None
    experts = value.shape[0] if isinstance(value, torch.Tensor) else len(value)
    tags = torch.arange(experts * parts, dtype=torch.float64).view(experts, parts, 1)
    saved = _revert(model, {stacked: tags})
    if saved is None:
        return None
    pieces = {}
    for name, value in saved.items():
        value, checkpoint_key = value.reshape(-1), key(name)
        start = int(value[0]) if value.numel() else -1
        if checkpoint_key is None or start < 0 or not torch.equal(value, torch.arange(
                start, start + value.numel(), dtype=torch.float64)):
            return None
        expert, offset = divmod(start, parts)
        pieces.setdefault(expert, []).append((offset, value.numel(), checkpoint_key))
    rows = []
    for expert in range(experts):
        spans = sorted(pieces.get(expert, []))
        ends = [offset + size for offset, size, _ in spans]
        if not spans or [offset for offset, _, _ in spans] != [0, *ends[:-1]] or ends[-1] != parts:
            return None
        rows.append([checkpoint_key for _, _, checkpoint_key in spans])
    return rows


class StreamingBlocks:
    """BlockSource for the pipeline: blocks filled from the shards on demand and emptied when released.

    `prefix_keys` are the tensors stored before the blocks (`before` of checkpoint.partition_keys): what the
    calibration forward needs up to the first block (the input embeddings), loaded for the capture only.
    """

    def __init__(self, skeleton, blocks_name, prefix_keys):
        self.skeleton = skeleton
        self.blocks_name = blocks_name
        self.blocks = skeleton.model.get_submodule(blocks_name)
        self.prefix_keys = list(prefix_keys)

    def __len__(self):
        return len(self.blocks)

    def materialize(self, index):
        block = self.blocks[index]
        if next(block.parameters()).device.type == "meta":
            self.skeleton.fill(block, f"{self.blocks_name}.{index}.")
        return block

    def release(self, index, block):
        self.skeleton.empty(block)

    def open_capture(self, model, device, stack=None):
        for name in self.prefix_keys:
            set_tensor(model, name, self.skeleton.load(name).to(device))

    def close_capture(self, model, stack=None):
        for name in self.prefix_keys:
            set_tensor(model, name, torch.empty_like(model.get_parameter(name) if name in dict(
                model.named_parameters()) else model.get_buffer(name), device="meta"))
