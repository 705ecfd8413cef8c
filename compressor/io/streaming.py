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
        return tensor if dtype is None or not tensor.is_floating_point() else tensor.to(dtype)

    def get_row(self, name, row, dtype=None):
        """`name`[row] alone (one expert of a stacked [E, ...] tensor): the other rows are not read."""
        from safetensors import safe_open

        with safe_open(os.path.join(self.directory, self.files[name]), "pt") as handle:
            tensor = handle.get_slice(name)[row]
        return tensor if dtype is None or not tensor.is_floating_point() else tensor.to(dtype)


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

    def key(self, name):
        """The checkpoint key of model tensor `name`, or None (checkpoints saved from the base model lack its
        prefix; see resolve_key)."""
        return resolve_key(name, self.index, self.prefix)

    def load(self, name):
        key = self.key(name)
        if key is None and (expert := self._expert_tensor(name)) is not None:
            return expert
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
        key = self.key(f"{parent}_bias" if leaf == "bias" else parent)
        if not isinstance(module, UnpackedExperts) or key is None:
            return None
        value = self.index.get_row(key, int(row), self.dtype)
        return value.T.contiguous() if leaf == "weight" and experts_transposed(module) else value

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
