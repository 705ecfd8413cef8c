"""Mixture-of-experts models: what the ratio can reach is said out loud, and (once targeted) the experts are
factorized per expert, load without lowrank and reproduce the dense model at full rank.

Tiny random configs of the MoE families transformers ships, saved as checkpoint directories."""

import json

import pytest
import torch

from conftest import VOCAB

MOE = {
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=96),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48, intermediate_size=96,
                      decoder_sparse_step=1, head_dim=16),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2, intermediate_size=48),
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48,
                      shared_expert_intermediate_size=96, intermediate_size=96, decoder_sparse_step=1),
}


def build_moe(kind, seed=0):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(kind, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256,
                                  bos_token_id=0, eos_token_id=1, pad_token_id=3, **MOE[kind])
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # random init is isotropic: give every matrix a decaying spectrum, as trained ones have
        for name, param in model.named_parameters():
            if param.dim() >= 2 and "embed" not in name:
                mats = param.view(-1, *param.shape[-2:])
                for mat in mats:
                    u, _, vh = torch.linalg.svd(mat, full_matrices=False)
                    decay = torch.logspace(0, -1.5, u.shape[1])
                    mat.copy_((u * decay * mat.norm() / decay.norm()) @ vh)
    return model.eval()


@pytest.fixture(scope="module", params=sorted(MOE))
def moe_dir(request, tmp_path_factory, tokenizer):
    directory = tmp_path_factory.mktemp(request.param)
    build_moe(request.param).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return request.param, str(directory)


def params_in(directory):
    """Parameters actually written: the element count of every tensor in the checkpoint's weight files."""
    import glob
    import math

    from safetensors import safe_open

    total = 0
    for path in sorted(glob.glob(f"{directory}/model*.safetensors")):
        with safe_open(path, "pt") as f:
            total += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    return total


def test_summary_says_what_the_ratio_reaches(tmp_path, tokenizer, calib_file):
    """A MoE model whose experts stay dense must not read as compressed: the report counts every parameter once,
    as targeted or dense with its reason, the whole-model ratio is the one written, and a warning says so."""
    import lowrank
    from lowrank.compression.coverage import measure_coverage
    from lowrank.compression.targets import select_targets

    model = build_moe("mixtral")
    source = tmp_path / "mixtral"
    model.save_pretrained(source)
    tokenizer.save_pretrained(source)
    blocks_name, _, targets = select_targets(model, ["*self_attn*"])
    coverage = measure_coverage(model, blocks_name, targets)
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    attention = sum(p.numel() for n, p in model.named_parameters() if "self_attn" in n and p.dim() == 2)
    assert coverage.total == sum(p.numel() for p in model.parameters())
    assert coverage.targeted == attention
    assert coverage.dense["experts"] == experts and experts > 0.5 * coverage.total
    assert coverage.targeted + sum(coverage.dense.values()) == coverage.total
    warning = coverage.warning(0.5)
    assert "expert tensors" in warning and f"{attention / coverage.total:.1%}" in warning

    report = lowrank.compress(str(source), str(tmp_path / "out"), ratio=0.5, alloc="uniform", verify=False,
                              calib=calib_file, targets=["*self_attn*"], num_samples=8, seq_len=64, batch_size=4)
    kinds = {part["kind"]: part for part in report["coverage"]["not_targeted"]}
    assert kinds["experts"]["params"] == experts
    assert report["coverage_warning"] and "expert tensors" in report["coverage_warning"]
    model_ratio = report["ratio"]["model"]
    assert model_ratio["params_after"] == params_in(tmp_path / "out")
    assert model_ratio["kept"] > 0.9  # the truth: the experts are kept whole
    rows = dict(lowrank.report.compression.compression_rows(report))
    assert "warning" in rows and "targeted share" in rows
