"""LoRA adapter files: find the modules of a PEFT directory or a kohya / diffusers single file, and write them back.

Formats read (and written back in the same format):
- PEFT: a directory with adapter_config.json and adapter_model.safetensors (or a legacy adapter_model.bin, loaded
  with weights_only=True), or a directory whose single sub-folder holds one (PEFT saves a non-default adapter as
  <dir>/<adapter name>/). Keys: <prefix>.lora_A.weight (r x in, or r x in x kernel for conv), <prefix>.lora_B.weight
  (out x r [x 1...]), optional <prefix>.lora_B.bias, embeddings' <prefix>.lora_embedding_A (r x num_embeddings) and
  <prefix>.lora_embedding_B (dim x r), DoRA's <prefix>.lora_magnitude_vector. <prefix> is base_model.model.<module>.
- kohya / sd-scripts / LyCORIS LoCon: one .safetensors with <name>.lora_down.weight, <name>.lora_up.weight,
  <name>.alpha (missing: alpha = r) and DoRA's <name>.dora_scale.
- diffusers: one .safetensors with PEFT-style <prefix>.lora_A.weight / lora_B.weight and no config (optional
  <prefix>.alpha; missing: alpha = r, i.e. scale 1).

Every tensor that is not a LoRA factor (modules_to_save, trainable-token deltas, DoRA magnitudes) is copied through
unchanged. Keys of other PEFT methods, or LoRA-looking keys of an unknown layout, are refused rather than copied.
"""

import json
import math
import os
import re
from dataclasses import dataclass, field

from ..errors import LowrankError, UsageError

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
LEGACY_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."

# Key components of adapters that are not an additive B·A update (or not one lowrank has verified).
NOT_ADDITIVE = {
    "hada_w1_a": "LoHa", "hada_w1_b": "LoHa", "lokr_w1": "LoKr", "lokr_w1_a": "LoKr", "lokr_w2": "LoKr",
    "lora_E": "AdaLoRA", "lora_mid": "LoCon with a Tucker core (lora_mid)", "vera_lambda_b": "VeRA",
    "vera_lambda_d": "VeRA", "oft_r": "OFT", "oft_R": "OFT", "boft_R": "BOFT", "ia3_l": "IA3",
    "fourierft_spectrum": "FourierFT", "vblora_logits_A": "VB-LoRA", "hra_u": "HRA", "lora_diag": "DyLoRA",
}
# adapter_config.json fields that turn LoRA into something that is not a plain additive B·A update.
NOT_ADDITIVE_CONFIG = {
    "use_qalora": "QA-LoRA", "use_bdlora": "block-diagonal LoRA", "kasa_config": "KaSA",
    "arrow_config": "Arrow routing", "monteclora_config": "MonteCLoRA", "target_parameters": "LoRA on parameters",
}
PEFT_ROLES = {"lora_A.weight": "a", "lora_B.weight": "b", "lora_B.bias": "bias", "lora_embedding_A": "a",
              "lora_embedding_B": "b", "lora_magnitude_vector": "magnitude",
              "lora_magnitude_vector.weight": "magnitude"}
KOHYA_ROLES = {"lora_down.weight": "a", "lora_up.weight": "b", "alpha": "alpha", "dora_scale": "magnitude"}


@dataclass
class LoraModule:
    """One LoRA pair. `name` is what users see and what PEFT's rank_pattern matches (the module path)."""

    name: str
    prefix: str
    kind: str  # linear | conv | embedding
    keys: dict  # role (a, b, bias, magnitude, alpha) -> tensor key
    a_shape: tuple
    b_shape: tuple
    rank: int
    alpha: float = 0.0
    scale: float = 1.0

    @property
    def out_features(self):
        return self.b_shape[0]

    @property
    def in_features(self):
        return math.prod(self.a_shape[1:])

    @property
    def shape(self):
        """The update's shape as the model sees it: [out, in(, kernel...)], embeddings [num_embeddings, dim]."""
        if self.kind == "embedding":
            return [self.a_shape[1], self.b_shape[0]]
        return [self.b_shape[0], *self.a_shape[1:]]

    def flat(self, b, a):
        return b.reshape(self.out_features, -1), a.reshape(a.shape[0], -1)

    def unflat(self, up, down):
        k = up.shape[1]
        return up.reshape(self.out_features, k, *self.b_shape[2:]), down.reshape(k, *self.a_shape[1:])


