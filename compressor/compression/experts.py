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

from ..core.stats import InputStats
from ..errors import LowrankError
from ..io.modeling_lowrank import (EXPERT_TENSORS, UnpackedExperts, experts_transposed, is_packed_experts, linear_shape,
                                   pack_experts, unpack_experts)

# an expert's number in a layer name: `experts.3.w1`, `gate_up_proj.3`, or Switch Transformers' `experts.expert_3.wi`
EXPERT_INDEX = re.compile(r"(\.|\.expert_)\d+(?=\.|$)")


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
    return EXPERT_INDEX.sub(r"\1*", name)


def peer_groups(names):
    """{peer_key: [names]} in the order given: the same matrix of every expert of a layer together."""
    groups = {}
    for name in names:
        groups.setdefault(peer_key(name), []).append(name)
    return groups


def statistics_passes(modules, budget, abs_sums=True):
    """The passes in which sequential.collect_statistics collects a block's statistics: (lists of target names,
    the names that are not experts).

    One pass unless the block's statistics would exceed `budget` bytes (InputStats.bytes_for per target: an upper
    bound, as layers that share an input share statistics). Then the experts are split into groups, each expert's
    layers kept together (they may share an input), in order: the first pass also collects every layer that is
    not an expert, and each group holds what fits beside those, at least one expert."""
    size = {name: linear_shape(module)[1] for name, module in modules.items()}  # (GPT-2's Conv1D too)
    peers = peer_groups(modules)
    experts = {}  # expert (its numeric name components) -> its layers, in the order the block lists them
    for name in modules:
        if len(peers[peer_key(name)]) > 1:
            experts.setdefault(tuple(m.group(0) for m in EXPERT_INDEX.finditer(name)), []).append(name)
    base = [name for name in modules if len(peers[peer_key(name)]) < 2]
    need = {name: InputStats.bytes_for(size[name], abs_sums) for name in modules}
    if budget is None or sum(need.values()) <= budget or not experts:
        return [list(modules)], set(base)
    room = budget - sum(need[name] for name in base)
    passes, current, held = [], list(base), 0
    for names in experts.values():
        weight = sum(need[name] for name in names)
        if held and held + weight > room:
            passes.append(current)
            current, held = [], 0
        current += names
        held += weight
    return passes + [current], set(base)


def fill_unreached(importance, names):
    """The gradient passes' rule for experts (fwsvd's input Fisher, --alloc fisher's output Fisher): an expert
    that no token of the pass was routed to has no gradient at all; it gets the mean of its peers' (the same
    matrix of the layer's other experts), summed in name order, so that it is ranked like a typical expert of
    its layer instead of failing or being dropped as worthless. In place; returns the names filled."""
    groups = peer_groups(names)
    filled = []
    for group in groups.values():
        reached = [importance[name] for name in group if name in importance]
        missing = [name for name in group if name not in importance]
        if reached and missing:
            mean = sum(reached) / len(reached)
            importance.update({name: mean for name in missing})
            filled += missing
    return filled


def pool_sparse_experts(collector, modules):
    """The rule for experts that few or no calibration tokens reached.

    An expert's Gram matrix G_e from t_e tokens has rank <= t_e: below `in_features` tokens its whitening is
    mostly damping, and an expert no token reached has no statistics at all. Such an expert gets the average
    token statistics of its peers (the same matrix of every expert of the layer: G_pool / N over N tokens) for the
    tokens it lacks: G_e + (n - t_e) / N * G_pool with n = in_features, then the method's usual damping. An expert
    with enough tokens is untouched. Returns {name: (tokens routed, tokens' worth pooled in)} for every expert
    layer (the report lists them)."""
    groups = peer_groups(modules)
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
    """--stream on reads each expert as a row of the checkpoint's stacked tensor, or, where the checkpoint stores
    one matrix per expert under older names (transformers 5 saves Mixtral, Qwen-MoE, OLMoE, DeepSeek that way and
    converts them at load), as the matrices transformers' conversion makes that row of (io/streaming.py). A
    layout neither reading covers is said before any work is done."""
    from ..errors import UsageError

    for name in names:
        for tensor in EXPERT_TENSORS:
            stacked = f"{name}.{tensor}"
            if skeleton.key(stacked) is None and skeleton.expert_rows(stacked) is None:
                raise UsageError(f"this checkpoint stores the experts of {name} in a layout --stream on cannot read "
                                 f"(no {tensor} tensor, and transformers' conversion does not say which of its "
                                 "tensors make one); use --stream off")


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
