"""EoRA compensation: a PEFT adapter (or merged factors) that repairs a compressed model."""

import json
import os

import pytest
import torch
from conftest import COMPRESS_FAST, build_model, tree_digest

import lowrank
from lowrank.cli import main

peft = pytest.importorskip("peft")
CAL = {"num_samples": 8, "seq_len": 64, "batch_size": 4}


def ids(samples=2, length=32, seed=3):
    return torch.randint(5, 320, (samples, length), generator=torch.Generator().manual_seed(seed))


def magnitude_pruned(directory, out, tokenizer, fraction=0.5):
    """A dense checkpoint with the smallest half of every block weight set to zero (unstructured pruning)."""
    model = build_model("llama")
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                w = module.weight
                w[w.abs() <= w.abs().flatten().kthvalue(int(fraction * w.numel())).values] = 0
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def logits(model):
    with torch.no_grad():
        return model(input_ids=ids()).logits


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, llama_dir, tokenizer):
    return magnitude_pruned(llama_dir, tmp_path_factory.mktemp("pruned"), tokenizer)


def test_repairs_a_pruned_model(llama_dir, pruned, calib_file, tmp_path):
    before_input = tree_digest(pruned)
    out = str(tmp_path / "repair")
    report = lowrank.compensate(llama_dir, pruned, out, rank=8, calib=calib_file, **CAL)
    assert tree_digest(pruned) == before_input
    config = json.load(open(os.path.join(out, "adapter_config.json")))
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == 8
    assert config["task_type"] == "CAUSAL_LM" and len(config["target_modules"]) == 21
    assert all(layer["rel_error"] < layer["error_before"] for layer in report["layers"]["list"])
    assert report["summary"]["mean_error_after"] < 0.8 * report["summary"]["mean_error_before"]

    from transformers import AutoModelForCausalLM

    original = logits(AutoModelForCausalLM.from_pretrained(llama_dir))
    base = AutoModelForCausalLM.from_pretrained(pruned)
    broken = logits(base)
    repaired = logits(peft.PeftModel.from_pretrained(base, out))
    assert (repaired - original).norm() < 0.8 * (broken - original).norm()
    saved = json.load(open(os.path.join(out, "compensation_report.json")))
    assert saved["kind"] == "compensate" and saved["schema_version"] == 1


def test_repairs_a_factorized_checkpoint_and_merges(llama_dir, calib_file, tmp_path):
    compressed = str(tmp_path / "svd50")
    lowrank.compress(llama_dir, compressed, ratio=0.5, method="svd", calib=calib_file, **COMPRESS_FAST)
    adapter = str(tmp_path / "adapter")
    lowrank.compensate(llama_dir, compressed, adapter, rank=4, calib=calib_file, **CAL)
    from transformers import AutoModelForCausalLM

    original = logits(AutoModelForCausalLM.from_pretrained(llama_dir))
    factorized = lowrank.load_pretrained(compressed)
    before = logits(factorized)
    with_adapter = logits(peft.PeftModel.from_pretrained(factorized, adapter))
    assert (with_adapter - original).norm() < (before - original).norm()

    merged = str(tmp_path / "merged")
    report = lowrank.compensate(llama_dir, compressed, merged, rank=4, merge=True, calib=calib_file, **CAL)
    assert report["merged"] and report["summary"]["rank_growth"] == 4
    old = json.load(open(os.path.join(compressed, "config.json")))["lowrank"]["ranks"]
    new = json.load(open(os.path.join(merged, "config.json")))
    assert new["model_type"] == "lowrank_llama" and new["lowrank"]["compensation"]["rank"] == 4
    assert all(new["lowrank"]["ranks"][name] == rank + 4 for name, rank in old.items())
    assert os.path.exists(os.path.join(merged, "compression_report.json"))
    merged_logits = logits(lowrank.load_pretrained(merged))
    assert torch.allclose(merged_logits, with_adapter, atol=1e-4)


def run(argv, capsys):
    with pytest.raises(SystemExit) as done:
        main(argv)
    return done.value.code, capsys.readouterr().err


def test_bad_inputs(llama_dir, gpt2_dir, pruned, calib_file, tmp_path, capsys):
    out = str(tmp_path / "out")
    fast = ["--calib", calib_file, "--num-samples", "8", "--seq-len", "64"]
    code, err = run(["compensate", llama_dir, gpt2_dir, "-o", out, *fast], capsys)
    assert code == 2 and "no module" in err and not os.path.exists(out)
    code, err = run(["compensate", llama_dir, pruned, "-o", out, "--rank", "500", *fast], capsys)
    assert code == 2 and "exceeds what" in err and not os.path.exists(out)
    code, err = run(["compensate", llama_dir, pruned, "-o", out, "--merge", *fast], capsys)
    assert code == 2 and "--merge needs a lowrank" in err and not os.path.exists(out)
    code, err = run(["compensate", llama_dir, llama_dir, "-o", out, *fast], capsys)
    assert code == 2 and "nothing to repair" in err and not os.path.exists(out)
