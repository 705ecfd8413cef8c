"""In-tuning squeeze: `squeeze_peft_model` re-factorizes a live PEFT model in place, and `SqueezeCallback` anneals
the rank during Trainer training while the optimizer keeps working."""

import math

import pytest
import torch
from conftest import build_model

import lowrank
from lowrank.squeezing.callback import geometric_schedule

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402

TOKENS = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))


def peft_model(rank=8, seed=0, **kwargs):
    model = get_peft_model(build_model("llama"), LoraConfig(r=rank, lora_alpha=2 * rank, **kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.2)
    return model


def layers(model):
    return {name: module for name, module in model.named_modules()
            if isinstance(module, LoraLayer) and "default" in module.r}


def logits(model):
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def test_in_place_squeeze_equals_the_truncation_and_saves_consistently(tmp_path):
    model = peft_model(target_modules="all-linear", use_rslora=True)
    params_before = {id(p) for p in model.parameters()}
    # reference: every update replaced by its dense rank-3 truncation, at the old rank and scale
    reference = peft_model(target_modules="all-linear", use_rslora=True)
    with torch.no_grad():
        for layer in layers(reference).values():
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            u, s, vh = torch.linalg.svd(b.double() @ a.double(), full_matrices=False)
            b.copy_(torch.cat([u[:, :3] * s[:3], torch.zeros(b.shape[0], b.shape[1] - 3, dtype=u.dtype)], 1))
            a.copy_(torch.cat([vh[:3], torch.zeros(a.shape[0] - 3, a.shape[1], dtype=vh.dtype)], 0))
    scales = {name: layer.scaling["default"] for name, layer in layers(model).items()}
    changed = lowrank.squeeze_peft_model(model, 3)
    assert len(changed) == len(scales) and set(changed.values()) == {(8, 3)}
    assert {id(p) for p in model.parameters()} == params_before  # the same Parameter objects
    for name, layer in layers(model).items():
        assert layer.r["default"] == 3 and layer.lora_A["default"].weight.shape[0] == 3
        assert layer.lora_A["default"].out_features == 3 and layer.lora_B["default"].in_features == 3
        assert layer.scaling["default"] == pytest.approx(scales[name], rel=1e-11)  # rsLoRA scale kept
    assert torch.allclose(logits(model), logits(reference), atol=1e-5)
    config = model.peft_config["default"]
    assert config.r == 3 and config.lora_alpha == pytest.approx(16 / math.sqrt(8) * math.sqrt(3), rel=1e-11)
    model.save_pretrained(str(tmp_path / "saved"))
    loaded = PeftModel.from_pretrained(build_model("llama"), str(tmp_path / "saved"))
    assert torch.allclose(logits(loaded), logits(model), atol=1e-6)
    assert lowrank.squeeze_peft_model(model, 5) == {}  # never grows a rank


def test_optimizer_moments_follow_the_new_factors():
    """On an update of true rank 3, squeezing rank 8 -> 3 loses nothing, so the gradient at the new factors is
    exactly the old gradient mapped the way the optimizer's first moment is mapped."""
    model = peft_model(target_modules=["q_proj", "down_proj"])
    with torch.no_grad():
        for layer in layers(model).values():
            b = layer.lora_B["default"].weight
            b[:, 3:] = b[:, :3] @ torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    params = [p for n, p in model.named_parameters() if "lora_" in n]

    def gradients():
        model.zero_grad()
        model(input_ids=TOKENS, labels=TOKENS).loss.backward()
        return [p.grad.detach().clone() for p in params]

    optimizer = torch.optim.SGD(params, lr=0.0, momentum=0.9)  # after a step, momentum_buffer = the gradient
    old = gradients()
    optimizer.step()
    out_before = logits(model)
    loss = model(input_ids=TOKENS, labels=TOKENS).loss  # a custom loop's last loss, its graph still referenced
    loss.backward()
    lowrank.squeeze_peft_model(model, 3, optimizer=optimizer)
    assert torch.allclose(logits(model), out_before, atol=1e-5)
    new = gradients()
    for param, grad in zip(params, new):
        mapped = optimizer.state[param]["momentum_buffer"]
        assert mapped.shape == param.shape == grad.shape
        assert torch.allclose(mapped, grad, atol=1e-5 * grad.abs().max()), "first moment != new gradient"
    assert any(g.shape != o.shape for g, o in zip(new, old))
    del loss


def test_schedule():
    assert geometric_schedule(64, 8, 0, 30) == {10: 32, 20: 16, 30: 8}
    assert geometric_schedule(16, 4, 10, 14, stages=4) == {11: 11, 12: 8, 13: 6, 14: 4}


def test_callback_anneals_the_rank_during_training(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = peft_model(target_modules="all-linear")
    g = torch.Generator().manual_seed(3)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 320, (32, 16), generator=g)]
    callback = lowrank.SqueezeCallback(target_rank=2)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=8, per_device_train_batch_size=4,
                             learning_rate=1e-3, logging_steps=1, report_to=[], save_strategy="no",
                             use_cpu=True, disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    assert callback.history == [(2, 4), (4, 2)]  # 8 -> 4 -> 2 by half of max_steps, then training at rank 2
    assert trainer.state.global_step == 8
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 8 and all(math.isfinite(loss) for loss in losses)
    for layer in layers(model).values():
        assert layer.r["default"] == 2 and layer.lora_B["default"].weight.shape[1] == 2
    for param in (p for n, p in model.named_parameters() if "lora_" in n):
        state = trainer.optimizer.state[param]
        assert state["exp_avg"].shape == state["exp_avg_sq"].shape == param.shape
        assert (state["exp_avg_sq"] >= 0).all()
    model.save_pretrained(str(tmp_path / "adapter"))
    loaded = PeftModel.from_pretrained(build_model("llama"), str(tmp_path / "adapter"))
    assert torch.allclose(logits(loaded), logits(model.eval()), atol=1e-5)
