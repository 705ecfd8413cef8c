"""The factorized checkpoint: writing it (atomically, as a sibling directory renamed at the end) and loading it.

Layout: an ordinary Hugging Face directory. Tensor names are the original ones, except that a factorized
linear `X` stores `X.down.weight` (r x in) and `X.up.weight` (out x r, plus `X.up.bias`). config.json keeps
the base config and adds a custom `model_type` ("lowrank_<base>"), `architectures`, an `auto_map` into the
bundled `modeling_lowrank.py`, and a `lowrank` block (format version, method, ratio, ranks, provenance).
A custom model_type makes a plain transformers load fail loudly instead of building random weights.
"""

import contextlib
import json
import os
import shutil
import time
from typing import TYPE_CHECKING, Any

from ..errors import LowrankError, UsageError
from .modeling_lowrank import CLASS_PREFIX, FORMAT_VERSION, MODEL_TYPE_PREFIX, lowrank_class
from .publish import name_failed_write, new_staging_dir, publish, staging_dir
from .shards import ShardWriter

if TYPE_CHECKING:
    from transformers import PreTrainedModel

MODELING_FILE = "modeling_lowrank.py"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")
NOT_COPIED = {"config.json", MODELING_FILE, "README.md", "compression_report.json", "compression_report.md"}


def declared_copies(model):
    """The names the model's class declares as tied copies of another tensor (the keys of `_tied_weights_keys`, e.g.
    lm_head.weight tied to the input embeddings), whether or not its config ties them."""
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return set(tied) if not isinstance(tied, dict) else set(tied.keys())


def shared_copies(named_tensors, declared=()):
    """The names among `named_tensors` ((name, tensor) pairs) whose tensor is a tied copy: the same memory as another
    one's (same data pointer, shape and dtype; an empty tensor is never a copy). Of each group one name owns the
    tensor and is not returned: the first that is not in `declared` (see declared_copies), else the first.

    Needs real tensors: on a weightless (meta) model every data pointer is 0; use tied_names there.
    """
    owners = {}
    for name, tensor in named_tensors:
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype) if tensor.numel() else (name,)
        owners.setdefault(key, []).append(name)
    copies = set()
    for names in owners.values():
        owner = ([name for name in names if name not in declared] or names)[0]
        copies.update(name for name in names if name != owner)
    return copies


def unique_state_dict(model):
    """The state dict with tied tensors stored once: a tied copy (e.g. lm_head tied to the embeddings) is dropped."""
    state = model.state_dict()
    copies = shared_copies(state.items(), declared_copies(model))
    return {name: tensor for name, tensor in state.items() if name not in copies}


def base_class(cls):
    """The transformers class behind one of our LowRank* classes (or `cls` itself)."""
    return cls.__mro__[1] if cls.__module__.endswith("modeling_lowrank") else cls


def partition_keys(model, blocks_name, tied=()):
    """The model's tensor names outside the blocks, split into those stored before the blocks and after them
    (the order a state dict has), leaving out `tied` copies. Works on a weightless (meta) model too.
    `blocks_name`: one stack, or several (a list: an encoder-decoder's); what lies between them comes after."""
    stacks = [blocks_name] if isinstance(blocks_name, str) else blocks_name
    inside = tuple(name + "." for name in stacks)
    before, after, seen_block = [], [], False
    for name in model.state_dict():
        if name.startswith(inside):
            seen_block = True
        elif name not in tied:
            (after if seen_block else before).append(name)
    return before, after


def tied_names(model):
    """Tensor names that are copies of others (e.g. lm_head tied to the input embeddings), stored once: the declared
    copies, when the config ties the word embeddings. Works on a weightless (meta) model too."""
    if not getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        return set()
    return declared_copies(model)


