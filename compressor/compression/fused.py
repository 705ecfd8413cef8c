"""Fused projections: one linear layer whose output rows are several projections of the same input.

Phi-3 computes q, k and v with one `qkv_proj` and gate and up with one `gate_up_proj`; GPT-NeoX, Falcon and Bloom
have one `query_key_value`, GPT-2 one `c_attn`. Such a matrix can be factorized whole (one rank, one `down`
shared by the slices: a LowRankLinear) or per output slice (q, k, v / gate, up each with its own rank: a
SlicedLowRankLinear, whose slices share the layer's one input Gram and whitening). Which is better depends on
the allocation, measured on SmolLM2-135M rewritten in the Phi-3 layout (identical logits; bench/fused_bench.py,
BENCHMARKS.md "Fused projections"): with the loss-aware allocation (`--alloc auto` = fisher) per slice wins
clearly at keep 0.8 (the allocation keeps the small GQA k and v nearly dense and cuts q, which one rank per fused
matrix cannot express), while under `--alloc uniform` whole wins (one shared `down` of rank 288 serves the
slices better than separate ranks 230/115/115). So `--fused auto` slices exactly when the ranks come from the
spectra (global, fisher), and keeps the matrix whole under uniform and sensitivity (ASVD's search measures
whole layers); `--fused whole|slices` overrides it.

An allocation treats each slice as its own candidate matrix, named `LAYER:SLICE` (e.g.
`model.layers.0.self_attn.qkv_proj:k`) in `ranks`: exactly as it treats a separate k_proj in the Llama layout,
with the Fisher weights sliced by rows. Slices are read from the model's config (head counts, head size,
intermediate size); some families interleave them per head (GPT-NeoX, Bloom, Falcon without grouped attention:
each head's q, k, v rows side by side), which the description says and the stored module undoes with views.
"""

from dataclasses import dataclass

from ..heads import attention_sizes

SLICED_ALLOCATIONS = ("global", "fisher")  # --fused auto slices when the ranks come from these
FUSED_MODES = ("auto", "whole", "slices")


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

    def slice_rows(self):
        """{slice name: LongTensor of its rows in the fused layer}, in slice order."""
        import torch

        group, start, rows = sum(self.sizes), 0, {}
        for name, size in zip(self.names, self.sizes):
            rows[name] = torch.cat([torch.arange(g * group + start, g * group + start + size)
                                    for g in range(self.groups)])
            start += size
        return rows

    def as_dict(self):
        return {"slices": [{"name": name, "rows_per_group": size, "rows": size * self.groups}
                           for name, size in zip(self.names, self.sizes)],
                "groups": self.groups, "layout": "contiguous" if self.groups == 1 else "interleaved per group",
                "description": self.describe()}


def _phi3(suffix, config):
    heads, kv, d = attention_sizes(config)
    if suffix == "qkv_proj":
        return FusedLayout(("q", "k", "v"), (heads * d, kv * d, kv * d))
    if suffix == "gate_up_proj":
        return FusedLayout(("gate", "up"), (config.intermediate_size, config.intermediate_size))
    return None


def _per_head(suffix, config):
    """GPT-NeoX and Bloom: `query_key_value` rows are, head after head, that head's q, k and v."""
    if suffix != "query_key_value":
        return None
    heads, _, d = attention_sizes(config)
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


def slice_key(name, part):
    """The name a slice of fused layer `name` has in `ranks` and in the allocation."""
    return f"{name}:{part}"


def fused_layouts(model, names):
    """{name: FusedLayout} of the known fused layers among `names`."""
    from ..io.modeling_lowrank import linear_shape

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layouts = {}
    for name in names:
        layout = fused_layout(config, name, linear_shape(model.get_submodule(name))[0])
        if layout is not None:
            layouts[name] = layout
    return layouts


def slices_by_rule(config):
    """Whether a fused layer is split when no ranks are given yet: --fused, or for auto the measured rule."""
    return config.fused == "slices" or (config.fused == "auto" and config.alloc in SLICED_ALLOCATIONS)


def sliced_layers(model, names, config):
    """{name: FusedLayout} of the fused layers among `names` that are factorized per slice. Once ranks exist
    (allocated, resumed or given), they decide: a layer is sliced when its slices have ranks of their own.
    Before that, slices_by_rule."""
    layouts = fused_layouts(model, names)
    if config.ranks:
        return {name: layout for name, layout in layouts.items()
                if any(slice_key(name, part) in config.ranks for part in layout.names)}
    return layouts if slices_by_rule(config) else {}


def fused_projections(model, names, sliced=()):
    """The fused layers among the targeted `names`, grouped by their name inside a block: a list of
    {"layer": "self_attn.qkv_proj", "count": N, "shape": [out, in], "factorized": ..., **layout}. `sliced`: the
    names factorized per slice (the rest whole)."""
    from ..io.modeling_lowrank import linear_shape

    groups = {}
    for name, layout in fused_layouts(model, names).items():
        out_features, in_features, _ = linear_shape(model.get_submodule(name))
        parts = name.split(".")
        inner = ".".join(parts[next(i for i, p in enumerate(parts) if p.isdigit()) + 1:]) \
            if any(p.isdigit() for p in parts) else name
        how = "per slice (separate ranks)" if name in sliced else "whole (one rank)"
        entry = groups.setdefault((inner, layout, how), {"layer": inner, "count": 0,
                                                         "shape": [out_features, in_features], "factorized": how,
                                                         **layout.as_dict()})
        entry["count"] += 1
    return list(groups.values())


def slice_ranks(fused, layers):
    """`fused` with what the compression did: an entry whose layers were factorized per slice says so and gets
    "ranks", per slice the mean rank of the factorized ones ("mean", None if all dense) and how many stayed
    dense ("dense"), read from the layer results' info["slices"]."""
    for entry in fused:
        found = {}
        for layer in layers:
            if layer.name.endswith("." + entry["layer"]) and "slices" in layer.info:
                for part in layer.info["slices"]:
                    found.setdefault(part["name"], []).append(part["rank"])
        if not found:
            continue
        entry["factorized"] = "per slice (separate ranks)"
        entry["ranks"] = {}
        for name, ranks in found.items():
            factorized = [rank for rank in ranks if rank is not None]
            entry["ranks"][name] = {"mean": sum(factorized) / len(factorized) if factorized else None,
                                    "dense": len(ranks) - len(factorized)}
    return fused
