"""`--alloc sensitivity`: ASVD's sensitivity-based truncation rank search, the slow reference for `global`.

For every target layer and every candidate keep fraction, the layer alone is replaced by its whitened rank-r
approximation and the calibration loss of the whole model is measured on a few windows. Then one threshold on
the loss increase is searched (ASVD's binary search): each layer takes the smallest candidate whose increase
stays under it, and the threshold is the smallest one whose choices fit the parameter budget.
Cost: (layers x candidates) forward passes over the evaluation windows, on top of the compression itself.
"""

import torch
import torch.nn.functional as F

from ..core import decompose
from ..core.fisher import has_lm_head, staged
from ..core.ranks import exact_ratio, uniform_rank
from ..errors import UsageError
from ..methods.whiten import whiten_weighting
from ..progress import SILENT
from .sequential import WalkOptions, walk_blocks
from .targets import dense_weight

CANDIDATES = (0.2, 0.4, 0.6, 0.8)


@torch.no_grad()
def loss(model, input_ids, device):
    logits = model(input_ids=input_ids.to(device)).logits.float()
    return float(F.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten().to(device)))


def _set_weight(module, weight):
    if type(module).__name__ == "Conv1D":
        weight = weight.T
    module.weight.data.copy_(weight.to(module.weight.dtype))


def layer_factors(model, input_ids, targets, blocks_name, config, progress):
    """{name: (up_full, down_full)} whitened full-rank factors on the original model's own inputs."""
    factors = {}

    @torch.no_grad()
    def visit(index, block, names, collector):
        weightings = {}
        for name, rel in names.items():
            stats = collector.stats_of(name)
            if id(stats) not in weightings:
                weightings[id(stats)] = whiten_weighting(stats, config.damp)
            weight = dense_weight(block.get_submodule(rel))
            full = decompose.factorize(weight, weightings[id(stats)], min(weight.shape))
            # kept on the CPU until measured: full-rank factors of every layer would outgrow a GPU
            factors[name] = (full.up.float().cpu(), full.down.float().cpu())
        return []

    options = WalkOptions(batch_size=config.batch_size, device=config.device, propagate=False)
    walk_blocks(model, input_ids, targets, blocks_name, visit, options, progress=progress, stage="profile")
    return factors


def measure(model, input_ids, factors, config, progress=SILENT, samples=2):
    """{name: {keep fraction: loss increase}} on the first `samples` calibration windows."""
    if not has_lm_head(model):
        raise UsageError("--alloc sensitivity measures the language-model loss: it needs a causal LM")
    data = input_ids[:samples]
    with staged(model, config.device):  # the loss is the whole model's, on the windows moved to the device
        base = loss(model, data, config.device)
        table = {}
        progress.start("sensitivity", len(factors))
        for name, (up, down) in factors.items():
            module = model.get_submodule(name)
            up, down = up.to(config.device), down.to(config.device)
            m, n = up.shape[0], down.shape[1]
            original = dense_weight(module).clone()
            table[name] = {}
            for keep in CANDIDATES:
                rank = uniform_rank(m, n, keep)
                if rank is None:
                    continue
                _set_weight(module, up[:, :rank] @ down[:rank])
                table[name][keep] = loss(model, data, config.device) - base
            _set_weight(module, original)
            progress.advance("sensitivity", name)
    return table


def choose(table, shapes, ratio):
    """ASVD's budgeted choice: {name: rank or None (dense)} for the smallest threshold that fits the budget."""
    budget = exact_ratio(ratio) * sum(m * n for m, n in shapes.values())

    def pick(threshold):
        chosen = {}
        for name, increases in table.items():
            keep = next((k for k in sorted(increases) if increases[k] <= threshold), None)
            m, n = shapes[name]
            chosen[name] = None if keep is None else uniform_rank(m, n, keep)
        return chosen

    def params(chosen):
        return sum(m * n if chosen[k] is None else chosen[k] * (m + n) for k, (m, n) in shapes.items())

    thresholds = sorted({value for increases in table.values() for value in increases.values()})
    low, high = 0, len(thresholds) - 1
    if not thresholds or params(pick(thresholds[-1])) > budget:
        return pick(thresholds[-1]) if thresholds else {name: None for name in table}
    while low < high:  # the smallest threshold whose choices fit the budget
        middle = (low + high) // 2
        if params(pick(thresholds[middle])) <= budget:
            high = middle
        else:
            low = middle + 1
    return pick(thresholds[low])


def sensitivity_ranks(model, input_ids, targets, blocks_name, config, progress=SILENT):
    factors = layer_factors(model, input_ids, targets, blocks_name, config, progress)
    table = measure(model, input_ids, factors, config, progress)
    shapes = {name: (up.shape[0], down.shape[1]) for name, (up, down) in factors.items()}
    return choose(table, shapes, config.ratio), table
