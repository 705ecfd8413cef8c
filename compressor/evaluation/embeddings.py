"""For encoders (no next-token head to score): how close the model's sentence embeddings stay to the baseline's.

On the perplexity protocol's windows, each model's last hidden state is mean-pooled over the window's tokens
(every window is full length, so no padding enters the mean), and the cosine similarity of the two pooled vectors
is taken per window.
"""

import torch

POOLING = "mean of the last hidden state over each window's tokens"


def _pooled(model, ids):
    out = model(input_ids=ids, output_hidden_states=True)
    hidden = out.hidden_states[-1] if getattr(out, "hidden_states", None) is not None else out.last_hidden_state
    return hidden.to(torch.float64).mean(dim=1)


@torch.no_grad()
def embedding_similarity(model, baseline, batches, batch_size=1, device="cpu", progress=None):
    """{"cosine_mean", "cosine_min", "windows", "pooling"} of `model` against `baseline` on windows [count, seq_len]."""
    cosines = []
    for batch in batches.split(batch_size):
        ids = batch.to(device)
        cosines.append(torch.nn.functional.cosine_similarity(_pooled(model, ids), _pooled(baseline, ids), dim=-1).cpu())
        if progress is not None:
            progress()
    values = torch.cat(cosines)
    return {"cosine_mean": float(values.mean()), "cosine_min": float(values.min()), "windows": int(values.numel()),
            "pooling": POOLING}
