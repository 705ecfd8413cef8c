"""In-tuning squeeze (LoRA-Squeeze's In-Squeeze): lower a PEFT LoRA model's rank during training, in place.

`squeeze_peft_model(model, rank, optimizer=...)` re-factorizes every LoRA layer to the exact rank-k truncation of
its update (factor-space SVD, balanced factors, the layer's scale kept) by swapping new contents into the SAME
Parameter objects, so the optimizer keeps tracking them. The new factors are linear maps of the old ones,
B' = B W and A' = L A, and the optimizer state follows the gradients: with the update s'B'A', the gradients become
g_A' = (s'/s) W^T g_A and g_B' = (s'/s) g_B L^T, so first moments (Adam's exp_avg, SGD momentum) are mapped
exactly like that (exact for gradients that are linear in the moments, i.e. always for the current gradient), and
second moments (exp_avg_sq) with the squared coefficients (exact for uncorrelated coordinates; never negative).
State of any other shape is dropped and re-initialised by the optimizer on its next step.

`SqueezeCallback` is a transformers.TrainerCallback that applies it on a schedule: from `start_rank` (the model's
rank) to `target_rank` in `stages` steps spread evenly over [start_step, end_step] (default end_step: half of
max_steps, so that the second half trains at the final rank), halving the rank each stage by default; or an
explicit {step: rank} `schedule`. The adapter's peft_config (r, lora_alpha, rank_pattern, alpha_pattern) is
updated too, so save_pretrained writes a consistent adapter.
"""

import math
from typing import Any

from transformers import TrainerCallback

PEFT_PREFIX = "base_model.model."


def _lora_layers(model, adapter):
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.r:
            yield name.removeprefix(PEFT_PREFIX), module


def _adapter(model, name):
    """The adapter to squeeze: the one named, else the model's active one (PeftModel: an attribute; transformers'
    PEFT integration: a method)."""
    adapter = name or getattr(model, "active_adapter", None) or "default"
    if callable(adapter):
        adapter = adapter()
    return adapter[0] if isinstance(adapter, (list, tuple)) else adapter


def _pair(module, adapter):
    """(A parameter, B module-or-None, B parameter, kind) of a LoRA layer."""
    if adapter in module.lora_A:
        return module.lora_A[adapter].weight, module.lora_B[adapter], module.lora_B[adapter].weight, "module"
    return module.lora_embedding_A[adapter], None, module.lora_embedding_B[adapter], "embedding"


def _map_state(optimizer, param, first, second):
    """Move the optimizer state of `param` to the new parametrization: first(x) maps first moments, second(x)
    maps second moments; state of another shape is dropped (the optimizer re-initialises it)."""
    state = optimizer.state.get(param) if optimizer is not None else None
    if not state:
        return
    import torch

    old_shape = None
    for key, value in list(state.items()):
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            continue
        if old_shape is None:
            old_shape = value.shape
        if value.shape != old_shape:
            optimizer.state.pop(param)
            return
        mapped = second(value) if "sq" in key else first(value)
        state[key] = mapped.to(value.dtype).contiguous()


def _replace(param, value):
    """Give `param` new contents of another shape, keeping the Python object (so the optimizer, which keys its
    state by it, keeps tracking it). swap_tensors also gives it fresh autograd metadata: assigning .data would keep
    the old gradient accumulator, which a still-referenced graph (a `loss` variable of the last step) keeps alive,
    and the next backward would then fail on the old shape."""
    import torch

    new = torch.nn.Parameter(value.to(param.dtype).contiguous(), requires_grad=param.requires_grad)
    if hasattr(torch.utils, "swap_tensors"):  # torch >= 2.3
        torch.utils.swap_tensors(param, new)
    else:  # pragma: no cover
        param.data = new.data


def _set_rank(module, adapter, kind, b_module, k):
    if kind == "embedding":
        return
    a_module = module.lora_A[adapter]
    for layer, attribute in ((a_module, "out_features"), (a_module, "out_channels"), (b_module, "in_features"),
                             (b_module, "in_channels")):
        if hasattr(layer, attribute):
            setattr(layer, attribute, k)


