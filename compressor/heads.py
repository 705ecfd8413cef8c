"""Attention head arithmetic read from a transformers config, written once.

Two places need it: compression/fused.py (the q, k, v rows of a fused projection) and calibration/selfgen.py (the
KV cache a batch of sampled sequences will hold). A neutral module, so that neither package imports the other.
"""


def attention_sizes(config):
    """(query heads, key/value heads, head size) of a (text) config. Missing fields fall back to what most
    families mean by their absence: no `num_key_value_heads` is one key/value head per query head, no `head_dim`
    is hidden_size / heads; a config without heads at all counts as one head (never a division by zero)."""
    heads = getattr(config, "num_attention_heads", None) or 1
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or (getattr(config, "hidden_size", 0) // heads) or 1
    return heads, kv_heads, head_dim