def auto_map_for(model):
    """auto_map entries into the bundled modeling file, for every Auto class that knows the base model type.

    Only classes built on the model's own config class: an Auto mapping may list another family's class under
    this model type (transformers 5 maps "qwen2" to JevForDecision, whose config is JevConfig), and registering
    it for our config would make every load fail on the mismatch."""
    import transformers

    config_class = base_class(type(model.config))
    base_type = config_class.model_type
    entries = {"AutoConfig": f"modeling_lowrank.{CLASS_PREFIX}{config_class.__name__}"}
    for auto_name in sorted(n for n in dir(transformers) if n.startswith("AutoModel")):
        mapping = getattr(getattr(getattr(transformers, auto_name), "_model_mapping", None), "_model_mapping", None)
        class_name = (mapping or {}).get(base_type)
        if isinstance(class_name, (list, tuple)):
            class_name = class_name[0]
        model_class = getattr(transformers, class_name, None) if isinstance(class_name, str) else None
        if isinstance(model_class, type) and getattr(model_class, "config_class", None) is config_class:
            entries[auto_name] = f"modeling_lowrank.{CLASS_PREFIX}{class_name}"
    return entries


def checkpoint_config(model, block, dtype=None):
    """config.json of the factorized checkpoint: the base config, re-typed, plus the `lowrank` block. `dtype`: the
    dtype the weights were written in (default: the model's)."""
    config = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "auto_map", "_commit_hash"):
        config.pop(key, None)
    config["dtype"] = str(dtype or next(model.parameters()).dtype).removeprefix("torch.")
    config["model_type"] = MODEL_TYPE_PREFIX + base_class(type(model.config)).model_type
    config["architectures"] = [CLASS_PREFIX + base_class(type(model)).__name__]
    config["auto_map"] = auto_map_for(model)
    config["lowrank"] = block
    return config


def _copy_extra_files(source, model, tokenizer, staging):
    if source.kind == "dir":
        for name in sorted(os.listdir(source.path)):
            path = os.path.join(source.path, name)
            if os.path.isfile(path) and name not in NOT_COPIED and not name.endswith(WEIGHT_SUFFIXES):
                shutil.copy2(path, os.path.join(staging, name))
        return
    # GGUF files and hub ids: save what transformers rebuilt from them.
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(staging)


class CheckpointWriter:
    """A factorized checkpoint written progressively into the staging sibling of `output`: tensors go out as
    they are ready (block by block), the rest at `finish`, which renames the directory into place.

    `state` (from `state()`) continues an interrupted run's staging directory instead of starting afresh.
    `dtype`: floating tensors are written in it (default: as given).
    """

    def __init__(self, output, max_shard_bytes, state=None, dtype=None):
        self.output, self.dtype = output, dtype
        self.staging = new_staging_dir(output) if state is None else staging_dir(output)
        self.shards = ShardWriter(self.staging, max_shard_bytes, state=state)
        self.seconds = 0.0  # time spent writing (the writes interleave with the compression)

    @contextlib.contextmanager
    def _timed(self):
        start = time.perf_counter()
        yield
        self.seconds += time.perf_counter() - start

    @contextlib.contextmanager
    def _failing(self):
        """A write that fails (a full disk, a NaN tensor) removes the staging directory, journal included: on a full
        disk it holds the space that ran out, and a NaN would come back on --resume. Ctrl-C keeps it (--resume)."""
        try:
            yield
        except Exception as error:
            name_failed_write(error, self.output)
            self.abort()
            raise

    def add(self, name, tensor):
        if self.dtype is not None and tensor.is_floating_point() and tensor.dtype != self.dtype:
            tensor = tensor.to(self.dtype)
        with self._failing(), self._timed():
            self.shards.add(name, tensor)

    def state(self):
        """What is written so far (JSON-serialisable, for `CheckpointWriter(..., state=)`), made durable first."""
        with self._failing(), self._timed():
            self.shards.sync()
        return self.shards.state()

    def commit(self):
        """Call once the state from `state()` is saved: deletes the staged data of the shards closed since the last
        commit, which that state no longer needs. Everything the saved state refers to is durable by then: the open
        shard's data was fsynced by `state()`, and each closed shard was fsynced (and renamed durably) as it closed."""
        self.shards.commit()

    def finish(self, model, *, source, tokenizer, block, extra_files):
        """Write the rest (config, bundled modeling file, copied files, reports) and publish.

        `extra_files(weight_bytes, weight_files, seconds)` returns {file name: text or bytes} to add.
        Returns the weight file names.
        """
        with self._failing():
            with self._timed():
                files = self.shards.finish()
            weight_bytes = sum(os.path.getsize(os.path.join(self.staging, name)) for name in files)
            extra = extra_files(weight_bytes, files, self.seconds)
            for name in os.listdir(self.staging):  # resume bookkeeping does not ship
                if name.startswith("."):
                    os.remove(os.path.join(self.staging, name))
            _copy_extra_files(source, model, tokenizer, self.staging)
            with open(os.path.join(self.staging, "config.json"), "w") as f:
                json.dump(checkpoint_config(model, block, self.dtype), f, indent=2, sort_keys=True)
                f.write("\n")
            shutil.copyfile(os.path.join(os.path.dirname(__file__), MODELING_FILE),
                            os.path.join(self.staging, MODELING_FILE))
            for name, text in extra.items():
                with open(os.path.join(self.staging, name), "wb" if isinstance(text, bytes) else "w") as f:
                    f.write(text)
            publish(self.staging, self.output)
            return files

    def abort(self):
        shutil.rmtree(self.staging, ignore_errors=True)


