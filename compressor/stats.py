"""Calibration statistics of the inputs of linear layers, collected with forward hooks.

Layers that read the same tensor (q/k/v read one hidden state, gate/up read another) share one set of
statistics: the grouping is found on the first batch by tensor identity, so it needs no per-model table.
"""

import torch


class InputStats:
    """Statistics of one input stream: Gram matrix X^T X and sum |x| per channel, in float64, and a token count.

    Each batch's X^T X is one float32 GEMM (inner products over the batch's tokens), summed into the float64
    accumulator: a float64 GEMM would double the cost of the statistics pass for no visible difference (the
    benchmark compares the two; see BENCHMARKS.md).
    """

    def __init__(self, dim, device=None):
        self.dim = dim
        self.gram = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.abs_sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x):
        x = x.detach().reshape(-1, self.dim).to(self.gram.device, torch.float32)
        self.gram += (x.T @ x).to(torch.float64)
        self.abs_sum += x.abs().sum(0, dtype=torch.float64)
        self.tokens += x.shape[0]

    def merge(self, other):
        self.gram += other.gram.to(self.gram.device)
        self.abs_sum += other.abs_sum.to(self.abs_sum.device)
        self.tokens += other.tokens

    @property
    def mean_abs(self):
        return self.abs_sum / max(self.tokens, 1)


class InputGroup:
    """Linear layers that read the same input tensor, and that input's statistics."""

    def __init__(self, names, stats):
        self.names = names
        self.stats = stats


class StatsCollector:
    """Context manager: while active, accumulate InputStats for the given {name: linear} layers of one block."""

    def __init__(self, modules):
        self.modules = modules
        self.groups = []
        self._group_of = {}
        self._first_batch = True
        self._last_input = {}
        self._handles = []

    def __enter__(self):
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._last_input.clear()

    def end_batch(self):
        """Call after each forward of the block: the grouping is fixed after the first batch."""
        self._first_batch = False
        self._last_input.clear()

    def _hook(self, name):
        def hook(module, args):
            x = args[0]
            if self._first_batch and name not in self._group_of:
                self._assign(name, x)
            group = self._group_of[name]
            if group.names[0] == name:
                group.stats.add(x)

        return hook

    def _assign(self, name, x):
        for group in self.groups:
            if self._last_input.get(id(group)) is x:
                group.names.append(name)
                self._group_of[name] = group
                return
        group = InputGroup([name], InputStats(x.shape[-1]))
        self.groups.append(group)
        self._group_of[name] = group
        self._last_input[id(group)] = x

    def stats_of(self, name):
        return self._group_of[name].stats
