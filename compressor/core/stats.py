"""Calibration statistics of the inputs of linear layers, collected with forward hooks.

Layers that read the same tensor (q/k/v read one hidden state, gate/up read another) share one set of
statistics: the grouping is found on the first batch by tensor identity, so it needs no per-model table.
"""

import torch


class ExactSum:
    """A float64 sum whose value does not depend on the order of the additions.

    Each addition is a TwoSum: hi holds the float64 sum and lo the rounding errors, so hi + lo is the exact sum
    up to ~2^-100 relative, and rounding it once gives the same float64 whatever the order: a compression split
    across processes (each summing its own batches, then reducing) produces the same statistics, hence the same
    bytes, as a single process. (A float32 lo would not do: with many batches its own rounding flips the final
    bit of some of the millions of entries of a big Gram matrix.)
    """

    def __init__(self, shape, device=None):
        self.hi = torch.zeros(shape, dtype=torch.float64, device=device)
        self.lo = torch.zeros(shape, dtype=torch.float64, device=device)

    CHUNK = 1 << 20  # elements per step: bounds the temporaries for big Gram matrices

    def add(self, x):
        """Add x (any float dtype, converted to float64 a chunk at a time), in place."""
        hi, lo, x = self.hi.view(-1), self.lo.view(-1), x.reshape(-1)
        for start in range(0, hi.numel(), self.CHUNK):
            part = slice(start, start + self.CHUNK)
            self._two_sum(hi[part], lo[part], x[part].to(torch.float64))

    @staticmethod
    def _two_sum(hi, lo, x):
        # Knuth's TwoSum, in place: s = hi + x exactly equals s + err with err = (hi - (s - b)) + (x - b), b = s - hi
        total = hi + x
        back = total - hi
        hi.sub_(total - back)
        back.neg_().add_(x)  # x - back (negation and addition are exact rewrites of the subtraction)
        hi.add_(back)
        lo.add_(hi)
        hi.copy_(total)

    def merge(self, other):
        self.merge_parts(other.hi, other.lo)

    def merge_parts(self, hi, lo):
        self.add(hi.to(self.hi.device))
        self.lo += lo.to(self.lo.device)

    @property
    def value(self):
        return self.hi + self.lo


def gram_matrix(x, panel=384):
    """X^T X (float32) from the upper triangle only, one panel of rows at a time, mirrored: about half the
    multiply-adds of a single GEMM. That matters: summed over a calibration pass, the Gram matrices of a
    block's inputs cost about as much as running the block (measured: 397 -> 221 ms for 4096 x 1536)."""
    n = x.shape[1]
    if n <= panel:
        return x.T @ x
    out = torch.empty(n, n, dtype=x.dtype, device=x.device)
    for start in range(0, n, panel):
        rows = slice(start, min(start + panel, n))
        block = x[:, rows].T @ x[:, start:]
        out[rows, start:] = block
        out[start:, rows] = block.T
    return out


