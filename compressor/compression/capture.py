"""The first step of the block walk: the calibration batches up to the first block, and every block's other
arguments (attention masks, rotary tables, a decoder's cross-attention memory), which the walk replays when it
runs a block on its own."""

import torch

from ..errors import UsageError
from .targets import is_encoder_decoder


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


class BlockArguments:
    """One block's arguments besides its hidden states, for each batch of the walk.

    They are recorded once per batch size (masks and rotary tables depend on the shape only), except the one
    that depends on the batch's content: a decoder block's cross-attention memory, the encoder's output. That is
    kept per batch in `memory` and put back where the recorded arguments had it (MEMORY marks the place)."""

    MEMORY = object()

    def __init__(self, memory=None):
        self.by_size, self.memory = {}, memory

    def record(self, batch_size, args, kwargs, memory=None):
        """Keep the arguments of the first batch of this size; `memory`: this batch's encoder output, to mark."""
        if batch_size in self.by_size:
            return

        def mark(value):
            return self.MEMORY if memory is not None and value is memory else value
        self.by_size[batch_size] = (tuple(mark(a) for a in args), {k: mark(v) for k, v in kwargs.items()})

    def of(self, index, batch_size, device, rows=None):
        """(args, kwargs) for batch `index` of the stream, of `batch_size` windows, run on `device`; `rows`: a
        slice of the batch's windows (refinement's micro-batches), `batch_size` windows long."""
        args, kwargs = self.by_size[batch_size]
        if self.memory is None:
            return args, kwargs
        memory = self.memory[index]
        memory = (memory if rows is None else memory[rows]).to(device)
        return (tuple(memory if a is self.MEMORY else a for a in args),
                {k: memory if v is self.MEMORY else v for k, v in kwargs.items()})

    def reads_memory(self):
        return any(a is self.MEMORY for args, kwargs in self.by_size.values() for a in (*args, *kwargs.values()))


def model_inputs(model, input_ids):
    """The forward arguments a calibration batch feeds `model`: the token windows and, for an encoder-decoder,
    the same windows as teacher-forced decoder input, shifted right behind the decoder start token by the model's
    own rule (prepare_decoder_input_ids_from_labels: T5's _shift_right, BART's shift_tokens_right). The decoder
    then reads text of the kind it writes, while cross-attending to the encoder's reading of the same text, as in
    the denoising pre-training of T5 and BART with the noise left out. A speech model's batch
    (calibration.audio.AudioWindows) carries its own features and decoder input."""
    if hasattr(input_ids, "inputs"):
        return {**input_ids.inputs(model.dtype), "use_cache": False}
    inputs = {"input_ids": input_ids, "use_cache": False}
    if is_encoder_decoder(model):
        prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
        if prepare is None:
            raise UsageError(f"{type(model).__name__} does not say how to make decoder input from text "
                             "(prepare_decoder_input_ids_from_labels); compress its encoder alone with --blocks PATH")
        inputs["decoder_input_ids"] = prepare(labels=input_ids)
    return inputs


