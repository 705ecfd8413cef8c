"""vLLM plugin: `vllm serve CHECKPOINT` / `LLM(model=CHECKPOINT)` for lowrank checkpoints, no remote code.

vLLM calls `register` in each of its processes (entry point `vllm.general_plugins`, name `lowrank`, declared in
pyproject.toml). It registers with transformers' AutoConfig the config classes of the `lowrank_<family>`
model types (the same classes `lowrank.load_pretrained` uses), so that vLLM reads config.json without
`--trust-remote-code`, and with vLLM's ModelRegistry the model classes, lazily by "module:Class" so that vLLM
imports them only when a lowrank checkpoint is loaded.

Checkpoints of other families get a config class that refuses them at config-reading time, in vLLM's front-end
process, with one message naming what is unsupported (instead of transformers' unknown-model-type error or an
engine crash).
"""

import importlib

from .support import FAMILIES, UnservableCheckpoint, check_servable

MODELS = "lowrank.serve.vllm_models"


_served: dict = {}  # class name -> config class, made once (pickle finds them again through __getattr__)


def served_config_class(family):
    """The config class of `family`'s lowrank checkpoints as vLLM reads them: lowrank's own (the one
    `lowrank.load_pretrained` uses), checking on construction that the plugin can serve the checkpoint. It lives
    in this module under its own name, because vLLM pickles the config to its engine process."""
    import transformers

    from ..io.modeling_lowrank import lowrank_class

    base = lowrank_class("LowRank" + transformers.CONFIG_MAPPING[family].__name__)
    name = "Served" + base.__name__
    if name not in _served:
        def __init__(self, *args, **kwargs):
            if isinstance(kwargs.get("lowrank"), dict):
                check_servable({"model_type": self.model_type, **kwargs})
            base.__init__(self, *args, **kwargs)

        _served[name] = type(name, (base,), {"__init__": __init__, "__module__": __name__, "__qualname__": name})
    return _served[name]


def __getattr__(name):
    for family in FAMILIES:
        if name.startswith("Served") and served_config_class(family).__name__ == name:
            return served_config_class(family)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _refusing_class(model_type):
    from transformers import PreTrainedConfig

    def __init__(self, *args, **kwargs):
        check_servable({"model_type": model_type, **kwargs})  # always raises: not a supported family
        raise UnservableCheckpoint(f"lowrank's vLLM plugin cannot serve {model_type}")

    return type("Unservable", (PreTrainedConfig,), {"model_type": model_type, "__init__": __init__})


def register():
    """Entry point of the `vllm.general_plugins` group."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from vllm import ModelRegistry

    supported = {served_config_class(family).model_type: served_config_class(family) for family in FAMILIES}
    for model_type, config_class in supported.items():
        transformers.AutoConfig.register(model_type, config_class, exist_ok=True)
    for base_type in CONFIG_MAPPING_NAMES:
        model_type = "lowrank_" + base_type
        if model_type not in supported:
            transformers.AutoConfig.register(model_type, _refusing_class(model_type), exist_ok=True)
    for _, class_name in FAMILIES.values():
        name = "LowRank" + class_name
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, f"{MODELS}:{name}")


def models_module():
    """The model classes' module (imports vLLM): for tests and tools that need the classes themselves."""
    return importlib.import_module(MODELS)
