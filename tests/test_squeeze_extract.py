"""Dense-delta extraction: `lowrank squeeze --base-model B --finetuned F` writes a PEFT adapter that turns B into F."""

import json
import os

import pytest
import torch
from conftest import build_model, save_model, tree_digest

import lowrank
from lowrank.errors import UsageError

peft = pytest.importorskip("peft")
from peft import PeftModel  # noqa: E402

TOKENS = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))


def finetune(kind, directory, tokenizer, plant):
    """The tiny model of `kind` with low-rank changes planted in some weights, saved as a checkpoint."""
    model = build_model(kind)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, rank in plant.items():
            param = dict(model.named_parameters())[name]
            if param.dim() == 2:
                param.add_(0.05 * torch.randn(param.shape[0], rank, generator=g) @ torch.randn(rank, param.shape[1],
                                                                                                 generator=g))
            else:
                param.add_(0.05 * torch.randn(param.shape, generator=g))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model


def logits(model):
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


LLAMA_PLANT = {"model.layers.0.self_attn.q_proj.weight": 3, "model.layers.1.mlp.down_proj.weight": 2,
               "model.layers.2.self_attn.o_proj.weight": 1, "model.norm.weight": 0}


def test_extracted_lora_reproduces_the_finetune(tmp_path, llama_dir, tokenizer):
    finetuned = finetune("llama", str(tmp_path / "ft"), tokenizer, LLAMA_PLANT)
    before = tree_digest(llama_dir), tree_digest(str(tmp_path / "ft"))
    out = str(tmp_path / "lora")
    report = lowrank.squeeze(base_model=llama_dir, finetuned=str(tmp_path / "ft"), output=out, rank=3)
    assert (tree_digest(llama_dir), tree_digest(str(tmp_path / "ft"))) == before
    assert report["algorithm"]["name"] == "rsvd" and report["mode"] == "extract"
    ranks = {layer["name"]: layer["rank"] for layer in report["layers"]["list"]}
    assert set(ranks) == {"model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj",
                          "model.layers.2.self_attn.o_proj"}  # unchanged layers are left out
    assert all(layer["energy_kept"] > 0.999999 for layer in report["layers"]["list"])
    config = json.load(open(os.path.join(out, "adapter_config.json")))
    assert config["modules_to_save"] == ["model.norm"] and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == config["lora_alpha"] == 3 and config["base_model_name_or_path"] == llama_dir
    loaded = PeftModel.from_pretrained(build_model("llama"), out).eval()
    expected = logits(finetuned.eval())
    assert (logits(loaded) - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert (logits(build_model("llama")) - expected).abs().max() > 1e-2  # the fine-tune did change the model


def test_energy_rule_exact_algorithm_and_conv1d_biases(tmp_path, gpt2_dir, tokenizer):
    plant = {"transformer.h.0.attn.c_attn.weight": 2, "transformer.h.1.mlp.c_fc.weight": 4,
             "transformer.h.1.mlp.c_fc.bias": 0, "transformer.h.0.attn.c_proj.bias": 0}
    finetuned = finetune("gpt2", str(tmp_path / "ft"), tokenizer, plant)
    out = str(tmp_path / "lora")
    report = lowrank.squeeze(base_model=gpt2_dir, finetuned=str(tmp_path / "ft"), output=out, energy=0.9999,
                             max_rank=8, algorithm="exact")
    ranks = {layer["name"]: layer["rank"] for layer in report["layers"]["list"]}
    assert ranks == {"transformer.h.0.attn.c_attn": 2, "transformer.h.1.mlp.c_fc": 4}
    config = json.load(open(os.path.join(out, "adapter_config.json")))
    assert config["fan_in_fan_out"] and config["lora_bias"]  # GPT-2 Conv1D; a changed bias is lora_B.bias
    assert config["modules_to_save"] == ["transformer.h.0.attn.c_proj"]  # only its bias changed: saved whole
    assert config["rank_pattern"] and config["alpha_pattern"] == config["rank_pattern"]  # scale 1 everywhere
    loaded = PeftModel.from_pretrained(build_model("gpt2"), out).eval()
    expected = logits(finetuned.eval())
    assert (logits(loaded) - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_extraction_analysis_and_errors(tmp_path, llama_dir, tokenizer):
    finetune("llama", str(tmp_path / "ft"), tokenizer, LLAMA_PLANT)
    plan = lowrank.squeeze(base_model=llama_dir, finetuned=str(tmp_path / "ft"), analyze=True, rank=2)
    assert plan["output"] is None and plan["totals"]["rank"]["max"] == 2
    assert os.listdir(tmp_path) == ["ft"]
    with pytest.raises(UsageError, match="needs --rank K or --max-rank"):
        lowrank.squeeze(base_model=llama_dir, finetuned=str(tmp_path / "ft"), energy=0.9)
    with pytest.raises(UsageError, match="no source scale"):
        lowrank.squeeze(base_model=llama_dir, finetuned=str(tmp_path / "ft"), rank=2, alpha_policy="keep-scale")
    with pytest.raises(UsageError, match="nothing to extract"):
        lowrank.squeeze(base_model=llama_dir, finetuned=llama_dir, output=str(tmp_path / "x"), rank=2)
    assert not os.path.exists(tmp_path / "x")
    save_model("gpt2", str(tmp_path / "other"), tokenizer)
    with pytest.raises(UsageError, match="share no linear layer"):
        lowrank.squeeze(base_model=str(tmp_path / "other"), finetuned=str(tmp_path / "ft"), output=str(tmp_path / "y"),
                        rank=2)