def capture_block_inputs(model, blocks, input_ids, batch_size, device, batches=None, new_states=list,
                         run_blocks=False, also_sizes=()):
    """Run every calibration batch up to the first block. Returns the hidden states per batch and, per block,
    its other arguments (BlockArguments: mask, position embeddings, a decoder's cross-attention memory, ...).

    Calibration windows are full-length and unpadded, so those arguments depend only on the batch shape and the
    block, but for an encoder-decoder's decoder the encoder's output, kept per batch. The first batch of each
    shape runs on through every block, so that a model whose blocks differ (sliding and full attention in Gemma
    2/3, ModernBERT: other masks, other rotary tables; T5: the position bias the first block computes for the
    others) gets each block's own. With `run_blocks` (blocks in memory) they run for real; otherwise (streamed
    blocks may be empty) each block's forward is replaced by a stub that returns its input unchanged. The other
    batches stop at the first block. Should the stubbed pass fail (a model that inspects what a block returns),
    every block gets the first block's arguments, which check_uniform_attention accepts only when the blocks do
    not declare different attention types.

    `also_sizes`: batch sizes the walk will run besides the calibration batches' own (refinement's micro-batches).
    For each, the first windows run as one more batch whose arguments are recorded and whose states are not kept:
    the model itself says what a batch of that size gets, nothing is sliced by guessing which dimension is the
    batch's.
    """
    states = new_states()
    memory = _EncoderOutput(model, blocks, new_states)
    extras = [BlockArguments(memory.batches) for _ in blocks]
    last = len(blocks) - 1
    recording = {"all": False, "key": None, "keep": True}

    def catcher(index):
        def catch(module, args, kwargs):
            hidden = args[0] if args else kwargs.get("hidden_states")
            if index == 0:  # the later blocks' `hidden` is whatever the stubs handed on: its shape is no key
                if recording["keep"]:
                    states.append(hidden.detach().to("cpu"))
                    memory.keep()
                recording["key"] = hidden.shape[0]
                recording["all"] = hidden.shape[0] not in extras[0].by_size
            if index == 0 or recording["all"]:
                rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                extras[index].record(recording["key"], args[1:], rest, memory.current)
            if index == last or not recording["all"]:
                raise _StopForward
            if run_blocks:
                module.to(device)
        return catch

    stubs = None if run_blocks else _stub_forwards(blocks)
    handles = [block.register_forward_pre_hook(catcher(i), with_kwargs=True) for i, block in enumerate(blocks)]
    if run_blocks:  # each block back where the walk keeps it, off the device, once it has run
        handles += [block.register_forward_hook(_to_cpu) for block in blocks]
    failed, reached, ran = None, 0, 0
    try:
        with torch.no_grad(), memory:
            chunks = input_ids.split(batch_size)
            chunks = chunks if batches is None else [chunks[i] for i in batches]
            probes = [input_ids.split(size)[0] for size in sorted(set(also_sizes) - {c.shape[0] for c in chunks})
                      if 0 < size <= input_ids.shape[0]]
            for batch in [*chunks, *probes]:
                ran += 1
                recording["keep"] = ran <= len(chunks)
                try:
                    model(**model_inputs(model, batch.to(device)))
                except _StopForward:
                    reached += 1
                except Exception as error:  # the stubbed blocks upset the model: fall back to the first's
                    if not recording["all"] or run_blocks:
                        raise
                    failed = error
                    recording["all"] = False
    finally:
        for handle in handles:
            handle.remove()
        if stubs is not None:
            _restore_forwards(blocks, stubs)
    if ran and not reached and failed is None:  # the forward ended without running them: text never reaches them
        raise UsageError("these blocks never run on text (e.g. a vision tower): lowrank calibrates with text only, "
                         "so it cannot compress them; compress the language model's blocks (the default)")
    memory.check(extras[0])
    if failed is not None or any(set(extra.by_size) != set(extras[0].by_size) for extra in extras):
        check_uniform_attention(blocks)
        extras = [extras[0] for _ in blocks]
    return states, extras


def _to_cpu(module, args, output):
    module.to("cpu")


class _EncoderOutput:
    """While the capture runs, the encoder's output of each batch (an encoder-decoder whose captured blocks lie
    outside its encoder: the decoder's cross-attention memory). A hook on the encoder notes each batch's output;
    the first block's hook keeps it. Nothing for any other model, or for the encoder's own blocks."""

    def __init__(self, model, blocks, new_states):
        encoder = model.get_encoder() if is_encoder_decoder(model) else None
        inside = encoder is not None and any(block is module for module in encoder.modules() for block in blocks[:1])
        self.encoder = None if encoder is None or inside else encoder
        self.batches = new_states() if self.encoder is not None else None
        self.current, self.handle = None, None

    def __enter__(self):
        if self.encoder is not None:
            self.handle = self.encoder.register_forward_hook(self._note)
        return self

    def __exit__(self, *exc):
        if self.handle is not None:
            self.handle.remove()

    def _note(self, module, args, output):
        self.current = output[0]  # BaseModelOutput or tuple: last_hidden_state first; returns None (no change)

    def keep(self):
        if self.batches is not None:
            self.batches.append(self.current.detach().to("cpu"))

    def check(self, arguments):
        """The decoder must have been handed the encoder's output itself: otherwise (a projection between them)
        the recorded arguments would replay one batch's memory for every batch."""
        if self.batches is not None and len(self.batches) and not arguments.reads_memory():
            raise UsageError("the decoder's blocks do not take the encoder's output as it is, so lowrank cannot "
                             "calibrate them batch by batch; compress the encoder alone with --blocks PATH")


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
