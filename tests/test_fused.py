"""Fused projections (issue 16, item 2): the report names the slices of every fused layer, and the names are right.

A slice name is checked against what the model computes, not against a copy of the same table: scaling the rows
named q by 2 and the rows named k by 1/2 leaves every attention score, hence the logits, unchanged (RoPE and
ALiBi are linear in q and k; powers of two are exact in float), while scaling the rows named v changes them. A
wrong row range, or contiguous slices claimed for a per-head interleaved layout, fails the first check.
"""

import json

import pytest
import torch

from archs import TYPES, build, logits, probe_ids
from lowrank.compression.fused import fused_projections
from lowrank.compression.targets import select_targets
from lowrank.io.modeling_lowrank import linear_shape

FUSED = {"phi3": {"self_attn.qkv_proj", "mlp.gate_up_proj"}, "gpt_neox": {"attention.query_key_value"},
         "falcon": {"self_attention.query_key_value"}, "bloom": {"self_attention.query_key_value"},
         "gpt2": {"attn.c_attn"}}
FALCON_VARIANTS = {"multi-query": dict(new_decoder_architecture=False, multi_query=True),
                   "per-head": dict(new_decoder_architecture=False, multi_query=False),
                   "grouped": dict(new_decoder_architecture=True, num_kv_heads=2)}


def targets(model):
    return [name for names in select_targets(model)[2].values() for name in names]


def build_variant(model_type, variant):
    if model_type != "falcon":
        return build(model_type)
    options = dict(TYPES["falcon"][0])
    TYPES["falcon"][0].update(FALCON_VARIANTS[variant])
    try:
        return build("falcon")
    finally:
        TYPES["falcon"][0].clear()
        TYPES["falcon"][0].update(options)


def scale_rows(module, entry, factors):
    """Multiply the rows (output features) of each named slice by its factor, weight and bias."""
    rows = torch.ones(entry["shape"][0])
    group = sum(s["rows_per_group"] for s in entry["slices"])
    for g in range(entry["groups"]):
        start = g * group
        for part in entry["slices"]:
            rows[start:start + part["rows_per_group"]] = factors.get(part["name"], 1.0)
            start += part["rows_per_group"]
    with torch.no_grad():
        conv1d = type(module).__name__ == "Conv1D"  # weight stored [in, out]
        module.weight.mul_(rows if conv1d else rows[:, None])
        if module.bias is not None:
            module.bias.mul_(rows)


CASES = [(t, None) for t in FUSED if t != "falcon"] + [("falcon", v) for v in FALCON_VARIANTS]


@pytest.mark.parametrize("model_type,variant", CASES)
def test_slices_are_what_the_model_computes(model_type, variant):
    model = build_variant(model_type, variant)
    fused = fused_projections(model, targets(model))
    assert {entry["layer"] for entry in fused} == FUSED[model_type]
    ids, reference = probe_ids(), logits(model, probe_ids())
    for entry in fused:
        assert entry["count"] == model.config.get_text_config().num_hidden_layers
        assert sum(s["rows"] for s in entry["slices"]) == entry["shape"][0]
        name = next(n for n in targets(model) if n.endswith("0." + entry["layer"]))
        module = model.get_submodule(name)
        assert list(linear_shape(module)[:2]) == entry["shape"]
        names = [s["name"] for s in entry["slices"]]
        if names == ["q", "k", "v"]:
            keep, change = {"q": 2.0, "k": 0.5}, {"v": 2.0}
        else:  # gate, up: up * act(gate) is linear in up; the next layer (down) takes the factor back
            assert names == ["gate", "up"]
            keep, change = {"up": 2.0}, {"gate": 2.0}
            down = model.get_submodule(name.replace("gate_up_proj", "down_proj"))
            with torch.no_grad():
                down.weight.mul_(0.5)
        scale_rows(module, entry, keep)
        assert torch.allclose(logits(model, ids), reference, atol=1e-5), (entry["layer"], entry["description"])
        scale_rows(module, entry, change)
        assert not torch.allclose(logits(model, ids), reference, atol=1e-3), entry["layer"]
        model = build_variant(model_type, variant)  # undo before the next fused layer


def test_descriptions():
    phi3 = {e["layer"]: e["description"] for e in fused_projections(build("phi3"), targets(build("phi3")))}
    # DECODER: 4 heads of 16, 2 key/value heads, intermediate 96
    assert phi3 == {"self_attn.qkv_proj": "q 0:64, k 64:96, v 96:128", "mlp.gate_up_proj": "gate 0:96, up 96:192"}
    neox = fused_projections(build("gpt_neox"), targets(build("gpt_neox")))[0]
    assert neox["layout"] == "interleaved per group"
    assert neox["description"] == ("interleaved, 4 groups of 48 rows, each q 0:16, k 16:32, v 32:48 "
                                   "(q 64, k 64, v 64 rows in all)")
    assert fused_projections(build("llama"), targets(build("llama"))) == []


def test_report_names_the_slices(tmp_path, tokenizer, calib_file):
    import lowrank
    from archs import COMPRESS, save_source

    save_source("phi3", tmp_path / "src", tokenizer)
    report = lowrank.compress(str(tmp_path / "src"), str(tmp_path / "out"), **dict(COMPRESS, calib=calib_file),
                              ratio=0.8)
    written = json.loads((tmp_path / "out" / "compression_report.json").read_text())
    assert written["fused"] == report["fused"]
    qkv = next(e for e in written["fused"] if e["layer"] == "self_attn.qkv_proj")
    assert qkv["factorized"] == "whole (one rank)" and qkv["count"] == 2
    assert [(s["name"], s["rows"]) for s in qkv["slices"]] == [("q", 64), ("k", 32), ("v", 32)]
    markdown = (tmp_path / "out" / "compression_report.md").read_text()
    assert "| fused layer | self_attn.qkv_proj (2x 128x64, factorized whole (one rank)): q 0:64, k 64:96, v 96:128 |" \
        in markdown
    assert "gate 0:96, up 96:192" in markdown
