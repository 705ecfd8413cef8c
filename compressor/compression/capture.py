"""The first step of the block walk: the calibration batches up to the first block, and every block's other
arguments (attention masks, rotary tables), which the walk replays when it runs a block on its own."""

import torch

from ..errors import UsageError


class _StopForward(Exception):
    pass


def check_uniform_attention(blocks):
    """Refuse a model whose blocks take different attention arguments when they could not be captured per block
    (see capture_block_inputs): replaying one block's mask for all would calibrate some blocks on the wrong one."""
    kinds = {getattr(block, "attention_type", getattr(block, "layer_type", None)) for block in blocks}
    if len(kinds) > 1:
        raise UsageError(
            f"this model mixes attention layer types {sorted(map(str, kinds))} and its per-layer attention "
            "arguments could not be captured; it is not supported"
        )


def capture_block_inputs(model, blocks, input_ids, batch_size, device, batches=None, new_states=list):
    """Run every calibration batch up to the first block. Returns the hidden states per batch and, per block,
    its other arguments (mask, position embeddings, ...) per batch size.

    Calibration windows are full-length and unpadded, so those arguments depend only on the batch shape and the
    block: the first batch of each shape runs on through every block, each block's forward replaced by a stub
    that records its arguments and returns its input unchanged (no weights are touched: streamed blocks may be
    empty), so that a model whose blocks differ (sliding and full attention in Gemma 2/3, ModernBERT: other
    masks, other rotary tables) gets each block's own. The others stop at the first block. Should the stubbed
    pass fail (a model that inspects what a block returns), every block gets the first block's arguments, which
    check_uniform_attention accepts only when the blocks do not declare different attention types.
    """
    states, extras = new_states(), [{} for _ in blocks]
    last = len(blocks) - 1
    recording = {"all": False, "key": None}

    def catcher(index):
        def catch(module, args, kwargs):
            hidden = args[0] if args else kwargs.get("hidden_states")
            if index == 0:  # the later blocks' `hidden` is whatever the stubs handed on: its shape is no key
                states.append(hidden.detach().to("cpu"))
                recording["key"] = hidden.shape[0]
                recording["all"] = hidden.shape[0] not in extras[0]
            if index == 0 or recording["all"]:
                rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                extras[index].setdefault(recording["key"], (args[1:], rest))
            if index == last or not recording["all"]:
                raise _StopForward
        return catch

    stubs = _stub_forwards(blocks)
    handles = [block.register_forward_pre_hook(catcher(i), with_kwargs=True) for i, block in enumerate(blocks)]
    failed, reached, ran = None, 0, 0
    try:
        with torch.no_grad():
            chunks = input_ids.split(batch_size)
            for batch in chunks if batches is None else [chunks[i] for i in batches]:
                ran += 1
                try:
                    model(input_ids=batch.to(device), use_cache=False)
                except _StopForward:
                    reached += 1
                except Exception as error:  # the stubbed blocks upset the model: fall back to the first's
                    if not recording["all"]:
                        raise
                    failed = error
                    recording["all"] = False
    finally:
        for handle in handles:
            handle.remove()
        _restore_forwards(blocks, stubs)
    if ran and not reached and failed is None:  # the forward ended without running them: text never reaches them
        raise UsageError("these blocks never run on text (e.g. a vision tower): lowrank calibrates with text only, "
                         "so it cannot compress them; compress the language model's blocks (the default)")
    if failed is not None or any(set(extra) != set(extras[0]) for extra in extras):
        check_uniform_attention(blocks)
        extras = [extras[0] for _ in blocks]
    return states, extras


def _stub_forwards(blocks):
    """Replace each block's forward by one that returns its input: the capture pass only needs the arguments."""
    saved = []
    for block in blocks:
        saved.append(block.__dict__.get("forward"))
        block.forward = lambda *args, **kwargs: args[0] if args else kwargs["hidden_states"]
    return saved


def _restore_forwards(blocks, saved):
    for block, forward in zip(blocks, saved):
        if forward is None:
            del block.forward
        else:
            block.forward = forward
