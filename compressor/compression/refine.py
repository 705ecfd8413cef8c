"""Block refinement (AA-SVD): a few Adam steps on a factorized block's factors so that it reproduces a target.

The walk (sequential.py) calls refine_block once a block is factorized, with the block's inputs (the compressed
stream) and its targets: the original block's outputs on that stream (--refine-target block) or the original
model's outputs at this depth (--refine-target model). Only factor weights move.

A step reads a micro-batch of `batch` windows, not a whole calibration batch: the walk's batches of 8 x 512
tokens make each step cost 4,096 tokens of forward and backward, and at a fixed compute budget more, smaller
steps fit more (BENCHMARKS.md, "Refinement steps"). The arguments a micro-batch needs (its mask and rotary
tables are shaped by its size) are recorded at capture time (capture.capture_block_inputs, also_sizes).
"""

import math

import torch

from ..io.modeling_lowrank import LowRankLinear, SlicedLowRankLinear


def hidden_states(output):
    """A block's output hidden states: the first item where a block returns a tuple."""
    return output[0] if isinstance(output, (tuple, list)) else output


def micro_batches(sizes, batch):
    """[(batch index, rows)] covering every window of batches of these sizes, `batch` windows a piece at most."""
    return [(index, slice(start, min(start + batch, size))) for index, size in enumerate(sizes)
            for start in range(0, size, batch)]


def micro_batch_sizes(sizes, batch):
    """The sizes of micro_batches(sizes, batch): what the capture must record arguments for."""
    return {rows.stop - rows.start for _, rows in micro_batches(sizes, batch)}


def refine_block(block, states, targets, extras, steps, lr, device, seed=0, batch=None, monitor=None, outputs=None):
    """`steps` Adam steps on the block's factors so that, fed `states`, it reproduces `targets`. Each step reads
    one micro-batch of `batch` windows (None: a whole batch of the walk), drawn in a seeded order, reshuffled at
    each pass over the data. The loss is the relative squared error of the block's output, measured over the
    whole calibration set before and after: should the steps have made it worse (a learning rate too high for
    this block), the closed-form factors are put back, so refinement never leaves a block worse on what it
    fitted. `outputs` (a stream, offload.states_factory's) receives the block's outputs on `states` from the pass
    that measures the loss after: the walk then feeds them to the next block instead of running this one again
    (one block forward a block, ~15 s of the protocol's 400); they are the refined factors' outputs, so they are
    of use only when "kept". Returns {"loss_before", "loss_after", "loss_first", "loss_last", "kept"} or None
    (nothing to refine)."""
    factors = [p for m in block.modules() if isinstance(m, (LowRankLinear, SlicedLowRankLinear))
               for p in m.parameters() if p.dim() == 2]  # the factors' weights, not the biases
    if not factors or steps <= 0:
        return None
    flags = {p: p.requires_grad for p in block.parameters()}
    closed_form = [p.detach().clone() for p in factors]
    sizes = []
    before = block_loss(block, states, targets, extras, device, sizes)
    pieces = micro_batches(sizes, batch or max(sizes))
    for p in block.parameters():
        p.requires_grad_(False)
    for p in factors:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(factors, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    order, first, last = [], None, None
    try:
        with torch.enable_grad():
            for step in range(steps):
                if not order:  # a new pass over the data, in a new order
                    order = torch.randperm(len(pieces), generator=generator).tolist()
                index, rows = pieces[order.pop(0)]
                args, kwargs = extras.of(index, rows.stop - rows.start, device, rows)
                target = targets[index][rows].to(device).float()
                out = hidden_states(block(states[index][rows].to(device), *args, **kwargs)).float()
                loss = (out - target).square().mean() / target.square().mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                first = loss.item() if first is None else first
                last = loss.item()
                if monitor is not None:  # (benchmarks: a held-out curve)
                    monitor(step + 1, last)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    del optimizer
    after = block_loss(block, states, targets, extras, device, outputs=outputs)
    kept = after < before and math.isfinite(after)
    if not kept:
        with torch.no_grad():
            for p, saved in zip(factors, closed_form):
                p.copy_(saved)
    return {"loss_before": before, "loss_after": after if kept else before, "loss_first": first, "loss_last": last,
            "kept": kept}


def block_loss(block, states, targets, extras, device, sizes=None, outputs=None):
    """sum ||B(x) - y||^2 / sum ||y||^2 over every batch, in float64: the refinement's loss on all its data.
    `sizes`, if given, receives each batch's number of windows; `outputs` the block's outputs B(x)."""
    error = energy = 0.0
    with torch.no_grad():
        for index in range(len(states)):
            hidden = states[index]
            if sizes is not None:
                sizes.append(hidden.shape[0])
            args, kwargs = extras.of(index, hidden.shape[0], device)
            out = hidden_states(block(hidden.to(device), *args, **kwargs))
            if outputs is not None:
                outputs.append(out.to("cpu"))
            out = out.double()
            target = targets[index].to(device).double()
            error += float((out - target).square().sum())
            energy += float(target.square().sum())
    return error / energy if energy > 0 else 0.0