class InputStats:
    """Statistics of one input stream: Gram matrix X^T X and (if asked) sum |x| per channel, in float64, and a
    token count.

    Each batch's X^T X is a float32 product (inner products over the batch's tokens), summed into the float64
    accumulator: a float64 GEMM would double the cost of the statistics pass for no visible difference (the
    benchmark compares the two; see BENCHMARKS.md). The |x| sums cost a third as much again and only ASVD reads
    them, so they are optional.
    """

    def __init__(self, dim, device=None, abs_sums=True):
        self.dim = dim
        self._gram = ExactSum((dim, dim), device)
        self._abs = ExactSum((dim,), device)
        self.abs_sums = abs_sums
        self.tokens = 0
        self.pooled_tokens = 0  # tokens' worth of statistics borrowed from peer experts (compression/experts.py)

    def add(self, x):
        x = x.detach().reshape(-1, self.dim).to(self._gram.hi.device, torch.float32)
        self._gram.add(gram_matrix(x))
        if self.abs_sums:
            self._abs.add(x.abs().sum(0, dtype=torch.float64))
        self.tokens += x.shape[0]

    def pool(self, gram, abs_sums, tokens):
        """Add `tokens` tokens' worth of borrowed statistics (an expert the calibration barely reached)."""
        self._gram.add(gram)
        if abs_sums is not None and self.abs_sums:
            self._abs.add(abs_sums)
        self.tokens += tokens
        self.pooled_tokens += tokens

    def merge(self, other):
        self._gram.merge(other._gram)
        self._abs.merge(other._abs)
        self.tokens += other.tokens

    def spill(self, store):
        """Move the Gram accumulator out of memory: `store(exact_sum)` returns an object with ExactSum's `add`,
        `hi`, `lo` and `value` (compression/offload.py's SpilledSum, a file). Every read gives the same bits."""
        self._gram = store(self._gram)

    @property
    def gram_size(self):
        return self.dim * self.dim

    @staticmethod
    def bytes_for(dim, abs_sums=True):
        """What InputStats of width `dim` hold: the two float64 halves of the Gram sum (and of the |x| sums)."""
        return 16 * dim * dim + (16 * dim if abs_sums else 0)

    def parts(self):
        """The tensors that make up these statistics (for gathering across processes)."""
        tokens = torch.tensor([float(self.tokens)], dtype=torch.float64, device=self._gram.hi.device)
        return [self._gram.hi, self._gram.lo, self._abs.hi, self._abs.lo, tokens]

    def merge_parts(self, others):
        """Merge other processes' `parts()`."""
        for gram_hi, gram_lo, abs_hi, abs_lo, tokens in others:
            self._gram.merge_parts(gram_hi, gram_lo)
            self._abs.merge_parts(abs_hi, abs_lo)
            self.tokens += int(tokens.item())

    @property
    def gram(self):
        if self._gram is None:
            raise RuntimeError("these statistics were spent by take_gram()")
        return self._gram.value

    def take_gram(self):
        """The Gram matrix built in the accumulator's own storage; these statistics are spent afterwards."""
        gram = self._gram.hi.add_(self._gram.lo)
        self._gram = None
        return gram

    @property
    def mean_abs(self):
        if not self.abs_sums:
            raise RuntimeError("these statistics were collected without |x| sums (abs_sums=False)")
        return self._abs.value / max(self.tokens, 1)


class InputGroup:
    """Linear layers that read the same input tensor, and that input's statistics."""

    def __init__(self, names, stats):
        self.names = names
        self.stats = stats


class InputsSeen(Exception):
    """Raised by a StatsCollector with `stop_early` once the block's last target has seen its input."""


class StatsCollector:
    """Context manager: while active, accumulate InputStats for the given {name: linear} layers of one block.

    With `stop_early`, every batch after the first ends at the last target's input (raising InputsSeen): when
    the block's outputs are not needed, that layer's own product and whatever follows it are wasted work
    (an MLP's down projection is a quarter of a Llama block's multiply-adds).
    """

    stats_factory = InputStats

    def __init__(self, modules, abs_sums=True, stop_early=False):
        self.modules = modules
        self.abs_sums = abs_sums
        self.stop_early = stop_early
        self.groups = []
        self._group_of = {}
        self._first_batch = True
        self._last_input = {}
        self._handles = []
        self._order = []  # targets in the order their inputs arrive (seen on the first batch)
        self._stop_at = None

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
        # Stop only if every target was seen in this batch (an expert the router skipped this time may be reached
        # later, past any layer this batch ended with) and the last one was called once (else it would be cut short)
        seen_all = bool(self._order) and set(self._order) == set(self.modules)  # (a block without targets: none)
        if self._first_batch and self.stop_early and seen_all and self._order.count(self._order[-1]) == 1:
            self._stop_at = self._order[-1]
        self._first_batch = False
        self._last_input.clear()

    def _hook(self, name):
        def hook(module, args):
            x = args[0]
            if self._first_batch:
                self._order.append(name)
            if name not in self._group_of:  # (after the first batch: an expert the router reached only now)
                self._assign(name, x)
            group = self._group_of[name]
            if group.names[0] == name:
                group.stats.add(x)
            if name == self._stop_at:
                raise InputsSeen

        return hook

    def _assign(self, name, x):
        for group in self.groups:
            if self._last_input.get(id(group)) is x:
                group.names.append(name)
                self._group_of[name] = group
                return
        group = InputGroup([name], self._new_stats(x))
        self.groups.append(group)
        self._group_of[name] = group
        self._last_input[id(group)] = x

    def _new_stats(self, x):
        return self.stats_factory(x.shape[-1], device=x.device, abs_sums=self.abs_sums)  # statistics where x lives

    def stats_of(self, name):
        return self._group_of[name].stats

    def ensure(self, name, dim, device=None):
        """Empty statistics for a target that saw no input at all (an expert no calibration token was routed to),
        so that a rule can fill them (compression/experts.py)."""
        if name not in self._group_of:
            group = InputGroup([name], self.stats_factory(dim, device=device, abs_sums=self.abs_sums))
            self.groups.append(group)
            self._group_of[name] = group

    def __contains__(self, name):
        """Whether `name` has statistics (an expert the router never reached has none until `ensure`)."""
        return name in self._group_of

    def absorb(self, other):
        """Take over the statistics of `other`, a collector that ran over other targets of the same block."""
        self.groups += other.groups
        self._group_of.update(other._group_of)

    def release(self, name):
        """Drop the statistics of `name`'s input group (once every layer reading that input is done)."""
        self._group_of[name].stats = None


