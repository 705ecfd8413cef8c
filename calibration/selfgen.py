"""`--calib self`: calibration text sampled from the model itself, which needs no data at all."""

import torch

from lowrank.errors import UsageError


def generate(model, num_samples, seq_len, seed, batch_size=16):
    """num_samples sequences of exactly seq_len tokens, each started at BOS and sampled (top-p 0.95) from the model."""
    config = model.generation_config
    start = config.bos_token_id if config.bos_token_id is not None else model.config.bos_token_id
    if start is None or not hasattr(model, "generate") or not model.can_generate():
        raise UsageError("--calib self needs a generative model with a BOS token; pass --calib with text instead")
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    batches = []
    try:
        with torch.no_grad():
            for count in [batch_size] * (num_samples // batch_size) + [num_samples % batch_size]:
                if count == 0:
                    continue
                prompt = torch.full((count, 1), int(start), dtype=torch.long)
                out = model.generate(
                    input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_p=0.95,
                    top_k=0, temperature=1.0, max_new_tokens=seq_len - 1, min_new_tokens=seq_len - 1,
                    pad_token_id=config.eos_token_id if config.pad_token_id is None else config.pad_token_id,
                )
                batches.append(out[:, :seq_len])
    finally:
        torch.random.set_rng_state(generator_state)
    return torch.cat(batches)
