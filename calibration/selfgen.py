"""`--calib self`: calibration text sampled from the model itself, which needs no data at all."""

import torch

from lowrank.errors import UsageError


def generate(model, num_samples, seq_len, seed, batch_size=16, device=None):
    """num_samples sequences of exactly seq_len tokens, each started at BOS and sampled (top-p 0.95) from the model.
    Sampled on `device` (default: where the model is; the model is moved there for the sampling and back); the
    token ids are returned on the CPU."""
    from lowrank.core.fisher import staged

    config = model.generation_config
    start = config.bos_token_id if config.bos_token_id is not None else model.config.bos_token_id
    if start is None or not hasattr(model, "generate") or not model.can_generate():
        raise UsageError("--calib self needs a generative model with a BOS token; pass --calib with text instead")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    # seeded inside fork_rng, so the caller's random state is left as it was: the CPU's, and on a GPU every
    # device's (torch.manual_seed seeds them all)
    cuda = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
    batches = []
    with torch.random.fork_rng(devices=cuda), staged(model, device), torch.no_grad():
        torch.manual_seed(seed)
        for count in [batch_size] * (num_samples // batch_size) + [num_samples % batch_size]:
            if count == 0:
                continue
            prompt = torch.full((count, 1), int(start), dtype=torch.long, device=device)
            out = model.generate(
                input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_p=0.95,
                top_k=0, temperature=1.0, max_new_tokens=seq_len - 1, min_new_tokens=seq_len - 1,
                pad_token_id=config.eos_token_id if config.pad_token_id is None else config.pad_token_id,
            )
            batches.append(out[:, :seq_len].cpu())
    return torch.cat(batches)
