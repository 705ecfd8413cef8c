"""Fisher importance for FWSVD (Hsu et al., "Language model compression with weighted low-rank factorization").

FWSVD weighs each weight by its Fisher information, the expected squared gradient of the loss, estimated per
data sample: F_ij = (1/S) sum_s (dL_s/dW_ij)^2. The paper writes a layer as y = x W (W is in x out) and collapses
F to one importance per ROW of that W, I_j = sum_i F_ij, i.e. one per input feature; in PyTorch's (out x in)
layout that is a column scale, applied as diag(sqrt(I)) on the input side before the SVD and divided back out
of the `down` factor. (ASVD's FWSVD baseline and GFWSVD's reference code use the same orientation.)

The gradients need a backward pass through everything downstream of a layer, so this runs once over the whole
ORIGINAL model before the layer-major loop, one calibration window per backward pass: its memory is that of
training the model on one window (all layers' activations and the logits) plus one float64 vector per layer.
Per-sample gradients come from each layer's input x_s and output gradient g_s: dL_s/dW = g_s^T x_s, so no
parameter .grad is ever allocated.
"""

from contextlib import contextmanager
from itertools import chain

import torch
import torch.nn.functional as F

from ..errors import UsageError, overflow


def has_lm_head(model):
    import transformers

    causal = transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
    names = {name for value in causal for name in ((value,) if isinstance(value, str) else value)}
    return type(model).__name__ in names and model.get_output_embeddings() is not None


def is_encoder(model):
    """A model without an LM head that does not generate (BERT, RoBERTa, a bare LlamaModel...): `--alloc fisher`
    weighs it by its final hidden states (_sample_losses) instead of next-token cross-entropy."""
    config = getattr(model, "config", None)
    generates = hasattr(model, "can_generate") and model.can_generate()
    return not has_lm_head(model) and not generates and not getattr(config, "is_encoder_decoder", False)


def input_importance(model, input_ids, names, batch_size, device, progress=None):
    """{layer name: I (in_features,), float64}: per-input-feature Fisher importance of each named linear layer."""

    def per_layer(grad, x):
        # per sample s: dL_s/dW = g_s^T x_s (out x in); sum its squares over outputs -> (in,)
        total = 0
        for g_s, x_s in zip(grad.float(), x.float()):
            per_sample = g_s.reshape(-1, g_s.shape[-1]).T @ x_s.reshape(-1, x_s.shape[-1])
            total = total + per_sample.square().sum(0, dtype=torch.float64)
        return total

    return _accumulate_gradients(model, input_ids, names, batch_size, device, per_layer, progress, "fwsvd")


def output_importance(model, input_ids, names, batch_size, device, progress=None):
    """{layer name: D (out_features,), float64}: the diagonal Fisher of each named layer's OUTPUT, the mean
    over samples of sum_t g_st^2 with g = dL_s/dy. A change dy of the outputs raises the loss by about
    1/2 sum_k D_k dy_k^2 (per token, on average): what `--alloc fisher` weighs each dropped component by."""

    def per_layer(grad, x):
        return grad.double().square().reshape(-1, grad.shape[-1]).sum(0)

    return _accumulate_gradients(model, input_ids, names, batch_size, device, per_layer, progress, "--alloc fisher")


def _sample_losses(model, embeds, batch, noise):
    """Each sample's loss, whose gradients (one backward pass over their sum) are the per-sample gradients.

    A causal LM: the mean next-token cross-entropy (the empirical Fisher of its own objective). An encoder has no
    likelihood of its own; its output is the final hidden states h, and what a user keeps from it is h itself.
    Read h as the mean of a unit Gaussian and sample y ~ N(h, I): the gradient of -log p(y) is -(y - h) = -eps,
    so the per-sample loss <h, eps> with eps ~ N(0, I) has gradients whose squares average to the Gauss-Newton
    (Fisher) diagonal of ||h' - h||^2: each layer's output weighted by how much it moves the final hidden
    states, the same role the LM loss plays for a causal LM."""
    if has_lm_head(model):
        logits = model(inputs_embeds=embeds, use_cache=False).logits.float()
        # the sum over samples of each sample's mean token loss: per-sample gradients stay separate
        return F.cross_entropy(logits[:, :-1].transpose(1, 2), batch[:, 1:], reduction="none").mean(1)
    output = model(inputs_embeds=embeds, output_hidden_states=True)
    hidden = getattr(output, "last_hidden_state", None)
    hidden = (hidden if hidden is not None else output.hidden_states[-1]).float()
    eps = torch.randn(hidden.shape, generator=noise).to(hidden.device)
    return (hidden * eps).sum(-1).mean(1)


@contextmanager
def staged(model, device):
    """The whole model on `device` for the duration, then back: a backward pass (or a generation) needs every
    layer at once, while the rest of lowrank keeps the model on the CPU and brings one block at a time. The
    original tensors themselves are put back, so nothing is copied back, the weights are bit for bit what they
    were, and references taken earlier (a state dict) still see the model's own storage."""
    target = torch.device(device)
    moved = []
    with torch.no_grad():
        for tensor in chain(model.parameters(), model.buffers()):  # each tensor once (tied weights too)
            if tensor.device.type != target.type or target.index not in (None, tensor.device.index):
                moved.append((tensor, tensor.data))
                tensor.data = tensor.data.to(target)
    try:
        yield model
    finally:
        with torch.no_grad():
            for tensor, data in moved:
                tensor.data = data


def _accumulate_gradients(model, input_ids, names, batch_size, device, per_layer, progress, who):
    """Backward passes of the per-sample mean token loss over `input_ids`; for each named layer, the sum over
    batches of per_layer(output gradient, input), divided by the number of samples."""
    if not has_lm_head(model) and not (who == "--alloc fisher" and is_encoder(model)):
        option = "--method" if who == "fwsvd" else "--alloc"
        raise UsageError(f"{who} needs a causal language model with its LM head (the loss is next-token "
                         f"cross-entropy) or an encoder; this model is neither, use another {option}")
    totals, handles = {}, []

    def record(name):
        def hook(module, args, output):
            x = args[0].detach()

            def accumulate(grad):
                value = per_layer(grad.detach(), x)
                totals[name] = totals[name] + value if name in totals else value

            if output.requires_grad:
                output.register_hook(accumulate)

        return hook

    for name in names:
        module = model.get_submodule(name)
        handles.append(module.register_forward_hook(record(name)))  # Conv1D: same math, y = x W + b
    noise = torch.Generator().manual_seed(0)  # the encoder loss's probes: seeded, so the ranks are reproducible
    requires = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    embeddings = model.get_input_embeddings()
    try:
        with staged(model, device):  # the batches go to `device`: so does the model
            for batch in input_ids.split(batch_size):
                batch = batch.to(device)
                embeds = embeddings(batch).detach().requires_grad_(True)
                losses = _sample_losses(model, embeds, batch, noise)
                if not bool(torch.isfinite(losses).all()):  # NaN Fisher would sort as anything: a silent allocation
                    raise overflow(f"losses of the {who} pass")
                losses.sum().backward()
                if progress is not None:
                    progress()
    finally:
        for handle in handles:
            handle.remove()
        for param, flag in zip(model.parameters(), requires):
            param.requires_grad_(flag)
    if not all(bool(torch.isfinite(value).all()) for value in totals.values()):
        raise overflow(f"gradients of the {who} pass")
    samples = input_ids.shape[0]
    return {name: value / samples for name, value in totals.items()}

