"""Perplexity with a fixed, stated protocol (the one GPTQ, SVD-LLM and ASVD report), and agreement with a baseline.

Protocol: the evaluation texts are joined with blank lines and tokenized once without special tokens; the token
stream is cut into consecutive non-overlapping windows of `seq_len` tokens (stride = seq_len, a shorter tail is
dropped); in each window every token after the first is scored given the ones before it.
Perplexity = exp(mean negative log-likelihood over the scored tokens).

Agreement with a baseline is measured on the same windows and positions: the KL divergence
KL(P_baseline || P_model) of the two next-token distributions (nats per token) and top-1 agreement (how often
both models' most likely next token is the same). KL reacts to changes that perplexity averages away, which is why
it is the sharper test at mild compression ratios.
"""

import math

import torch

from lowrank.calibration import JOIN  # the join of tokenize_stream, the same as GPTQ's for WikiText-2

PROTOCOL = "concat-nonoverlap"
CHUNK = 512  # positions per float32 log-softmax: bounds the [positions, vocab] copies for large vocabularies


def windows(stream, seq_len, max_tokens=None):
    count = stream.numel() // seq_len
    if max_tokens is not None:
        count = min(count, max(1, max_tokens // seq_len))
    return stream[: count * seq_len].view(count, seq_len)


def protocol(seq_len, window_count, stream_tokens):
    """The protocol as data (recorded with every evaluation) plus the sentence that states it."""
    scored = window_count * (seq_len - 1)
    unused = stream_tokens - window_count * seq_len
    statement = (
        f"texts joined with {JOIN!r} and tokenized once without special tokens; {window_count:,} non-overlapping "
        f"windows of {seq_len:,} tokens (stride {seq_len:,}; {unused:,} trailing tokens unused); {scored:,} tokens "
        "scored (each window's first token is context only)"
    )
    return {"name": PROTOCOL, "join": JOIN, "special_tokens": False, "seq_len": seq_len, "stride": seq_len,
            "windows": window_count, "tokens_scored": scored, "stream_tokens": stream_tokens,
            "unused_tokens": unused, "statement": statement}


def _quantile(sorted_values, q):
    """Linear-interpolation quantile of an ascending float64 tensor (torch.quantile refuses > 16M elements)."""
    position = q * (sorted_values.numel() - 1)
    low = math.floor(position)
    high = min(low + 1, sorted_values.numel() - 1)
    return float(sorted_values[low] + (position - low) * (sorted_values[high] - sorted_values[low]))


class _Tally:
    """Sums in float64 over chunks of positions."""

    def __init__(self):
        self.nll, self.base_nll, self.agree, self.count = 0.0, 0.0, 0, 0
        self.kl = []

    def add(self, logits, targets, ref_logits=None):
        logp = torch.log_softmax(logits.float(), dim=-1)
        self.nll -= logp.gather(-1, targets.unsqueeze(-1)).sum(dtype=torch.float64).item()
        self.count += targets.numel()
        if ref_logits is None:
            return
        ref_logp = torch.log_softmax(ref_logits.float(), dim=-1)
        self.base_nll -= ref_logp.gather(-1, targets.unsqueeze(-1)).sum(dtype=torch.float64).item()
        ref_p = ref_logp.exp()
        # 0 * log 0 = 0: a token the baseline gives probability 0 contributes nothing (avoids 0 * -inf = nan).
        terms = torch.where(ref_p > 0, ref_p * (ref_logp - logp), torch.zeros((), device=ref_p.device))
        self.kl.append(terms.sum(-1, dtype=torch.float64).flatten().cpu())
        self.agree += int((ref_logp.argmax(-1) == logp.argmax(-1)).sum())


@torch.no_grad()
def score(model, batches, baseline=None, batch_size=1, device="cpu", progress=None):
    """Score the windows `batches` ([count, seq_len]) with `model`, and with `baseline` on the same positions.

    Returns {"perplexity", "nll", "tokens_scored", "windows", "seq_len", "protocol"}, plus "baseline"
    ({"perplexity", "nll"}) and "agreement" ({"kl_mean", "kl_median", "kl_p99", "kl_max", "top1", "positions"})
    when a baseline is given. Both models must share the vocabulary (same logits width).
    """
    tally = _Tally()
    for batch in batches.split(batch_size):
        ids = batch.to(device)
        logits = model(input_ids=ids).logits[:, :-1]
        ref = baseline(input_ids=ids).logits[:, :-1] if baseline is not None else None
        if ref is not None and ref.shape[-1] != logits.shape[-1]:
            raise ValueError(f"the model has {logits.shape[-1]} logits per token and the baseline {ref.shape[-1]}")
        targets = ids[:, 1:]
        for start in range(0, targets.shape[1], CHUNK):
            part = slice(start, start + CHUNK)
            tally.add(logits[:, part], targets[:, part], None if ref is None else ref[:, part])
        del logits, ref
        if progress is not None:
            progress()
    nll = tally.nll / tally.count
    result = {"perplexity": math.exp(nll), "nll": nll, "tokens_scored": tally.count,
              "windows": int(batches.shape[0]), "seq_len": int(batches.shape[1]), "protocol": PROTOCOL}
    if baseline is not None:
        base_nll = tally.base_nll / tally.count
        kl = torch.cat(tally.kl).sort().values
        result["baseline"] = {"perplexity": math.exp(base_nll), "nll": base_nll}
        result["agreement"] = {"kl_mean": float(kl.mean()), "kl_median": _quantile(kl, 0.5),
                               "kl_p99": _quantile(kl, 0.99), "kl_max": float(kl[-1]),
                               "top1": tally.agree / tally.count, "positions": tally.count}
    return result


def perplexity(model, stream, seq_len, batch_size=4, max_tokens=None, device="cpu", progress=None):
    """{"perplexity", "nll", "tokens_scored", "windows", "seq_len", "protocol"} of `model` on a token stream."""
    batches = windows(stream, seq_len, max_tokens)
    if batches.shape[0] == 0:
        raise ValueError(f"the evaluation text has {stream.numel()} tokens, fewer than one window of {seq_len}")
    return score(model, batches, batch_size=batch_size, device=device, progress=progress)