class PairedStats:
    """For anchored fitting: with x from the original model's stream and x' from the compressed model's stream
    (the same token), G' = sum x' x'^T, C = sum x x'^T, and per layer sum ||W x||^2 (from the layer's output)."""

    def __init__(self, dim, device=None, abs_sums=True):
        self.shifted = InputStats(dim, device, abs_sums)  # G' (and |x'| sums): what the compressed model feeds the layer
        self._cross = ExactSum((dim, dim), device)
        self.output_energy = {}  # layer name -> sum ||W x||^2 over the original stream

    @property
    def cross(self):
        return self._cross.value

    def merge(self, other):
        self.shifted.merge(other.shifted)
        self._cross.merge(other._cross)
        for name, value in other.output_energy.items():
            self.output_energy[name] = self.output_energy.get(name, 0.0) + value

    @property
    def gram_size(self):
        return 2 * self.shifted.gram_size

    def parts(self):
        names = sorted(self.output_energy)
        energy = torch.tensor([self.output_energy[n] for n in names], dtype=torch.float64,
                              device=self._cross.hi.device)
        return self.shifted.parts() + [self._cross.hi, self._cross.lo, energy]

    def merge_parts(self, others):
        names = sorted(self.output_energy)
        self.shifted.merge_parts([part[:5] for part in others])
        for part in others:
            self._cross.merge_parts(part[5], part[6])
            for name, value in zip(names, part[7].tolist()):
                self.output_energy[name] += value

    @property
    def gram(self):
        return self.shifted.gram

    @property
    def tokens(self):
        return self.shifted.tokens

    @property
    def mean_abs(self):
        return self.shifted.mean_abs

    def add_pair(self, x, x_shifted):
        x = x.detach().reshape(-1, x.shape[-1]).float()
        xs = x_shifted.detach().reshape(-1, x_shifted.shape[-1]).to(x.device, torch.float32)
        self.shifted.add(xs)
        self._cross.add(x.T @ xs)


class PairedCollector(StatsCollector):
    """StatsCollector for two streams. Per batch: `record()`, run the block on the original stream, `pair()`,
    run it on the compressed stream, `end_batch()`."""

    stats_factory = PairedStats

    def __init__(self, modules, abs_sums=True):
        super().__init__(modules, abs_sums)
        self._pairing = False
        self._pending = {}
        self._output_hooks = []

    def __enter__(self):
        super().__enter__()
        for name, module in self.modules.items():
            self._output_hooks.append(module.register_forward_hook(self._output_hook(name)))
        return self

    def __exit__(self, *exc):
        for handle in self._output_hooks:
            handle.remove()
        self._output_hooks.clear()
        self._pending.clear()
        return super().__exit__(*exc)

    def record(self):
        self._pairing = False

    def pair(self):
        self._pairing = True

    def end_batch(self):
        super().end_batch()
        self._pending.clear()

    def _hook(self, name):
        def hook(module, args):
            x = args[0]
            if self._first_batch and not self._pairing and name not in self._group_of:
                self._assign(name, x)
            group = self._group_of[name]
            if group.names[0] != name:
                return
            if self._pairing:
                group.stats.add_pair(self._pending.pop(id(group)), x)
            else:
                self._pending[id(group)] = x.detach()

        return hook

    def _output_hook(self, name):
        def hook(module, args, output):
            if self._pairing:
                return
            y = output.detach().float()
            bias = getattr(module, "bias", None)
            if bias is not None:
                y = y - bias.detach().float()
            stats = self._group_of[name].stats
            stats.output_energy[name] = stats.output_energy.get(name, 0.0) + float(y.square().sum(dtype=torch.float64))

        return hook
