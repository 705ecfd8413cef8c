"""lowrank.serve.support: which checkpoints the vLLM plugin serves, decided from config.json without vLLM (these
run in the main suite; tests/serving/ runs the plugin itself where vLLM is installed)."""

import subprocess
import sys

import pytest

from lowrank.serve.support import UnservableCheckpoint, check_no_lora, check_servable, layer_ranks


def config(base="llama", ranks=None):
    return {"model_type": f"lowrank_{base}", "architectures": [f"LowRank{base.capitalize()}ForCausalLM"],
            "lowrank": {"base_model_type": base, "base_architectures": [{"llama": "LlamaForCausalLM", "qwen2":
                        "Qwen2ForCausalLM", "gpt2": "GPT2LMHeadModel"}[base]], "ranks": ranks or {}}}


def test_llama_family_with_block_projections_is_servable():
    ranks = {"model.layers.0.self_attn.q_proj": 4, "model.layers.0.mlp.down_proj": 9,
             "model.layers.1.self_attn.k_proj": 2}
    assert check_servable(config("llama", ranks)) == "llama"
    assert check_servable(config("qwen2", ranks)) == "qwen2"
    assert layer_ranks(config("llama", ranks), 0) == {"q_proj": 4, "down_proj": 9}
    assert layer_ranks(config("llama", ranks), 1) == {"k_proj": 2}


def test_other_family_is_refused_by_name():
    with pytest.raises(UnservableCheckpoint, match=r"cannot serve a gpt2 checkpoint \(it serves llama, mistral"):
        check_servable(config("gpt2", {"transformer.h.0.attn.c_attn": 8}))


def test_factorized_head_or_embedding_is_refused_by_name():
    ranks = {"model.layers.0.self_attn.q_proj": 4, "lm_head": 16}
    with pytest.raises(UnservableCheckpoint, match="cannot serve factorized lm_head: it factorizes only"):
        check_servable(config("llama", ranks))


def test_damaged_rank_is_refused():
    with pytest.raises(UnservableCheckpoint, match="rank 0, not a positive integer"):
        check_servable(config("llama", {"model.layers.0.self_attn.q_proj": 0}))


def test_lora_is_refused_only_on_factorized_checkpoints():
    check_no_lora(config("llama"), lora_enabled=True)  # all dense: vLLM's own LoRA layers apply
    check_no_lora(config("llama", {"model.layers.0.mlp.up_proj": 3}), lora_enabled=False)
    with pytest.raises(UnservableCheckpoint, match="--merge"):
        check_no_lora(config("llama", {"model.layers.0.mlp.up_proj": 3}), lora_enabled=True)


def test_import_lowrank_serve_loads_neither_vllm_nor_torch():
    code = ("import sys, lowrank, lowrank.serve, lowrank.serve.support;"
            "print(','.join(m for m in ('vllm', 'torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""