def squeeze_peft_model(model: Any, rank: int, *, optimizer: Any = None, adapter_name: str | None = None,
                       alpha_policy: str = "keep-scale") -> dict[str, tuple[int, int]]:
    """Squeeze every LoRA layer of a PEFT model in place to `rank` (layers at or below it are left alone).
    alpha_policy: keep-scale (default: each layer keeps its scale, alpha' = scale·k or scale·sqrt(k) with rsLoRA)
    or unit (scale 1). Returns {module name: (rank before, rank after)} for the layers it changed."""
    import torch

    from ..core.factor_svd import F64, FactorSVD
    from ..errors import UsageError
    from .formats import clean_number, peft_patterns

    if alpha_policy not in ("keep-scale", "unit"):
        raise UsageError(f"alpha_policy must be keep-scale or unit, got {alpha_policy!r}")
    adapter = _adapter(model, adapter_name)
    changed, layers = {}, list(_lora_layers(model, adapter))
    if not layers:
        raise UsageError(f"the model has no LoRA layer for adapter {adapter!r}")
    with torch.no_grad():
        for name, module in layers:
            r = module.r[adapter]
            if rank >= r:
                continue
            a_param, b_module, b_param, kind = _pair(module, adapter)
            rslora = bool(module.use_rslora.get(adapter, False))
            scale = module.scaling[adapter]
            if alpha_policy == "unit":
                alpha, rslora = rank, False
            else:
                alpha = clean_number(scale * (math.sqrt(rank) if rslora else rank))
            scale_out = alpha / math.sqrt(rank) if rslora else alpha / rank
            a_shape, b_shape = a_param.shape, b_param.shape
            b = b_param.detach().reshape(b_shape[0], r).to(F64)
            a = a_param.detach().reshape(r, -1).to(F64)
            up, down, w, lmap = FactorSVD.of(b, a, scale).maps(b, a, rank, scale_out)
            _replace(a_param, down.reshape(rank, *a_shape[1:]))
            _replace(b_param, up.reshape(b_shape[0], rank, *b_shape[2:]))
            ratio = scale_out / scale
            _map_state(optimizer, a_param,
                       lambda g: ratio * (w.T @ g.to(F64).reshape(r, -1)).reshape(rank, *a_shape[1:]),
                       lambda v: ratio**2 * ((w.T**2) @ v.to(F64).reshape(r, -1)).reshape(rank, *a_shape[1:]))
            _map_state(optimizer, b_param,
                       lambda g: ratio * (g.to(F64).reshape(b_shape[0], r) @ lmap.T).reshape(b_param.shape),
                       lambda v: ratio**2 * (v.to(F64).reshape(b_shape[0], r) @ (lmap.T**2)).reshape(b_param.shape))
            bias = getattr(b_module, "bias", None)
            if bias is not None:  # PEFT scales lora_B's bias with the layer: keep scale·bias
                bias.data = (bias.data.to(F64) / ratio).to(bias.dtype)
            for param in (a_param, b_param):
                param.grad = None
            _set_rank(module, adapter, kind, b_module, rank)
            module.r[adapter], module.lora_alpha[adapter], module.scaling[adapter] = rank, alpha, scale_out
            module.use_rslora[adapter] = rslora
            changed[name] = (r, rank)
    config = model.peft_config[adapter] if hasattr(model, "peft_config") else None
    if config is not None and changed:
        names = [name for name, _ in layers]
        ranks = [module.r[adapter] for _, module in layers]
        alphas = [module.lora_alpha[adapter] for _, module in layers]
        config.r, config.lora_alpha, config.rank_pattern, config.alpha_pattern = peft_patterns(names, ranks, alphas)
        if alpha_policy == "unit":
            config.use_rslora = False
    return changed


def geometric_schedule(start_rank, target_rank, start_step, end_step, stages=None):
    """{step: rank}: `stages` (default: one per halving) ranks from start_rank down to target_rank, geometrically
    spaced, at steps spread evenly after start_step up to end_step."""
    if stages is None:
        stages = max(1, round(math.log2(start_rank / target_rank)))
    plan = {}
    for i in range(1, stages + 1):
        step = start_step + math.ceil(i * (end_step - start_step) / stages)
        rank = max(target_rank, round(start_rank * (target_rank / start_rank) ** (i / stages)))
        plan[step] = min(rank, plan.get(step, rank))
    return plan


class SqueezeCallback(TrainerCallback):
    """Anneal a PEFT LoRA model's rank during Trainer training (In-Squeeze). `history` lists (step, rank)."""

    def __init__(self, target_rank: int, *, start_rank: int | None = None, start_step: int = 0,
                 end_step: int | None = None, stages: int | None = None, schedule: dict[int, int] | None = None,
                 adapter_name: str | None = None, alpha_policy: str = "keep-scale") -> None:
        from ..errors import UsageError

        if target_rank < 1:
            raise UsageError(f"target_rank must be at least 1, got {target_rank}")
        self.target_rank, self.start_rank = target_rank, start_rank
        self.start_step, self.end_step = start_step, end_step
        self.stages, self.adapter_name, self.alpha_policy = stages, adapter_name, alpha_policy
        self.schedule = dict(schedule) if schedule else None
        self.plan: list[tuple[int, int]] = []  # (step, rank) still to apply
        self.history: list[tuple[int, int]] = []  # (step, rank) applied

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.schedule:
            plan = self.schedule
        else:
            adapter = _adapter(model, self.adapter_name)
            start_rank = self.start_rank or max(m.r[adapter] for _, m in _lora_layers(model, adapter))
            end_step = self.end_step if self.end_step is not None else max(state.max_steps // 2, self.start_step + 1)
            plan = geometric_schedule(start_rank, self.target_rank, self.start_step, end_step, self.stages)
        self.plan = sorted(plan.items())

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        while self.plan and state.global_step >= self.plan[0][0]:
            _, rank = self.plan.pop(0)
            squeeze_peft_model(model, rank, optimizer=optimizer, adapter_name=self.adapter_name,
                               alpha_policy=self.alpha_policy)
            self.history.append((state.global_step, rank))
