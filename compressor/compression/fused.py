"""Fused projections: one linear layer whose output rows are several projections of the same input.

Phi-3 computes q, k and v with one `qkv_proj` and gate and up with one `gate_up_proj`; GPT-NeoX, Falcon and Bloom
have one `query_key_value`, GPT-2 one `c_attn`. lowrank factorizes such a matrix whole, with one rank: one `down`
factor (the input subspace, shared by the slices) and one `up` whose rows are the slices' rows. That is the
layout the bundled modeling_lowrank.py, load_pretrained, PEFT and densify handle, and it is NOT what measured
best: SmolLM2-135M rewritten in the Phi-3 layout (identical logits) and compressed whole gets perplexity 60.13
at keep 0.8 with the default allocation, the same weights in the Llama layout (each slice its own layer and
rank, the same parameter count) 53.07 (bench/fused_bench.py, BENCHMARKS.md "Fused projections"). The
allocation keeps k and v nearly dense and compresses q hard, which one rank per fused matrix cannot express;
with `--alloc uniform` whole wins instead (91.59 against 97.34: the slices share one `down`), so the gain is the
allocation's freedom, not slicing as such.
Per-slice factorization needs a stored module with a `down`/`up` pair per slice (and the allocator, the bundled
modeling code, densify and the vLLM plugin taught about it); until it exists the report says "whole".

Factorizing whole never hides the slices: this module reads them from the model's config (head counts, head
size, intermediate size) so the report can name them, e.g. `qkv_proj: q 0:576, k 576:768, v 768:960`. Some
families interleave the slices per head (GPT-NeoX, Bloom, Falcon without grouped attention: each head's q, k, v
rows side by side); the description says so instead of pretending the slices are contiguous.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class FusedLayout:
    """The output rows of a fused layer: `groups` repetitions of the slices `names` with `sizes` rows each."""

    names: tuple[str, ...]
    sizes: tuple[int, ...]
    groups: int = 1

    @property
    def rows(self):
        return self.groups * sum(self.sizes)

    def describe(self):
        """'q 0:576, k 576:768, v 768:960', or for an interleaved layout the pattern of one group."""
        spans, start = [], 0
        for name, size in zip(self.names, self.sizes):
            spans.append(f"{name} {start}:{start + size}")
            start += size
        if self.groups == 1:
            return ", ".join(spans)
        totals = ", ".join(f"{name} {size * self.groups}" for name, size in zip(self.names, self.sizes))
        return (f"interleaved, {self.groups} groups of {start} rows, each {', '.join(spans)} "
                f"({totals} rows in all)")

    def as_dict(self):
        return {"slices": [{"name": name, "rows_per_group": size, "rows": size * self.groups}
                           for name, size in zip(self.names, self.sizes)],
                "groups": self.groups, "layout": "contiguous" if self.groups == 1 else "interleaved per group",
                "description": self.describe()}


def _attention_sizes(config):
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv, head_dim


def _phi3(suffix, config):
    heads, kv, d = _attention_sizes(config)
    if suffix == "qkv_proj":
        return FusedLayout(("q", "k", "v"), (heads * d, kv * d, kv * d))
    if suffix == "gate_up_proj":
        return FusedLayout(("gate", "up"), (config.intermediate_size, config.intermediate_size))
    return None


def _per_head(suffix, config):
    """GPT-NeoX and Bloom: `query_key_value` rows are, head after head, that head's q, k and v."""
    if suffix != "query_key_value":
        return None
    heads, _, d = _attention_sizes(config)
    return FusedLayout(("q", "k", "v"), (d, d, d), groups=heads)


def _falcon(suffix, config):
    if suffix != "query_key_value":
        return None
    heads, d = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    if config.new_decoder_architecture:  # per key/value group: its query heads, then one k and one v head
        kv = config.num_kv_heads
        return FusedLayout(("q", "k", "v"), (heads // kv * d, d, d), groups=kv)
    if config.multi_query:  # every query head, then the one shared k and v head
        return FusedLayout(("q", "k", "v"), (heads * d, d, d))
    return FusedLayout(("q", "k", "v"), (d, d, d), groups=heads)


def _gpt2(suffix, config):
    if suffix == "c_attn":
        return FusedLayout(("q", "k", "v"), (config.n_embd,) * 3)
    return None


FAMILIES = {"phi3": _phi3, "gpt_neox": _per_head, "bloom": _per_head, "falcon": _falcon, "gpt2": _gpt2}


def fused_layout(config, name, out_features):
    """The FusedLayout of layer `name` in a model with `config`, or None when it is not a known fused layer (or
    the config's sizes do not add up to its `out_features`: then nothing is claimed about its rows)."""
    family = FAMILIES.get(getattr(config, "model_type", None))
    if family is None:
        return None
    if name.endswith("crossattention.c_attn"):  # GPT-2 cross-attention: k and v of the encoder's states
        layout = FusedLayout(("k", "v"), (config.n_embd,) * 2) if family is _gpt2 else None
    else:
        layout = family(name.rsplit(".", 1)[-1], config)
    return layout if layout is not None and layout.rows == out_features else None


def fused_projections(model, names):
    """The fused layers among the targeted `names`, grouped by their name inside a block: a list of
    {"layer": "self_attn.qkv_proj", "count": N, "shape": [out, in], "factorized": "whole", **layout}."""
    from ..io.modeling_lowrank import linear_shape

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    groups = {}
    for name in names:
        out_features, in_features, _ = linear_shape(model.get_submodule(name))
        layout = fused_layout(config, name, out_features)
        if layout is None:
            continue
        parts = name.split(".")
        inner = ".".join(parts[next(i for i, p in enumerate(parts) if p.isdigit()) + 1:]) \
            if any(p.isdigit() for p in parts) else name
        entry = groups.setdefault((inner, layout), {"layer": inner, "count": 0, "shape": [out_features, in_features],
                                                    "factorized": "whole (one rank)", **layout.as_dict()})
        entry["count"] += 1
    return list(groups.values())

