"""Mixture-of-experts layers as targets: unpacking transformers' 3-D expert tensors into per-expert linear layers
(io/modeling_lowrank.py holds the module itself, since checkpoints bundle it), and the statistics rule for
experts that the calibration text barely reaches.

Once unpacked, an expert matrix is an ordinary linear layer to the rest of lowrank: its statistics come from a
forward pre-hook, which fires with exactly the tokens the model's own router sent to that expert (the unpacked
forward is the original per-expert loop), its rank comes from the same `--ratio` budget, its gradients (fwsvd,
Fisher allocation) flow through the router like any other layer's. The router (`gate`, a bare parameter or a
1-row linear such as Qwen2-MoE's shared_expert_gate at break-even) stays dense; shared experts are ordinary MLPs.
"""

import re

import torch

from ..errors import LowrankError
from ..io.modeling_lowrank import (EXPERT_TENSORS, UnpackedExperts, experts_transposed, is_packed_experts, pack_experts,
                                   unpack_experts)

EXPERT_INDEX = re.compile(r"\.\d+(?=\.|$)")


def unpack_model_experts(model):
    """Unpack every packed experts module of `model` in place; returns their names (already unpacked ones too)."""
    names = []
    for name, module in list(model.named_modules()):
        if is_packed_experts(module):
            unpack_experts(module)
        if isinstance(module, UnpackedExperts):
            names.append(name)
    return names


def unpack_like(model, reference):
    """Unpack the experts modules of `model` that are unpacked in `reference` (the same architecture), so that the
    two have the same layer names (EoRA compares an original with its compressed model layer by layer)."""
    for name, module in reference.named_modules():
        if isinstance(module, UnpackedExperts):
            try:
                mine = model.get_submodule(name)
            except AttributeError:
                continue
            if is_packed_experts(mine):
                unpack_experts(mine)


def repack_untargeted(model, targets):
    """Pack back the unpacked experts modules none of whose linears is a target (--targets / --ignore left them
    out): they are written in the original layout. Returns the names of the modules that stay unpacked."""
    chosen = {name for names in targets.values() for name in names}
    kept = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, UnpackedExperts):
            continue
        if any(target.startswith(name + ".") for target in chosen):
            kept.append(name)
        else:
            pack_experts(module)
    return kept


def peer_key(name):
    """Layers that are the same matrix of different experts share a key: the name with its numeric components
    replaced (`mlp.experts.gate_up_proj.3` and `mlp.experts.7.w1` -> `...gate_up_proj.*`, `...experts.*.w1`)."""
    return EXPERT_INDEX.sub(".*", name)


def pool_sparse_experts(collector, modules):
    """The rule for experts that few or no calibration tokens reached.

    An expert's Gram matrix G_e from t_e tokens has rank <= t_e: below `in_features` tokens its whitening is
    mostly damping, and an expert no token reached has no statistics at all. Such an expert gets the average
    token statistics of its peers (the same matrix of every expert of the layer: G_pool / N over N tokens) for the
    tokens it lacks: G_e + (n - t_e) / N * G_pool with n = in_features, then the method's usual damping. An expert
    with enough tokens is untouched. Returns {name: (tokens routed, tokens' worth pooled in)} for every expert
    layer (the report lists them)."""
    groups = {}
    for name in modules:
        groups.setdefault(peer_key(name), []).append(name)
    counts, done = {}, set()
    for key, names in groups.items():
        if len(names) < 2:
            continue
        for name in names:
            module = modules[name]
            collector.ensure(name, module.in_features, module.weight.device)
        stats = {id(collector.stats_of(name)): collector.stats_of(name) for name in names}
        total = sum(s.tokens for s in stats.values())
        need = modules[names[0]].in_features
        if total and any(id(s) not in done and s.tokens < need for s in stats.values()):
            pool = sum(s.gram for s in stats.values())
            pool_abs = sum(s._abs.value for s in stats.values()) if collector.abs_sums else None
            for key_id, s in stats.items():
                if key_id in done or s.tokens >= need:
                    continue
                share = (need - s.tokens) / total
                s.pool(pool * share, None if pool_abs is None else pool_abs * share, need - s.tokens)
        done.update(stats)
        for name in names:
            s = collector.stats_of(name)
            counts[name] = (s.tokens - s.pooled_tokens, s.pooled_tokens)
    return counts


class ExpertStacker:
    """A tensor writer (`add(name, tensor)`, `finish()`) for densify: the per-expert tensors of the unpacked
    modules `names` are held until all E experts of a tensor are there, then written as the original 3-D
    parameter (transposed back where the layout is, biases as `<tensor>_bias`). Memory: one stacked tensor.
    `meta`: the original architecture on the meta device, which says E and the layout."""

    def __init__(self, writer, meta, names):
        from ..io.modeling_lowrank import resolve_module_name

        self.writer, self.pending, self.layout = writer, {}, {}
        for name in names:
            module = meta.get_submodule(resolve_module_name(meta, name))
            for tensor in EXPERT_TENSORS:
                shape = getattr(module, tensor).shape
                self.layout[f"{name}.{tensor}"] = (shape[0], experts_transposed(module),
                                                   getattr(module, tensor + "_bias", None) is not None)

    def add(self, name, value):
        stem, _, part = name.rpartition(".")
        parent, _, index = stem.rpartition(".")
        if parent not in self.layout or not index.isdigit() or part not in ("weight", "bias"):
            return self.writer.add(name, value)
        experts, transposed, has_bias = self.layout[parent]
        parts = self.pending.setdefault(parent, {"weight": {}, "bias": {}})
        parts[part][int(index)] = value
        if len(parts["weight"]) == experts and (not has_bias or len(parts["bias"]) == experts):
            weights = torch.stack([parts["weight"][e] for e in range(experts)])
            self.writer.add(parent, weights.transpose(1, 2).contiguous() if transposed else weights)
            if has_bias:
                self.writer.add(parent + "_bias", torch.stack([parts["bias"][e] for e in range(experts)]))
            del self.pending[parent]

    def finish(self):
        if self.pending:
            raise LowrankError(f"the checkpoint lacks experts of {sorted(self.pending)[0]}; it is incomplete")
        return self.writer.finish()


def check_streamable(skeleton, names):
    """--stream on reads each expert as a row of the checkpoint's stacked tensor (io/streaming.py). Checkpoints
    that store experts one matrix at a time under older names (transformers 5 saves Mixtral and Qwen-MoE that way
    and converts them at load) cannot be read like that yet: said before any work is done."""
    from ..errors import UsageError

    for name in names:
        for tensor in EXPERT_TENSORS:
            if skeleton.key(f"{name}.{tensor}") is None:
                raise UsageError(f"this checkpoint stores the experts of {name} one matrix per expert under older "
                                 "names, which transformers converts at load; --stream on cannot read them yet: "
                                 "use --stream off")


def check_supported(model, distributed, paired, experts="per-expert", streaming=False):
    """MoE features this version does not have yet, said before any work is done."""
    from ..errors import UsageError

    if not any(isinstance(m, UnpackedExperts) or is_packed_experts(m) for m in model.modules()):
        if experts != "per-expert":
            raise UsageError(f"--experts {experts} is for mixture-of-experts models; this model has no experts")
        return
    if experts != "per-expert" and streaming:
        raise UsageError(f"--experts {experts} runs with the model in memory: pass --stream off")
    if distributed:
        raise UsageError("torchrun does not support mixture-of-experts models yet; run one process")
    if paired:
        raise UsageError("--anchor and --refit do not support mixture-of-experts models yet")
