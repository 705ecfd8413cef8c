"""Perplexity with a fixed, stated protocol (the one GPTQ, SVD-LLM and ASVD report):

the evaluation texts are joined with blank lines and tokenized once without special tokens; the token stream is
cut into consecutive non-overlapping windows of `seq_len` tokens (a shorter tail is dropped); in each window every
token after the first is scored given the ones before it. Perplexity = exp(mean negative log-likelihood).
"""

import math

import torch
import torch.nn.functional as F

PROTOCOL = "concat-nonoverlap"


def windows(stream, seq_len, max_tokens=None):
    count = stream.numel() // seq_len
    if max_tokens is not None:
        count = min(count, max(1, max_tokens // seq_len))
    return stream[: count * seq_len].view(count, seq_len)


@torch.no_grad()
def perplexity(model, stream, seq_len, batch_size=4, max_tokens=None, device="cpu", progress=None):
    """{"perplexity", "nll", "tokens_scored", "windows", "seq_len", "protocol"} of `model` on a token stream."""
    batches = windows(stream, seq_len, max_tokens)
    if batches.shape[0] == 0:
        raise ValueError(f"the evaluation text has {stream.numel()} tokens, fewer than one window of {seq_len}")
    total, count = 0.0, 0
    for batch in batches.split(batch_size):
        logits = model(input_ids=batch.to(device)).logits.float()
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten().to(device), reduction="sum")
        total += loss.item()
        count += batch[:, 1:].numel()
        if progress is not None:
            progress()
    nll = total / count
    return {"perplexity": math.exp(nll), "nll": nll, "tokens_scored": count, "windows": int(batches.shape[0]),
            "seq_len": seq_len, "protocol": PROTOCOL}
