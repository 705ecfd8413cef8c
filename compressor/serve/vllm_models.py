"""vLLM model classes for lowrank checkpoints of the Llama family and Gemma (imported only inside vLLM, by the
plugin).

Each class subclasses vLLM's own model for the family (LlamaForCausalLM, ...) so that embeddings, norms,
attention, rotary, the KV cache, sampling and the LM head are vLLM's, and swaps in factorized modules only where
the checkpoint's config says a projection is factorized (vllm_layers). A group whose members are all dense keeps
vLLM's fused layer: nothing changes there. The swap happens after vLLM built the whole dense model, whose weights
are allocated (never written) and then dropped: on CPU untouched pages are not resident, but on a GPU the load
peaks at the dense model's size (to fix: build the factorized modules in place of the dense ones).

Weight names: lowrank writes `...q_proj.down.weight`, `...q_proj.up.weight` (the original names plus the
factor); `load_weights` routes those (and the dense members of a swapped group) to the new modules, skips the
per-layer spectra that lowrank stores in `lowrank_spectra.safetensors` (vLLM reads every *.safetensors file of a
directory without an index), and hands everything else to vLLM's loader unchanged.
"""

import importlib

from vllm.model_executor.models.utils import PPMissingLayer

from .support import FAMILIES, UnservableCheckpoint, check_no_lora, check_servable, layer_ranks
from .vllm_layers import FactorizedColumnGroup, FactorizedRow, Member

KINDS = (".down.weight", ".up.weight", ".up.bias", ".weight", ".bias")


def _split(name):
    for kind in KINDS:
        if name.endswith(kind):
            return name[: -len(kind)], kind[1:]
    return name, ""


def _qkv_group(old, ranks, prefix):
    kv_shards = old.total_num_kv_heads
    bias = old.bias is not None
    members = [Member("q_proj", old.total_num_heads * old.head_size, ranks.get("q_proj"), bias),
               Member("k_proj", old.total_num_kv_heads * old.head_size, ranks.get("k_proj"), bias, kv_shards),
               Member("v_proj", old.total_num_kv_heads * old.v_head_size, ranks.get("v_proj"), bias, kv_shards)]
    return FactorizedColumnGroup(old.input_size, members, prefix)


def _gate_up_group(old, ranks, prefix):
    bias = old.bias is not None
    members = [Member(name, size, ranks.get(name), bias) for name, size in zip(("gate_proj", "up_proj"),
                                                                                old.output_sizes)]
    return FactorizedColumnGroup(old.input_size, members, prefix)


def _row(old, rank, prefix):
    if not getattr(old, "reduce_results", True):
        raise UnservableCheckpoint(f"{prefix}: a row-parallel layer without its all-reduce cannot be factorized here")
    return FactorizedRow(old.input_size, old.output_size, rank, old.bias is not None, prefix)


class FactorizedMixin:
    """Mixed into a vLLM model class of the Llama family: swaps factorized projections in and loads them."""

    def __init__(self, *, vllm_config, prefix="", **kwargs):
        config = vllm_config.model_config.hf_config
        check_servable(config.to_dict())
        check_no_lora(config.to_dict(), vllm_config.lora_config is not None)
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self._routes = {}  # checkpoint module name ("model.layers.0.self_attn.q_proj") -> (module, its name)
        model = self.model
        for index in range(model.start_layer, model.end_layer):
            layer = model.layers[index]
            if isinstance(layer, PPMissingLayer):
                continue
            self._swap_layer(f"model.layers.{index}", layer, layer_ranks(config.to_dict(), index))

    def _swap_layer(self, name, layer, ranks):
        attn, mlp = layer.self_attn, layer.mlp
        swaps = []
        if any(p in ranks for p in ("q_proj", "k_proj", "v_proj")):
            attn.qkv_proj = _qkv_group(attn.qkv_proj, ranks, f"{name}.self_attn.qkv_proj")
            swaps += [(attn.qkv_proj, f"{name}.self_attn.qkv_proj", f"{name}.self_attn.{p}")
                      for p in ("q_proj", "k_proj", "v_proj")]
        if any(p in ranks for p in ("gate_proj", "up_proj")):
            mlp.gate_up_proj = _gate_up_group(mlp.gate_up_proj, ranks, f"{name}.mlp.gate_up_proj")
            swaps += [(mlp.gate_up_proj, f"{name}.mlp.gate_up_proj", f"{name}.mlp.{p}")
                      for p in ("gate_proj", "up_proj")]
        for parent, part, path in ((attn, "o_proj", "self_attn"), (mlp, "down_proj", "mlp")):
            if part in ranks:
                module_name = f"{name}.{path}.{part}"
                setattr(parent, part, _row(getattr(parent, part), ranks[part], module_name))
                swaps.append((getattr(parent, part), module_name, module_name))
        for module, module_name, checkpoint_name in swaps:
            self._routes[checkpoint_name] = (module, module_name)

    def load_weights(self, weights):
        """Route factorized tensors to the swapped modules, the rest to vLLM's loader; return every parameter
        name filled (vLLM checks that none is missing)."""
        ranks = (self.config.to_dict().get("lowrank") or {}).get("ranks") or {}
        loaded = set()

        def others():
            for name, tensor in weights:
                if name in ranks:  # a per-layer spectrum from lowrank_spectra.safetensors, not a weight
                    continue
                module_name, kind = _split(name)
                route = self._routes.get(module_name)
                if route is None:
                    yield name, tensor
                    continue
                module, prefix = route
                loaded.add(f"{prefix}.{module.load(module_name.rpartition('.')[2], kind, tensor)}")

        loaded |= set(super().load_weights(others()))
        return loaded


def _model_class(family):
    module_name, class_name = FAMILIES[family]
    base = getattr(importlib.import_module(f"vllm.model_executor.models.{module_name}"), class_name)
    return type("LowRank" + class_name, (FactorizedMixin, base), {"__module__": __name__,
                                                                   "__doc__": f"lowrank {family} checkpoints."})


LowRankLlamaForCausalLM = _model_class("llama")
LowRankMistralForCausalLM = _model_class("mistral")
LowRankQwen2ForCausalLM = _model_class("qwen2")
LowRankQwen3ForCausalLM = _model_class("qwen3")
LowRankGemmaForCausalLM = _model_class("gemma")
