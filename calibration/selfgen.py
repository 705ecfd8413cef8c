"""`--calib self`: calibration text sampled from the model itself, which needs no data at all.

All sequences are sampled in one batched generation with the KV cache on: on this project's 2 CPU cores a
decode step of SmolLM2-135M took 99 ms for 1 sequence and 255 ms for 20, so one batch gives 8x the tokens per
second of one sequence at a time (BENCHMARKS.md, "self-generated calibration"). The batch is capped by a fixed
KV-cache budget, not by this machine's memory, so that the same seed gives the same windows everywhere.
"""

import inspect
import time

import torch

from lowrank.errors import UsageError
from lowrank.heads import attention_sizes
from lowrank.progress import SILENT, ticker

KV_CACHE_BUDGET = 2 << 30  # bytes of keys and values per generation batch (fixed: the batches decide the samples)


def batch_size_for(config, num_samples, seq_len):
    """Sequences per generation batch: all of them, unless their KV cache would exceed KV_CACHE_BUDGET (float32)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    _, kv_heads, head_dim = attention_sizes(config)
    layers = getattr(config, "num_hidden_layers", None) or 1
    per_sequence = 2 * layers * seq_len * kv_heads * head_dim * 4
    return max(1, min(num_samples, KV_CACHE_BUDGET // per_sequence))


def _eos_ids(model):
    eos = model.generation_config.eos_token_id
    eos = eos if eos is not None else model.config.eos_token_id
    return [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


@torch.no_grad()
def _sample(model, rows, seq_len, start, device, tick):
    """rows sequences of seq_len tokens from BOS: one forward per step over the whole batch with the KV cache,
    each token drawn from the model's full next-token distribution (temperature 1, no top-k or top-p), end-of-text
    suppressed (windows are never short).

    Why untruncated: calibration text should cover what the model does on any text, not only its likeliest
    continuations. Measured on SmolLM2 at keep 0.9 with 32 x 256 windows (BENCHMARKS.md, "quick start"):
    perplexity on real news 87.6 after calibrating on top-k 50 / top-p 0.95 text, 43.1 on untruncated text (the
    original model: 31.8). Written out instead of model.generate, whose per-step logits processing costs as much
    as a forward at this vocabulary size."""
    eos = _eos_ids(model)
    # transformers 5.24 renamed the KV cache argument and output (past_key_values -> cache); older ones have only
    # the first name
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    tokens = torch.full((rows, 1), int(start), dtype=torch.long, device=device)
    sequence, past = [tokens], None
    for _ in range(seq_len - 1):
        out = model(input_ids=tokens, use_cache=True, **{name: past})
        past, logits = getattr(out, name), out.logits[:, -1].float()
        if eos:
            logits[:, eos] = -float("inf")
        tokens = torch.multinomial(torch.softmax(logits, dim=-1), 1)
        sequence.append(tokens)
        tick()
    return torch.cat(sequence, dim=1)


def generate(model, num_samples, seq_len, seed, device=None, progress=SILENT, batch_size=None):
    """num_samples sequences of exactly seq_len tokens, each started at BOS and sampled from the
    model (temperature 1, the full vocabulary).
    Sampled on `device` (default: where the model is; the model is moved there for the sampling and back); the
    token ids are returned on the CPU. `batch_size` (default: batch_size_for) only for tests."""
    from lowrank.core.fisher import staged

    config = model.generation_config
    start = config.bos_token_id if config.bos_token_id is not None else model.config.bos_token_id
    if getattr(model.config, "is_encoder_decoder", False):
        why = "this model is an encoder-decoder (--calib self samples a causal language model)"
    elif not hasattr(model, "generate") or not model.can_generate():
        why = "this model cannot generate text"
    else:
        why = None if start is not None else "this model has no BOS token to start from"
    if why is not None:
        raise UsageError(f"--calib self needs a decoder-only generative model with a BOS token, and {why}: pass "
                         "--calib FILE or a dataset")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    batch_size = batch_size or batch_size_for(model.config, num_samples, seq_len)
    counts = [batch_size] * (num_samples // batch_size) + ([num_samples % batch_size] if num_samples % batch_size
                                                           else [])
    steps = seq_len - 1
    started = time.perf_counter()

    def detail(done):
        batch, step = divmod(done, steps)
        tokens = (sum(counts[:batch]) * steps + (counts[batch] * step if step else 0)) if steps else 0
        rate = tokens / max(time.perf_counter() - started, 1e-9)
        return f"{tokens:,}/{num_samples * steps:,} tokens sampled, {rate:,.0f} tokens/s"

    tick = ticker(progress, "calibration text", max(1, steps * len(counts)), detail)
    # seeded inside fork_rng, so the caller's random state is left as it was: the CPU's, and on a GPU every
    # device's (torch.manual_seed seeds them all)
    cuda = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
    batches = []
    with torch.random.fork_rng(devices=cuda), staged(model, device), torch.no_grad():
        torch.manual_seed(seed)
        for count in counts:
            batches.append(_sample(model, count, seq_len, start, device, tick).cpu())
    return torch.cat(batches)
