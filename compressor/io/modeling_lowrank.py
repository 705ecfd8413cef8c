"""Factorized linear layers, and the Hugging Face classes that load lowrank checkpoints.

This file depends on torch and transformers only. `lowrank compress` copies it verbatim into every checkpoint
it writes, so `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` (and `lm_eval --model hf`)
works where lowrank is not installed; lowrank imports the very same file for `lowrank.load_pretrained`.

A factorized linear `X` keeps its name and holds two children, `X.down` (r x in) and `X.up` (out x r, with
the bias), so y = up(down(x)). The model classes are made on demand for any architecture: the checkpoint's
`auto_map` names e.g. `modeling_lowrank.LowRankLlamaForCausalLM`, which this module builds as a subclass of
transformers' `LlamaForCausalLM` that swaps the modules listed in `config.lowrank["ranks"]` after __init__.
"""

import os
import shutil

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers

FORMAT_VERSION = 1
MODEL_TYPE_PREFIX = "lowrank_"
CLASS_PREFIX = "LowRank"


class Projection(nn.Module):
    """One factor of a factorized layer: y = x W^T + b.

    Deliberately not an nn.Linear: tools that act on every nn.Linear (PEFT's "all-linear", quantizers) must see
    the factorized layer as one linear layer, not as three.
    """

    def __init__(self, in_features, out_features, bias=False, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class FactorizedWeight(torch.Tensor):
    """The dense product up @ down, handed to code that reads `layer.weight` (PEFT reads its shape and dtype).

    It is a computed value, so writing to it could only be lost silently: in-place updates raise instead,
    which is what stops `merge_and_unload()` from dropping an adapter without a word.
    """

    _WRITES = {"__set__", "__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "set_", "copy_"}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in cls._WRITES or (name.endswith("_") and not name.startswith("_")):
            raise RuntimeError(
                "this layer is factorized (lowrank): its .weight is the read-only product up @ down, so it "
                "cannot be changed in place. Keep a LoRA adapter unmerged, or merge it into a dense copy: "
                "`lowrank densify CHECKPOINT -o DENSE` (lowrank.densify), then merge there."
            )
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


class LowRankLinear(nn.Linear):
    """A linear layer stored as two factors: y = up(down(x)), rank r.

    It subclasses nn.Linear (with no weight parameter of its own) so that PEFT and other tools that target
    linear layers treat it as the linear layer it replaces: an adapter on it sees the layer's input.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device: "torch.device | str | None" = None, dtype: "torch.dtype | None" = None) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = Projection(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = Projection(rank, out_features, bias=bias, device=device, dtype=dtype)

    @property
    def weight(self):
        with torch.no_grad():
            dense = self.up.weight @ self.down.weight
        return dense.as_subclass(FactorizedWeight)

    @property
    def bias(self):
        return self.up.bias

    def forward(self, x):
        return self.up(self.down(x))

    def extra_repr(self):
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.up.bias is not None}"
        )


def linear_shape(module):
    """(out_features, in_features, has_bias) of an nn.Linear or a GPT-2 style Conv1D (weight stored in x out)."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features, module.bias is not None
    if type(module).__name__ == "Conv1D":
        return module.weight.shape[1], module.weight.shape[0], module.bias is not None
    raise TypeError(f"{type(module).__name__} is not a linear layer")


def resolve_module_name(model, name):
    """Map a module name of the original architecture onto `model`, which may be its base model or a head model."""
    prefix = getattr(model, "base_model_prefix", "")
    candidates = [name]
    if prefix and name.startswith(prefix + "."):
        candidates.append(name[len(prefix) + 1 :])
    elif prefix:
        candidates.append(f"{prefix}.{name}")
    for candidate in candidates:
        try:
            model.get_submodule(candidate)
            return candidate
        except AttributeError:
            continue
    return None


def factorize_modules(model, ranks):
    """Replace each named linear by an empty LowRankLinear of the given rank (weights are loaded afterwards)."""
    for name, rank in ranks.items():
        target = resolve_module_name(model, name)
        if target is None:
            continue  # e.g. the LM head of a causal LM, when loading only its base model
        parent_name, _, child_name = target.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child_name)
        if isinstance(old, LowRankLinear):
            continue
        out_features, in_features, has_bias = linear_shape(old)
        ref = next(old.parameters())
        new = LowRankLinear(in_features, out_features, int(rank), bias=has_bias, device=ref.device, dtype=ref.dtype)
        setattr(parent, child_name, new)


def _init_factors(model, module):
    from transformers import initialization as init

    std = getattr(model.config, "initializer_range", None) or 0.02
    init.normal_(module.down.weight, mean=0.0, std=std)
    init.normal_(module.up.weight, mean=0.0, std=std)
    if module.up.bias is not None:
        init.zeros_(module.up.bias)


_classes: dict = {}  # name -> generated class, so that each is made once


def _make_config_class(base):
    model_type = MODEL_TYPE_PREFIX + base.model_type
    return type(CLASS_PREFIX + base.__name__, (base,), {"model_type": model_type, "__module__": __name__})


def _make_model_class(base, config_class):
    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        factorize_modules(self, (getattr(config, "lowrank", None) or {}).get("ranks", {}))

    def _init_weights(self, module):
        if isinstance(module, LowRankLinear):
            _init_factors(self, module)
        elif not isinstance(module, Projection):
            base._init_weights(self, module)

    def save_pretrained(self, save_directory, *args, **kwargs):
        # The checkpoint must stay loadable without lowrank: ship this file with it.
        base.save_pretrained(self, save_directory, *args, **kwargs)
        target = os.path.join(save_directory, "modeling_lowrank.py")
        if os.path.abspath(__file__) != os.path.abspath(target):
            shutil.copyfile(__file__, target)

    namespace = {
        "config_class": config_class,
        "__init__": __init__,
        "_init_weights": _init_weights,
        "save_pretrained": save_pretrained,
        "__module__": __name__,
    }
    return type(CLASS_PREFIX + base.__name__, (base,), namespace)


def lowrank_class(name):
    """The class called `name` ("LowRank" + a transformers class name), made once and cached."""
    if name in _classes:
        return _classes[name]
    base_name = name[len(CLASS_PREFIX) :] if name.startswith(CLASS_PREFIX) else None
    base = getattr(transformers, base_name, None) if base_name else None
    if base is None or not isinstance(base, type):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if issubclass(base, transformers.PreTrainedConfig):
        cls = _make_config_class(base)
    elif issubclass(base, transformers.PreTrainedModel):
        cls = _make_model_class(base, lowrank_class(CLASS_PREFIX + base.config_class.__name__))
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    _classes[name] = cls
    return cls


def __getattr__(name):
    # transformers resolves auto_map entries with getattr(module, name): classes are made on first use.
    if name.startswith(CLASS_PREFIX):
        return lowrank_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