@dataclass
class Adapter:
    format: str  # peft | kohya | diffusers
    path: str  # what the user gave
    weights: str  # the weights file
    modules: list
    keys: list  # every tensor key, in file order
    config: dict | None = None
    directory: str | None = None  # PEFT: the directory with adapter_config.json
    subfolder: str | None = None  # PEFT: the adapter sat in this sub-folder of `path`
    metadata: dict = field(default_factory=dict)
    use_rslora: bool = False
    use_dora: bool = False
    header: dict = field(default_factory=dict)  # key -> (dtype name, shape)
    _handle: object = None

    def tensor(self, key):
        if isinstance(self._handle, dict):
            return self._handle[key]
        return self._handle.get_tensor(key)

    @property
    def global_scale(self):
        """PEFT: the scale of the config's global r and lora_alpha."""
        return peft_scale(self.config["lora_alpha"], self.config["r"], self.use_rslora)


def peft_scale(alpha, rank, rslora):
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def pattern_value(patterns, module_name, default):
    """PEFT's lookup of rank_pattern / alpha_pattern: the first key (in order) for which
    re.match(rf"(.*\\.)?({key})$", module_name) matches wins; no match gives the global value."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


# --- reading -----------------------------------------------------------------------------------------------------


def _open_weights(path):
    """(handle, header {key: (dtype, shape)}, metadata, keys in file order)."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        from ..io.shards import read_header

        header = read_header(path)  # a clean error for truncated or corrupt files
        metadata = header.pop("__metadata__", None) or {}
        keys = sorted(header, key=lambda k: header[k]["data_offsets"][0])
        try:
            handle = safe_open(path, framework="pt")
        except Exception as error:  # noqa: BLE001  (safetensors raises its own error types)
            raise LowrankError(f"{os.path.basename(path)} is not a readable safetensors file ({error})") from None
        return handle, {k: (header[k]["dtype"], tuple(header[k]["shape"])) for k in keys}, metadata, keys
    import pickle

    import torch

    from ..io.loading import refused_pickle

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # objects other than tensors: refused, never loaded another way
        raise refused_pickle(path, error) from None
    except Exception as error:  # noqa: BLE001
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise LowrankError(f"cannot read {os.path.basename(path)} as a weights-only PyTorch file ({first})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LowrankError(f"{os.path.basename(path)} is not a state dict of tensors")
    return state, {k: (str(v.dtype), tuple(v.shape)) for k, v in state.items()}, {}, list(state)


def _refuse_other_methods(keys, where):
    for key in keys:
        for part in key.split("."):
            if part in NOT_ADDITIVE:
                raise UsageError(
                    f"{where} is a {NOT_ADDITIVE[part]} adapter (key {key}), not an additive LoRA update B·A; "
                    "lowrank squeeze handles LoRA, rsLoRA and DoRA adapters"
                )


def _split_key(key, roles):
    for suffix, role in roles.items():
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], role
    return None, None


def _group(keys, roles, where):
    """{prefix: {role: key}} for LoRA keys; refuses LoRA-looking keys of no known layout."""
    groups = {}
    for key in keys:
        prefix, role = _split_key(key, roles)
        if prefix is None:
            if any(part.startswith("lora_") or part in ("lora_down", "lora_up") for part in key.split(".")):
                hint = ""
                if re.search(r"\.lora_[AB]\.[^.]+\.weight$", key):
                    hint = " (the key carries an adapter name: save the adapter with PEFT's save_pretrained)"
                raise UsageError(f"{where}: unrecognized LoRA tensor {key}{hint}; refusing to guess its layout")
            continue
        groups.setdefault(prefix, {})[role] = key
    return groups


def _module(name, prefix, roles, header, where):
    if "a" not in roles or "b" not in roles:
        have, missing = ("A", "B") if "a" in roles else ("B", "A")
        if "a" not in roles and "b" not in roles:
            return None  # only a magnitude / alpha: copied through
        raise UsageError(f"{where}: {prefix} has a LoRA {have} factor but no {missing} factor")
    a_shape, b_shape = header[roles["a"]][1], header[roles["b"]][1]
    embedding = roles["a"].endswith("lora_embedding_A")
    if embedding or (len(a_shape) == 2 and len(b_shape) == 2):
        kind = "embedding" if embedding else "linear"
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
            raise UsageError(f"{where}: {prefix} has factors of shapes {list(a_shape)} and {list(b_shape)}, "
                             "which do not form a LoRA pair")
    else:
        kind = "conv"
        if len(a_shape) != len(b_shape) or len(a_shape) < 3 or any(d != 1 for d in b_shape[2:]):
            raise UsageError(f"{where}: {prefix} has conv factors of shapes {list(a_shape)} and {list(b_shape)}, "
                             "an unknown layout")
        if b_shape[1] != a_shape[0]:
            raise UsageError(f"{where}: {prefix} is a grouped-conv LoRA (groups > 1), which cannot be squeezed")
    return LoraModule(name=name, prefix=prefix, kind=kind, keys=dict(roles), a_shape=a_shape, b_shape=b_shape,
                      rank=a_shape[0])