def write_checkpoint(model, output, *, source, tokenizer, block, extra_files, max_shard_bytes):
    """Write a whole in-memory factorized `model` at once (see CheckpointWriter)."""
    writer = CheckpointWriter(output, max_shard_bytes)
    try:
        for name, tensor in unique_state_dict(model).items():
            writer.add(name, tensor)
        return writer.finish(model, source=source, tokenizer=tokenizer, block=block, extra_files=extra_files)
    except BaseException:
        writer.abort()
        raise


def read_lowrank_config(path):
    try:
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"{path} is not a model directory (no config.json)") from None
    except json.JSONDecodeError as error:
        raise LowrankError(f"{path}/config.json is not valid JSON ({error})") from None
    block = config.get("lowrank")
    if not str(config.get("model_type", "")).startswith(MODEL_TYPE_PREFIX) or not isinstance(block, dict):
        raise UsageError(f"{path} is not a lowrank factorized checkpoint")
    if int(block.get("format_version", 0)) > FORMAT_VERSION:
        raise UsageError(
            f"{path} uses lowrank checkpoint format {block['format_version']}, newer than this lowrank "
            f"understands ({FORMAT_VERSION}); upgrade lowrank"
        )
    return config


def register(config):
    """Register the checkpoint's classes with transformers' Auto classes, so that they load without remote code."""
    import transformers

    auto_map = config["auto_map"]
    config_class = lowrank_class(auto_map["AutoConfig"].rpartition(".")[2])
    transformers.AutoConfig.register(config["model_type"], config_class, exist_ok=True)
    for auto_name, reference in auto_map.items():
        if auto_name.startswith("AutoModel") and hasattr(transformers, auto_name):
            getattr(transformers, auto_name).register(config_class, lowrank_class(reference.rpartition(".")[2]),
                                                      exist_ok=True)


def load_pretrained(path: str | os.PathLike[str], **kwargs: Any) -> "PreTrainedModel":
    """Load a lowrank checkpoint as a transformers model with LowRankLinear modules (no remote code needed).

    Keyword arguments go to `from_pretrained` (dtype, device_map, ...). The model class is the original
    architecture's (e.g. LlamaForCausalLM), subclassed to hold the factorized layers. By default its linear
    layers run a decode step's few float32 rows through a faster CPU kernel (`lowrank.decode_layout`);
    `decode_layout=False` keeps transformers' F.linear. Also by default, the layers of an input group (q/k/v,
    gate/up) with a factorized member run their first GEMMs as one (`lowrank.group_downs`); `group_downs=False`
    keeps one GEMM per factor.
    """
    config = read_lowrank_config(path)
    register(config)
    return lowrank_class(config["architectures"][0]).from_pretrained(path, **kwargs)
