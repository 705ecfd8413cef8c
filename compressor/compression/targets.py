"""Which modules get factorized: the repeated blocks of a model and the linear layers inside them."""

import fnmatch
import re

import torch.nn as nn

from ..errors import UsageError


def is_linear(module):
    """nn.Linear or GPT-2 style Conv1D (both compute y = W x + b; Conv1D stores W transposed)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def is_router(name, module):
    """A mixture-of-experts router (`router`, `gate`, a *Router class, or a layer inside a `router` module such as
    Switch Transformers' `router.classifier`): it decides the routing, so it stays dense even where it is a
    linear layer (Llama 4's Llama4Router subclasses nn.Linear)."""
    parts = name.split(".")
    return any("router" in part for part in parts) or parts[-1] == "gate" or "Router" in type(module).__name__


def dense_weight(module):
    """The (out x in) weight of a linear layer: nn.Linear, Conv1D (transposed), or LowRankLinear (up @ down)."""
    weight = module.weight.detach()  # for LowRankLinear a plain tensor: detach() leaves the read-only view
    return weight.T if type(module).__name__ == "Conv1D" else weight


STACKS_SEPARATOR = ","  # between the stacks a run compresses: "model.encoder.layers,model.decoder.layers"


def stack_names(blocks_name):
    """The stacks of blocks named by `blocks_name` (find_blocks' first item), in the order the model runs them."""
    return blocks_name.split(STACKS_SEPARATOR)


def block_prefixes(model, blocks_name):
    """The module-name prefix of every block ("model.decoder.layers.3."), numbered across the stacks in run order:
    the index the walk, the writer and the journal use for a block."""
    return [f"{name}.{index}." for name in stack_names(blocks_name) for index in range(len(model.get_submodule(name)))]


def find_blocks(model, path=None):
    """(name, ModuleList) of the repeated blocks to compress: `path` (--blocks), else the model's one stack.

    A stack is a ModuleList whose children share one class and hold linear layers. A model with several stacks
    outside one another (a vision tower and a language model, two towers) is refused unless --blocks names one:
    compressing the largest alone would leave the others dense without a word. Two exceptions: a vision-language
    model, whose language model's stack is the default (issue 16: most of its weights, and what text calibration
    exercises; the coverage counts the tower as dense), and an encoder-decoder, whose encoder and decoder stacks
    are both compressed (issue 16, item 5): text drives both, through the encoder and as teacher-forced decoder
    input. Several stacks are named with commas, in the order the model runs them; the returned ModuleList then
    holds their blocks in that order (sequential.walk_blocks calibrates each stack on the ones before it)."""
    if path is not None:
        lists = [_named_stack(model, name) for name in path.split(STACKS_SEPARATOR)]
        return path, lists[0] if len(lists) == 1 else nn.ModuleList([b for blocks in lists for b in blocks])
    stacks = block_lists(model)
    if not stacks:
        raise UsageError("found no repeated blocks (an nn.ModuleList of layers) in this model; name the list of "
                         "blocks to compress with --blocks PATH")
    language = _inside(model, "get_decoder", stacks) if len(stacks) > 1 and _multimodal(model) else []
    if len(language) == 1:
        return language[0]  # a vision-language model: its language model by default, the tower with --blocks
    both = _encoder_decoder_stacks(model, stacks)
    if both is not None:
        return find_blocks(model, STACKS_SEPARATOR.join(both))
    if len(stacks) > 1:
        names = ", ".join(name for name, _ in stacks)
        raise UsageError(f"this model has {len(stacks)} stacks of blocks ({names}); lowrank compresses one stack per "
                         "run: name it with --blocks PATH (the others then stay dense, and the run says so)")
    return stacks[0]


def _named_stack(model, name):
    try:
        module = model.get_submodule(name)
    except AttributeError:
        module = None
    if not isinstance(module, nn.ModuleList) or len(module) == 0:
        found = ", ".join(stack for stack, _ in block_lists(model)) or "none"
        raise UsageError(f"--blocks {name} is not a list of blocks in this model (block lists found: {found})")
    return module


def is_encoder_decoder(model):
    config = getattr(model, "config", None)
    return bool(getattr(config, "is_encoder_decoder", False)) and hasattr(model, "get_encoder")


def _inside(model, accessor, stacks):
    """The stacks (name, ModuleList) inside the submodule that the model's own `accessor` method returns
    (get_decoder / get_encoder); none when it has no such method, it fails or it returns the model itself."""
    try:
        part = getattr(model, accessor)()
    except (AttributeError, NotImplementedError, TypeError):
        return []
    outer = next((name for name, module in model.named_modules() if module is part), None)
    return [stack for stack in stacks if outer and stack[0].startswith(outer + ".")]


def _encoder_decoder_stacks(model, stacks):
    """(encoder stack, decoder stack) names of an encoder-decoder whose two stacks are exactly one inside its
    encoder and one inside its decoder (T5, BART, Marian, ...); None for any other layout."""
    if len(stacks) != 2 or not is_encoder_decoder(model) or not hasattr(model, "get_decoder"):
        return None
    inside = [_inside(model, accessor, stacks) for accessor in ("get_encoder", "get_decoder")]
    if [len(found) for found in inside] != [1, 1] or inside[0][0][0] == inside[1][0][0]:
        return None
    return inside[0][0][0], inside[1][0][0]


def _multimodal(model):
    """A vision-language model: a generative model whose config has a vision part beside the text one (LLaVA,
    Qwen2-VL, Gemma 3, Idefics3, ...)."""
    config = getattr(model, "config", None)
    generative = hasattr(model, "can_generate") and model.can_generate()  # not CLIP / SigLIP's two towers
    return generative and getattr(config, "vision_config", None) is not None


def block_lists(model):
    """Every stack of blocks: a non-empty ModuleList of one class with linear layers inside, not nested in
    another stack (the experts of an MoE block are part of their block), largest first."""
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0 or len({type(c) for c in module}) != 1:
            continue
        if not any(is_linear(m) for m in module.modules()):
            continue
        if any(name.startswith(outer + ".") for outer, _ in found):
            continue
        found.append((name, module))
    return sorted(found, key=lambda item: -sum(p.numel() for p in item[1].parameters()))


def matches(name, pattern):
    """llm-compressor style matching: `re:REGEX` (re.match on the full name), a glob, or a name suffix."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.endswith("." + pattern)


def select_targets(model, targets=None, ignore=None, blocks=None):
    """Map block index -> names of the linear layers to factorize in that block, in module order.

    By default every linear layer inside the repeated blocks; `targets` narrows that, `ignore` removes from it.
    A target pattern that names a layer outside the blocks is an error, since only block layers are factorized.
    `blocks` names the list of blocks (--blocks) where the model has no single one. Blocks are numbered across
    the stacks when there are several (block_prefixes).
    """
    blocks_name, blocks = find_blocks(model, blocks)
    ignore = list(ignore or [])
    selected, used = {}, set()
    inside = tuple(name + "." for name in stack_names(blocks_name))
    for index, (prefix, block) in enumerate(zip(block_prefixes(model, blocks_name), blocks)):
        for rel, module in block.named_modules():
            if not rel or not is_linear(module) or is_router(rel, module):
                continue
            full = prefix + rel
            if targets:
                hit = [p for p in targets if matches(full, p)]
                if not hit:
                    continue
                used.update(hit)
            if any(matches(full, p) for p in ignore):
                continue
            selected.setdefault(index, []).append(full)
    if targets:
        outside = [
            name
            for name, module in model.named_modules()
            if is_linear(module) and not name.startswith(inside) and any(matches(name, p) for p in targets)
        ]
        if outside:
            raise UsageError(
                f"--targets matches {outside[0]}, which is outside the repeated blocks ({blocks_name}); "
                "only layers inside the blocks can be factorized"
            )
    if not selected:
        what = f"--targets {' '.join(targets)}" if targets else "the default targets"
        raise UsageError(f"no linear layer matches {what} (after --ignore); check the patterns against the module names")
    return blocks_name, blocks, selected


def replace_module(root, name, module):
    """Put `module` where `name` (dotted, relative to `root`) is: the one place that swaps a layer for another."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)