def _find_peft_directory(path):
    """(adapter directory, sub-folder name or None) for a directory the user gave."""
    if os.path.isfile(os.path.join(path, CONFIG_NAME)):
        return path, None
    subs = sorted(d for d in os.listdir(path) if os.path.isfile(os.path.join(path, d, CONFIG_NAME)))
    if len(subs) == 1:
        return os.path.join(path, subs[0]), subs[0]
    if subs:
        raise UsageError(f"{path} holds several adapters ({', '.join(subs)}); pass one of them, e.g. "
                         f"{os.path.join(path, subs[0])}")
    raise UsageError(f"{path} is not a PEFT adapter directory (no {CONFIG_NAME}, in it or in a sub-folder)")


def _read_config(directory):
    path = os.path.join(directory, CONFIG_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except UnicodeDecodeError:
        raise LowrankError(f"{path} is not UTF-8 text; is it really a PEFT adapter config?") from None
    except (json.JSONDecodeError, RecursionError) as error:
        raise LowrankError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise LowrankError(f"{path} is not a JSON object")
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise UsageError(f"{path}: peft_type {config.get('peft_type')!r} is not additive LoRA; lowrank squeeze "
                         "handles LORA adapters (plain, rsLoRA, DoRA)")
    for key, name in NOT_ADDITIVE_CONFIG.items():
        if config.get(key):
            raise UsageError(f"{path}: {key} is set ({name}), which is not a plain additive LoRA update B·A")
    for key in ("r", "lora_alpha"):
        if not _positive(config.get(key)):
            raise UsageError(f"{path}: {key} must be a positive number, got {config.get(key)!r}")
    for key, what, valid in (("rank_pattern", "a positive whole rank", lambda v: _positive(v) and type(v) is int),
                             ("alpha_pattern", "a positive number", _positive)):
        patterns = config.get(key)
        if patterns is not None and not isinstance(patterns, dict):
            raise UsageError(f"{path}: {key} must be an object of {{module regex: {what}}}, got {patterns!r}")
        for pattern, value in (patterns or {}).items():
            try:
                re.compile(pattern)
            except (re.error, RecursionError, OverflowError) as error:
                raise UsageError(f"{path}: {key} key {pattern!r} is not a regular expression ({error})") from None
            if not valid(value):
                raise UsageError(f"{path}: {key} gives {pattern!r} {value!r}, not {what}")
    return config


def _positive(value):
    """A JSON number above 0, finite (json reads NaN and Infinity), not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf


def open_peft(path):
    directory, subfolder = _find_peft_directory(path)
    config = _read_config(directory)
    weights = os.path.join(directory, SAFETENSORS_NAME)
    if not os.path.exists(weights):
        weights = os.path.join(directory, LEGACY_NAME)
        if not os.path.exists(weights):
            raise UsageError(f"{directory} has {CONFIG_NAME} but no {SAFETENSORS_NAME} or {LEGACY_NAME}")
    where = os.path.basename(os.path.normpath(directory)) + "/" + os.path.basename(weights)
    handle, header, metadata, keys = _open_weights(weights)
    _refuse_other_methods(keys, where)
    rslora = bool(config.get("use_rslora"))
    modules = []
    for prefix, roles in _group(keys, PEFT_ROLES, where).items():
        name = prefix[len(PEFT_PREFIX):] if prefix.startswith(PEFT_PREFIX) else prefix
        module = _module(name, prefix, roles, header, where)
        if module is None:
            continue
        rank = pattern_value(config.get("rank_pattern"), name, config["r"])
        if rank != module.rank:
            raise UsageError(f"{where}: {CONFIG_NAME} gives {name} rank {rank} but its tensors have rank "
                             f"{module.rank}; the config does not belong to these weights")
        module.alpha = pattern_value(config.get("alpha_pattern"), name, config["lora_alpha"])
        module.scale = peft_scale(module.alpha, module.rank, rslora)
        modules.append(module)
    return Adapter(format="peft", path=path, weights=weights, modules=modules, keys=keys, config=config,
                   directory=directory, subfolder=subfolder, metadata=metadata, use_rslora=rslora,
                   use_dora=bool(config.get("use_dora")), header=header, _handle=handle)


def open_single_file(path):
    where = os.path.basename(path)
    handle, header, metadata, keys = _open_weights(path)
    _refuse_other_methods(keys, where)
    kohya = any(k.endswith(".lora_down.weight") for k in keys)
    roles = KOHYA_ROLES if kohya else {**PEFT_ROLES, "alpha": "alpha"}
    modules = []
    for prefix, group in _group(keys, roles, where).items():
        module = _module(prefix, prefix, group, header, where)
        if module is None:
            continue
        module.alpha = float(handle.get_tensor(group["alpha"]).float().item()) if "alpha" in group else module.rank
        module.scale = module.alpha / module.rank
        modules.append(module)
    return Adapter(format="kohya" if kohya else "diffusers", path=path, weights=path, modules=modules, keys=keys,
                   metadata=metadata, use_dora=any("magnitude" in m.keys for m in modules), header=header,
                   _handle=handle)


def open_adapter(path):
    """Read an adapter (PEFT directory, or kohya / diffusers .safetensors) and find its LoRA modules."""
    spec = os.path.expanduser(path)
    if os.path.isdir(spec):
        adapter = open_peft(spec)
    elif os.path.isfile(spec):
        if os.path.basename(spec) in (SAFETENSORS_NAME, LEGACY_NAME) and os.path.exists(
                os.path.join(os.path.dirname(os.path.abspath(spec)), CONFIG_NAME)):
            raise UsageError(f"{path} is part of a PEFT adapter directory; pass the directory "
                             f"{os.path.dirname(path) or '.'}")
        if not spec.endswith(".safetensors"):
            raise UsageError(f"{path}: give a PEFT adapter directory or a kohya / diffusers .safetensors file")
        adapter = open_single_file(spec)
    else:
        raise UsageError(f"{path}: no such file or directory")
    if not adapter.modules:
        sample = ", ".join(adapter.keys[:3]) or "none"
        raise UsageError(f"{path}: no LoRA module found (keys look like: {sample}); refusing to copy it unchanged")
    return adapter


# --- writing -----------------------------------------------------------------------------------------------------


def clean_number(value):
    """A JSON-friendly alpha: 12 significant digits, an int when whole (consumers compute the scale from it)."""
    value = float(f"{value:.12g}")
    return int(value) if value.is_integer() else value


def _most_common(values):
    counts = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return max(counts, key=lambda v: (counts[v], v))


def peft_patterns(names, ranks, alphas):
    """Global r / lora_alpha (the most common) and rank_pattern / alpha_pattern entries for the exceptions, keyed
    by module path. Checked against PEFT's matching rule; falls back to anchored, escaped keys if a plain path
    would also match another module."""
    r = _most_common(ranks)
    alpha = _most_common([a for a, k in zip(alphas, ranks) if k == r])
    for escape in (False, True):
        key = (lambda n: "^" + re.escape(n)) if escape else (lambda n: n)
        rank_pattern = {key(n): k for n, k in zip(names, ranks) if k != r}
        alpha_pattern = {key(n): a for n, a in zip(names, alphas) if a != alpha}
        if all(pattern_value(rank_pattern, n, r) == k and pattern_value(alpha_pattern, n, alpha) == a
               for n, k, a in zip(names, ranks, alphas)):
            return r, alpha, rank_pattern, alpha_pattern
    raise LowrankError("could not write rank_pattern / alpha_pattern that PEFT resolves to the intended ranks")


def squeezed_config(config, names, ranks, alphas, use_rslora):
    """The input adapter_config.json with only r, lora_alpha, rank_pattern, alpha_pattern (and use_rslora under the
    unit policy) changed; every other field is kept as it was, in its order."""
    r, alpha, rank_pattern, alpha_pattern = peft_patterns(names, ranks, alphas)
    new = dict(config)
    new.update(r=r, lora_alpha=alpha, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    if bool(config.get("use_rslora")) != use_rslora:
        new["use_rslora"] = use_rslora
    return new


def kohya_metadata(metadata, ranks, alphas, comment):
    """kohya's safetensors metadata with the network dim / alpha updated ("Dynamic" when they differ per module).
    The sshs_* hashes describe the old tensors: they are dropped rather than left wrong."""
    new = {k: v for k, v in metadata.items() if not k.startswith("sshs_")}
    if any(k.startswith("ss_") for k in metadata):
        new["ss_network_dim"] = str(ranks[0]) if len(set(ranks)) == 1 else "Dynamic"
        new["ss_network_alpha"] = str(alphas[0]) if len(set(alphas)) == 1 else "Dynamic"
        old = metadata.get("ss_training_comment")
        new["ss_training_comment"] = comment + (f"; {old}" if old and old != "None" else "")
    return new
