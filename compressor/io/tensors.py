"""A model checkpoint's tensors by name, read one at a time (for DoRA's true error and dense-delta extraction).

Safetensors checkpoints (single or sharded) are read lazily, one tensor at a time, so memory stays at a tensor or
two whatever the model's size. Other sources (.gguf, .bin checkpoints) are loaded once through
lowrank.loading and served from the model's state dict.
"""

import json
import os

from ..errors import LowrankError, UsageError
from .loading import safetensors_error
from .shards import INDEX_NAME, check_checkpoint_files, read_header


def resolve_key(name, keys, prefix=None):
    """The checkpoint key that stores `name` (a tensor or module name of the model), or None.

    `keys` holds (`in`) the checkpoint's keys. A checkpoint saved from the base model lacks the head model's prefix
    (e.g. `model.`), one saved from the head model has it. `name` itself comes first; then, when the model's
    `prefix` (its base_model_prefix, "" for none) is known, `name` with that prefix removed if it starts with it,
    else added; when it is not (None: no model at hand), the one key that ends with `.name` or that `name` ends
    with (`.key`), if exactly one does (`keys` must then be iterable).

    modeling_lowrank.resolve_module_name applies the known-prefix rule to the modules of a built model; it keeps its
    own copy because that file is bundled into every checkpoint and cannot import lowrank.
    """
    if name in keys:
        return name
    if prefix is None:
        matches = [key for key in keys if key.endswith("." + name) or name.endswith("." + key)]
        return matches[0] if len(matches) == 1 else None
    if prefix:
        other = name[len(prefix) + 1 :] if name.startswith(prefix + ".") else f"{prefix}.{name}"
        if other in keys:
            return other
    return None


class CheckpointTensors:
    def __init__(self, spec, trust_remote_code=False):
        from .loading import read_config, resolve_model

        self.spec = spec
        self.source = resolve_model(spec)
        if self.source.kind == "hub":
            raise UsageError(f"{spec}: give a local checkpoint directory (or pkg:NAME), not a hub id")
        self.config = read_config(self.source)
        self._files, self._handles, self._state = {}, {}, None
        names = []
        if self.source.kind == "dir":
            names = sorted(n for n in os.listdir(self.source.path) if n.endswith(".safetensors"))
        if names:
            check_checkpoint_files(self.source.path)
            index = os.path.join(self.source.path, INDEX_NAME)
            if os.path.exists(index):
                with open(index) as f:
                    names = sorted(set(json.load(f)["weight_map"].values()))
            self.shapes = {}
            for name in names:
                header = read_header(os.path.join(self.source.path, name))
                header.pop("__metadata__", None)
                for key, entry in header.items():
                    self._files[key] = name
                    self.shapes[key] = tuple(entry["shape"])
        else:
            from .checkpoint import unique_state_dict
            from .loading import load_model

            model, _ = load_model(self.source, dtype="float32", trust_remote_code=trust_remote_code)
            self._state = unique_state_dict(model)
            self.shapes = {k: tuple(v.shape) for k, v in self._state.items()}
            if self.config is None:
                self.config = model.config.to_dict()

    def __contains__(self, key):
        return key in self.shapes

    def names(self):
        return list(self.shapes)

    def get(self, key):
        if self._state is not None:
            return self._state[key]
        name = self._files[key]
        if name not in self._handles:
            from safetensors import safe_open

            path = os.path.join(self.source.path, name)
            try:
                self._handles[name] = safe_open(path, framework="pt")
            except Exception as error:  # noqa: BLE001  (safetensors raises its own error type)
                raise safetensors_error(path, error) from None
        return self._handles[name].get_tensor(key)

    def find(self, module_weight):
        """The key of a module's weight: exact, else the one key that ends with it or that it ends with (a model
        saved with or without its outer prefix, e.g. `model.`; see resolve_key)."""
        key = resolve_key(module_weight, self.shapes)
        if key is not None:
            return key
        raise LowrankError(f"{self.spec} has no weight {module_weight}; is it the base model of this adapter?")
