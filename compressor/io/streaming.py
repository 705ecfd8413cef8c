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


@contextlib.contextmanager
def weightless():
    """Build modules with their parameters on the meta device (no memory) and their buffers real: buffers such
    as rotary frequencies are computed in __init__ and are not in the checkpoint."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


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

        from .loading import _model_class, read_config, torch_dtype

        config_dict = read_config(source)
        config = transformers.AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code)
        cls = _model_class(config_dict, trust_remote_code)
        wanted = torch_dtype(dtype)
        if wanted == "auto":
            wanted = getattr(config, "dtype", None) or torch.float32
            wanted = getattr(torch, wanted) if isinstance(wanted, str) else wanted
        self.dtype = wanted
        with weightless():
            build = cls.from_config if cls.__name__.startswith("Auto") else cls._from_config
            self.model = build(config, dtype=wanted)
        self.model.eval()
        self.index = TensorIndex(source.path)
        self.prefix = getattr(self.model, "base_model_prefix", "")
        self.prefix_keys = []  # tensors stored before the blocks, set by the caller from partition_keys

    def key(self, name):
        """The checkpoint key of model tensor `name` (checkpoints saved from the base model lack its prefix)."""
        candidates = [name]
        if self.prefix and name.startswith(self.prefix + "."):
            candidates.append(name[len(self.prefix) + 1 :])
        elif self.prefix:
            candidates.append(f"{self.prefix}.{name}")
        for candidate in candidates:
            if candidate in self.index:
                return candidate
        return None

    def load(self, name):
        key = self.key(name)
        if key is None:
            raise LowrankError(f"the checkpoint has no tensor for {name}; compress it with --no-stream")
        return self.index.get(key, self.dtype)

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
    """BlockSource for the pipeline: blocks filled from the shards on demand and emptied when released."""

    def __init__(self, skeleton, blocks_name):
        self.skeleton = skeleton
        self.blocks_name = blocks_name
        self.blocks = skeleton.model.get_submodule(blocks_name)

    def __len__(self):
        return len(self.blocks)

    def materialize(self, index):
        block = self.blocks[index]
        if next(block.parameters()).device.type == "meta":
            self.skeleton.fill(block, f"{self.blocks_name}.{index}.")
        return block

    def release(self, index, block):
        self.skeleton.empty(block)

    def open_capture(self, model, device):
        for name in self.skeleton.prefix_keys:
            set_tensor(model, name, self.skeleton.load(name).to(device))

    def close_capture(self, model):
        for name in self.skeleton.prefix_keys:
            set_tensor(model, name, torch.empty_like(model.get_parameter(name) if name in dict(
                model.named_parameters()) else model.get_buffer(name), device="meta"))
