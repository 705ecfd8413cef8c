"""Prefill and decode throughput, and memory, of a model on one prompt (batch 1), the way serving uses it.

prefill: one forward pass over the prompt that builds the KV cache, tokens/s = prompt length / time.
decode:  `decode_tokens` greedy single-token steps on top of that cache, tokens/s = steps / time.
Each is the median of `repeats` runs after one warm-up run. Memory: the bytes of the weights (exact, any device)
and, on CUDA, the peak footprint of this model: its weights plus the most memory allocated above what was already
allocated when the runs began (activations, KV cache), so that a second model on the same device is not counted.
On CPU no peak is given: process RSS cannot tell two models in one process apart, and a number that mixes them
would mislead.
"""

import statistics
import time
from functools import partial

import torch

from ..io.checkpoint import shared_copies


def weights_bytes(model):
    """Bytes of the model's parameters and buffers, tied tensors counted once."""
    named = list(model.named_parameters()) + list(model.named_buffers())
    copies = shared_copies(named)
    return sum(tensor.numel() * tensor.element_size() for name, tensor in named if name not in copies)


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def _timed(function, device):
    _sync(device)
    start = time.perf_counter()
    result = function()
    _sync(device)
    return time.perf_counter() - start, result


@torch.no_grad()
def measure(model, prompt, device="cpu", decode_tokens=32, repeats=3, causal=True):
    """{"prompt_tokens", "prefill_tokens_per_s", "decode_tokens", "decode_tokens_per_s", "weights_bytes",
    "peak_memory_bytes", "repeats"} for `prompt` (a 1-D tensor of token ids)."""
    ids = prompt.reshape(1, -1).to(device)
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device)

    def prefill():
        return model(input_ids=ids, use_cache=causal)

    def decode(out):
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(decode_tokens):
            out = model(input_ids=token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)

    prefill_times, decode_times = [], []
    for run in range(repeats + 1):  # run 0 warms up kernels and allocator and is not counted
        seconds, prefilled = _timed(prefill, device)
        decode_seconds = _timed(partial(decode, prefilled), device)[0] if causal and decode_tokens else None
        del prefilled
        if run:
            prefill_times.append(seconds)
            decode_times.append(decode_seconds)
    weights = weights_bytes(model)
    return {
        "prompt_tokens": int(ids.shape[1]),
        "prefill_tokens_per_s": ids.shape[1] / statistics.median(prefill_times),
        "decode_tokens": decode_tokens if causal else 0,
        "decode_tokens_per_s": decode_tokens / statistics.median(decode_times) if causal and decode_tokens else None,
        "weights_bytes": weights,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) - resident + weights if cuda else None,
        "repeats": repeats,
    }
