"""`--calib self`: calibration text sampled from the model itself, which needs no data at all.

All sequences are sampled in one batched generation with the KV cache on: on 2 CPU cores a decode step of
SmolLM2-135M costs about the same for 1 sequence as for 32 (it is bound by reading the weights), so sampling
the windows one batch after another was what made `--calib self` the slowest phase of a quick start
(BENCHMARKS.md, "self-generated calibration"). The batch is capped by a fixed KV-cache budget, not by this
machine's memory, so that the same seed gives the same windows everywhere.
"""

import time

import torch

from lowrank.errors import UsageError
from lowrank.progress import SILENT, ticker

KV_CACHE_BUDGET = 2 << 30  # bytes of keys and values per generation batch (fixed: the batches decide the samples)


def batch_size_for(config, num_samples, seq_len):
    """Sequences per generation batch: all of them, unless their KV cache would exceed KV_CACHE_BUDGET (float32)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(config, "num_attention_heads", None) or 1
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or (getattr(config, "hidden_size", 0) // heads) or 1
    layers = getattr(config, "num_hidden_layers", None) or 1
    per_sequence = 2 * layers * seq_len * kv_heads * head_dim * 4
    return max(1, min(num_samples, KV_CACHE_BUDGET // per_sequence))


class _Ticker:
    """A logits processor that changes nothing and counts the decode steps (each one token per sequence of the
    batch) for `progress`, at most ~40 advances (so a log gets a few dozen lines)."""

    def __init__(self, progress, counts, seq_len):
        self.counts, self.steps, self.started = counts, seq_len - 1, time.perf_counter()
        self.tick = ticker(progress, "calibration text", self.steps * len(counts), self.detail)
        self.total = sum(counts) * self.steps

    def detail(self, done):
        batch, step = divmod(done, self.steps)
        tokens = sum(self.counts[:batch]) * self.steps + (self.counts[batch] * step if step else 0)
        rate = tokens / max(time.perf_counter() - self.started, 1e-9)
        return f"{tokens:,}/{self.total:,} tokens sampled, {rate:,.0f} tokens/s"

    def __call__(self, input_ids, scores):
        self.tick()
        return scores


def generate(model, num_samples, seq_len, seed, device=None, progress=SILENT, batch_size=None):
    """num_samples sequences of exactly seq_len tokens, each started at BOS and sampled (top-p 0.95) from the model.
    Sampled on `device` (default: where the model is; the model is moved there for the sampling and back); the
    token ids are returned on the CPU. `batch_size` (default: batch_size_for) only for tests."""
    from transformers import LogitsProcessorList

    from lowrank.core.fisher import staged

    config = model.generation_config
    start = config.bos_token_id if config.bos_token_id is not None else model.config.bos_token_id
    if start is None or not hasattr(model, "generate") or not model.can_generate():
        raise UsageError("--calib self needs a generative model with a BOS token; pass --calib with text instead")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    batch_size = batch_size or batch_size_for(model.config, num_samples, seq_len)
    counts = [batch_size] * (num_samples // batch_size) + ([num_samples % batch_size] if num_samples % batch_size
                                                           else [])
    counter = _Ticker(progress, counts, seq_len)
    # seeded inside fork_rng, so the caller's random state is left as it was: the CPU's, and on a GPU every
    # device's (torch.manual_seed seeds them all)
    cuda = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
    batches = []
    with torch.random.fork_rng(devices=cuda), staged(model, device), torch.no_grad():
        torch.manual_seed(seed)
        for count in counts:
            prompt = torch.full((count, 1), int(start), dtype=torch.long, device=device)
            out = model.generate(
                input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_p=0.95,
                top_k=0, temperature=1.0, max_new_tokens=seq_len - 1, min_new_tokens=seq_len - 1,
                pad_token_id=config.eos_token_id if config.pad_token_id is None else config.pad_token_id,
                logits_processor=LogitsProcessorList([counter]), use_cache=True,
            )
            batches.append(out[:, :seq_len].cpu())
    return torch.cat(batches)
