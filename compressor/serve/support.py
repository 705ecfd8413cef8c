"""Which lowrank checkpoints the vLLM plugin can serve, decided from config.json alone (no vLLM, no torch).

vLLM has its own model code per family; the plugin reuses it for everything but the factorized projections, so it
serves a family only where it knows vLLM's layer layout: the Llama family's decoder layer (q/k/v fused into
`qkv_proj`, gate/up into `gate_up_proj`, `o_proj` and `down_proj` row-parallel). Anything else is refused with
one message that names what is unsupported and what to do instead, rather than a vLLM traceback.
"""

import re

# base model_type -> vLLM's model class (module, class name) the plugin builds on.
FAMILIES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "mistral": ("mistral", "MistralForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "gemma": ("gemma", "GemmaForCausalLM"),  # the same layer layout; its own norms, embedding scale and GeLU
}
ARCHITECTURES = {base_arch: family for family, (_, base_arch) in FAMILIES.items()}
LAYER = re.compile(r"^model\.layers\.(\d+)\.(self_attn\.(?:q|k|v|o)_proj|mlp\.(?:gate|up|down)_proj)$")
ALTERNATIVE = ("serve it with transformers (lowrank.load_pretrained, or trust_remote_code=True), or make a dense "
               "copy for vLLM with `lowrank densify`")


class UnservableCheckpoint(ValueError):
    """A lowrank checkpoint the vLLM plugin cannot serve; the message says what and what to do instead."""


def family_of(config):
    """The supported family of a lowrank checkpoint's config dict (e.g. "llama"), or raise UnservableCheckpoint."""
    block = config.get("lowrank") if isinstance(config.get("lowrank"), dict) else {}
    base_type = block.get("base_model_type") or str(config.get("model_type", "")).removeprefix("lowrank_")
    architectures = block.get("base_architectures") or [
        name.removeprefix("LowRank") for name in config.get("architectures") or []]
    if base_type not in FAMILIES:
        raise UnservableCheckpoint(
            f"lowrank's vLLM plugin cannot serve a {base_type or 'model of unknown type'} checkpoint (it serves "
            f"{', '.join(FAMILIES)}); {ALTERNATIVE}")
    wanted = FAMILIES[base_type][1]
    if architectures and architectures[0] != wanted:
        raise UnservableCheckpoint(
            f"lowrank's vLLM plugin serves {base_type} checkpoints as {wanted}, not {architectures[0]}; "
            f"{ALTERNATIVE}")
    return base_type


def check_servable(config):
    """Raise UnservableCheckpoint unless the plugin can serve this lowrank config dict; return its family.

    Servable: a supported family, every factorized module one of a decoder layer's seven projections (the
    embeddings and the LM head must be dense: vLLM's vocabulary-parallel layers have no factorized form here),
    positive integer ranks.
    """
    family = family_of(config)
    sliced = sorted((config.get("lowrank") or {}).get("sliced") or {})
    if sliced:  # fused projections (Phi-3, GPT-NeoX, ...): no served family has them, but never guess a layout
        raise UnservableCheckpoint(
            f"lowrank's vLLM plugin cannot serve {sliced[0]}, a fused projection factorized per slice "
            f"(SlicedLowRankLinear): it serves separate q/k/v and gate/up projections only; {ALTERNATIVE}")
    ranks = (config.get("lowrank") or {}).get("ranks") or {}
    others = sorted(name for name in ranks if not LAYER.match(name))
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise UnservableCheckpoint(
            f"lowrank's vLLM plugin cannot serve factorized {shown}: it factorizes only the attention and MLP "
            f"projections of the decoder layers; {ALTERNATIVE}")
    bad = sorted(name for name, rank in ranks.items() if not isinstance(rank, int) or rank < 1)
    if bad:
        raise UnservableCheckpoint(f"config.json gives {bad[0]} the rank {ranks[bad[0]]!r}, not a positive integer: "
                                   "the checkpoint is damaged; compress the model again")
    return family


def layer_ranks(config, index):
    """{projection ("q_proj", ..., "down_proj"): rank} of decoder layer `index`; absent projections are dense."""
    found = {}
    for name, rank in ((config.get("lowrank") or {}).get("ranks") or {}).items():
        match = LAYER.match(name)
        if match and int(match.group(1)) == index:
            found[match.group(2).rpartition(".")[2]] = int(rank)
    return found


def check_no_lora(config, lora_enabled):
    """Refuse `--enable-lora` on a checkpoint with factorized projections, at engine start.

    vLLM's LoRA layers wrap its dense linear layers by name: on a factorized projection they would wrap one of
    the factors (whose input is the rank-r code, not the layer's input), so an adapter would fail at request time
    and take the engine down, or be applied to the wrong vector. Refusing before any request is served is the
    safe answer until the plugin has LoRA layers of its own.
    """
    if lora_enabled and ((config.get("lowrank") or {}).get("ranks")):
        raise UnservableCheckpoint(
            "lowrank's vLLM plugin cannot apply LoRA adapters (--enable-lora) to a checkpoint with factorized "
            "projections: vLLM's LoRA layers expect dense ones. Fold an EoRA repair adapter into the factors with "
            "`lowrank compensate ORIGINAL COMPRESSED --rank K -o OUT --merge` and serve OUT without --enable-lora, "
            "or apply the adapter with transformers and PEFT (lowrank.load_pretrained)")
