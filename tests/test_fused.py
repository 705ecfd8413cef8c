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
from lowrank.compression.fused import fused_layouts, fused_projections
from lowrank.compression.targets import select_targets
from lowrank.io.modeling_lowrank import SlicedLowRankLinear, linear_shape

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


def test_report_names_the_slices_whole(tmp_path, tokenizer, calib_file):
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


# ---- per-slice factorization (SlicedLowRankLinear) ----------------------------------------------------------------

SLICED_TYPES = ["phi3", "gpt_neox", "falcon", "bloom", "gpt2"]  # contiguous, interleaved per head, Conv1D


def slice_full_ranks(model):
    """Explicit full ranks with every fused layer split: each slice LAYER:SLICE at min(rows, in)."""
    from archs import full_ranks

    ranks = full_ranks(model)
    for entry_name, layout in fused_layouts(model, list(ranks)).items():
        n = ranks.pop(entry_name) and linear_shape(model.get_submodule(entry_name))[1]
        for part, rows in layout.slice_rows().items():
            ranks[f"{entry_name}:{part}"] = min(len(rows), n)
    return ranks


@pytest.mark.parametrize("model_type", SLICED_TYPES)
def test_sliced_full_rank_is_the_dense_model(tmp_path, tokenizer, calib_file, model_type):
    """Every fused layer split into its slices at full rank: the factorized model computes the dense model's
    logits (a wrong row order, slice or bias fails here), and the config records the slices."""
    import lowrank
    from archs import COMPRESS, save_source

    dense = save_source(model_type, tmp_path / "src", tokenizer)
    ranks = slice_full_ranks(dense)
    lowrank.compress(str(tmp_path / "src"), str(tmp_path / "out"), **dict(COMPRESS, calib=calib_file), ratio=1.0,
                     ranks=ranks)
    block = json.loads((tmp_path / "out" / "config.json").read_text())["lowrank"]
    assert block["sliced"] and not set(block["sliced"]) & set(block["ranks"])
    model = lowrank.load_pretrained(str(tmp_path / "out")).eval()
    assert sum(isinstance(m, SlicedLowRankLinear) for m in model.modules()) == len(block["sliced"])
    ids = probe_ids()
    scale = float(logits(dense, ids).abs().max())
    assert float((logits(model, ids) - logits(dense, ids)).abs().max()) <= 1e-5 * max(1.0, scale)


def test_sliced_module_keeps_dense_slices_and_row_order():
    """A dense slice's rows are stored as rows of the shared down, and the interleaved layout (per head) puts
    each slice's rows back where the fused weight has them: forward == x W^T + b with W, b the properties."""
    torch.manual_seed(0)
    for groups, sizes in ((1, (8, 4, 4)), (4, (3, 2, 2))):
        out = groups * sum(sizes)
        layer = SlicedLowRankLinear(10, out, ("q", "k", "v"), sizes, (2, None, 3), groups=groups, bias=True)
        for param in layer.parameters():
            torch.nn.init.normal_(param)
        x = torch.randn(5, 10)
        assert torch.allclose(layer(x), x @ layer.weight.T + layer.bias, atol=1e-5)
        k_rows = torch.cat([torch.arange(g * sum(sizes) + sizes[0], g * sum(sizes) + sizes[0] + sizes[1])
                            for g in range(groups)])
        assert torch.equal(layer.weight[k_rows], layer.down.weight[2:2 + groups * sizes[1]])
        with pytest.raises(RuntimeError, match="read-only"):
            layer.weight.add_(1.0)


@pytest.fixture(scope="module")
def phi3_sliced(tmp_path_factory, tokenizer, calib_file):
    """Phi-3 at keep 0.6 with the Fisher allocation: fused layers per slice (the --fused auto rule). Keep 0.6, not
    0.8: the tiny random model's spectra are nearly flat, and at 0.8 the allocation stores its gate/up whole
    ("dense when it pays"), which would leave no slices to test."""
    import lowrank
    from archs import COMPRESS, save_source

    root = tmp_path_factory.mktemp("phi3-sliced")
    dense = save_source("phi3", root / "src", tokenizer)
    options = dict(COMPRESS, calib=calib_file, alloc="fisher", ratio=0.6)
    report = lowrank.compress(str(root / "src"), str(root / "out"), **options)
    return root, dense, report, options


def test_fisher_allocation_slices_with_their_own_ranks(phi3_sliced):
    root, _, report, _ = phi3_sliced
    block = json.loads((root / "out" / "config.json").read_text())["lowrank"]
    assert block["settings"]["fused"] == "auto"
    assert block["format_version"] == 2  # an older lowrank, which cannot rebuild sliced layers, refuses it
    assert set(block["sliced"]) == {f"model.layers.{i}.{layer}" for i in range(2)
                                    for layer in ("self_attn.qkv_proj", "mlp.gate_up_proj")}
    ranks = {name: spec["ranks"] for name, spec in block["sliced"].items()}
    # the allocation gives the slices of one matrix different ranks (or keeps some dense): one rank could not
    assert any(len(set(r)) > 1 for r in ranks.values()), ranks
    entries = {entry["layer"]: entry for entry in report["fused"]}
    assert entries["self_attn.qkv_proj"]["factorized"] == "per slice (separate ranks)"
    assert set(entries["self_attn.qkv_proj"]["ranks"]) == {"q", "k", "v"}
    layer = next(l for l in report["layers"]["list"] if l["name"] == "model.layers.0.self_attn.qkv_proj")
    parts = layer["info"]["slices"]
    assert [(p["name"], p["rows"]) for p in parts] == [("q", 64), ("k", 32), ("v", 32)]
    assert layer["params_after"] == sum(p["params_after"] for p in parts)
    assert all(0 <= p["rel_error"] < 1 for p in parts)
    # the errors add up over the slices' rows: the layer's error lies between its slices' extremes
    assert min(p["rel_error"] for p in parts) - 1e-6 <= layer["rel_error"] <= max(p["rel_error"] for p in parts) + 1e-6
    markdown = (root / "out" / "compression_report.md").read_text()
    assert "factorized per slice (separate ranks)): q 0:64, k 64:96, v 96:128; mean ranks q " in markdown


def test_sliced_checkpoint_loads_without_lowrank(phi3_sliced):
    """The bundled modeling code rebuilds the sliced layers in a fresh process where lowrank cannot be imported,
    and gives load_pretrained's logits; greedy generation with the cache equals generation without it."""
    import lowrank
    from archs import greedy, run_foreign

    root, _, _, _ = phi3_sliced
    ids = probe_ids()
    torch.save(ids, root / "ids.pt")
    model = lowrank.load_pretrained(str(root / "out")).eval()
    expected = logits(model, ids)
    done = run_foreign([[str(root / "out"), "AutoModelForCausalLM", str(root / "ids.pt"), str(root / "foreign.pt")]])
    assert done.returncode == 0, done.stderr[-2000:]
    assert float((torch.load(root / "foreign.pt") - expected).abs().max()) <= 1e-5
    cached, cached_logits = greedy(model, ids, True)
    uncached, uncached_logits = greedy(model, ids, False)
    assert torch.equal(cached, uncached) and torch.allclose(cached_logits, uncached_logits, atol=1e-4)


def test_sliced_densify_round_trip(phi3_sliced):
    import transformers
    from safetensors import safe_open

    import lowrank

    root, _, _, _ = phi3_sliced
    lowrank.densify(str(root / "out"), str(root / "dense"))
    model = lowrank.load_pretrained(str(root / "out")).eval()
    dense = transformers.AutoModelForCausalLM.from_pretrained(str(root / "dense")).eval()
    ids = probe_ids()
    assert float((logits(dense, ids) - logits(model, ids)).abs().max()) <= 1e-5
    with safe_open(str(root / "dense" / "model.safetensors"), "pt") as f:
        weight = f.get_tensor("model.layers.0.self_attn.qkv_proj.weight")
    product = model.get_submodule("model.layers.0.self_attn.qkv_proj").weight
    assert float((weight.double() - product.double()).abs().max()) <= 1e-6


def test_lora_attaches_to_sliced_layers(phi3_sliced):
    """A PEFT LoRA wraps the sliced layer as one linear (it sees the layer's input) and changes the output."""
    from peft import LoraConfig, get_peft_model

    import lowrank

    root, _, _, _ = phi3_sliced
    model = lowrank.load_pretrained(str(root / "out")).eval()

    before = logits(model, probe_ids())
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj", "gate_up_proj"]))
    adapted = [m for m in peft_model.modules()
               if hasattr(m, "base_layer") and isinstance(m.base_layer, SlicedLowRankLinear)]
    assert len(adapted) == 4
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    assert float((logits(peft_model, probe_ids()) - before).abs().max()) > 1e-3


def test_sliced_output_is_deterministic(phi3_sliced, tmp_path):
    """Same input and seed: the same weights and config, byte for byte (the reports differ in timings only)."""
    import lowrank

    root, _, _, options = phi3_sliced
    lowrank.compress(str(root / "src"), str(tmp_path / "again"), **options)
    for name in ("model.safetensors", "config.json", "lowrank_spectra.safetensors"):
        assert (tmp_path / "again" / name).read_bytes() == (root / "out" / name).read_bytes(), name


def test_fused_modes(tmp_path, tokenizer, calib_file):
    """--fused whole under the Fisher allocation keeps every fused matrix whole; --fused slices under uniform
    splits them, each slice with the uniform rule on its own shape."""
    import lowrank
    from archs import COMPRESS, save_source

    save_source("phi3", tmp_path / "src", tokenizer)
    whole = lowrank.compress(str(tmp_path / "src"), str(tmp_path / "whole"),
                             **dict(COMPRESS, calib=calib_file, alloc="fisher"), ratio=0.8, fused="whole")
    assert {e["factorized"] for e in whole["fused"]} == {"whole (one rank)"}
    block = json.loads((tmp_path / "whole" / "config.json").read_text())["lowrank"]
    assert "sliced" not in block and block["format_version"] == 1
    lowrank.compress(str(tmp_path / "src"), str(tmp_path / "slices"), **dict(COMPRESS, calib=calib_file),
                     ratio=0.5, fused="slices")
    sliced = json.loads((tmp_path / "slices" / "config.json").read_text())["lowrank"]["sliced"]
    # uniform rule per slice at keep 0.5: q 64x64 -> 16, k and v 32x64 -> 10; gate and up 96x64 -> 19
    assert sliced["model.layers.0.self_attn.qkv_proj"]["ranks"] == [16, 10, 10]
    assert sliced["model.layers.0.mlp.gate_up_proj"]["ranks"] == [19, 19]


def test_merging_a_correction_into_sliced_layers_is_refused_before_the_work(phi3_sliced, calib_file, capsys):
    """compensate --merge on per-slice layers: one line, no output, and no correction computed first."""
    import os

    from conftest import run

    root = phi3_sliced[0]
    output = str(root / "merged")
    code, out, err = run(["compensate", str(root / "src"), str(root / "out"), "--rank", "2", "--merge", "-o", output,
                          "--calib", calib_file, "--num-samples", "4", "--seq-len", "32"], capsys)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "factorized per slice: --merge cannot fold" in errors[0], err
    assert "blocks:" not in out + err and not os.path.exists(output)  # refused before the block walk


def test_vllm_plugin_refuses_sliced_layers():
    from lowrank.serve.support import UnservableCheckpoint, check_servable

    config = {"model_type": "lowrank_llama", "architectures": ["LowRankLlamaForCausalLM"],
              "lowrank": {"base_model_type": "llama", "base_architectures": ["LlamaForCausalLM"], "ranks": {},
                          "sliced": {"model.layers.0.self_attn.qkv_proj": {"slices": ["q", "k", "v"]}}}}
    with pytest.raises(UnservableCheckpoint, match="factorized per slice"):
        check_servable(config)


def test_sliced_run_resumes(phi3_sliced, tmp_path, monkeypatch):
    """Interrupted after block 0, `resume` rebuilds the sliced layers of block 0 from the journal (their
    per-slice ranks, the allocation's, not recomputed) and writes the bytes of the uninterrupted run."""
    import lowrank
    from lowrank.compression import api
    from lowrank.errors import Interrupted

    root, _, _, options = phi3_sliced
    block_done = api._Job.block_done

    def stop_after_the_first_block(job, index, block, layers):
        block_done(job, index, block, layers)
        if index == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(api._Job, "block_done", stop_after_the_first_block)
    with pytest.raises(Interrupted, match="after block 1"):
        lowrank.compress(str(root / "src"), str(tmp_path / "out"), **options)
    monkeypatch.setattr(api._Job, "block_done", block_done)
    report = lowrank.compress(str(root / "src"), str(tmp_path / "out"), **options, resume=True)
    assert report["resumed_at_block"] == 1
    for name in ("model.safetensors", "config.json", "lowrank_spectra.safetensors"):  # block 0's from the journal
        assert (tmp_path / "out" / name).read_bytes() == (root / "out" / name).read_bytes(), name


def test_sliced_layers_have_a_spectrum_per_slice(phi3_sliced):
    """The spectra file (report --plot) holds each slice of a per-slice layer as LAYER:SLICE: the singular values
    of that slice's weighted rows, so min(rows, in) of them, descending, and its rank cuts inside them."""
    from safetensors.torch import load_file

    root, _, report, _ = phi3_sliced
    spectra = load_file(str(root / "out" / "lowrank_spectra.safetensors"))
    sliced = [layer for layer in report["layers"]["list"] if "slices" in layer.get("info", {})]
    assert sliced
    for layer in sliced:
        assert layer["name"] not in spectra
        for part in layer["info"]["slices"]:
            sigma = spectra[f"{layer['name']}:{part['name']}"]
            assert sigma.shape == (min(part["rows"], layer["shape"][1]),)
            assert bool((sigma[:-1] >= sigma[1:]).all()) and float(sigma[-1]) >= 0
            assert part["rank"] is None or part["rank"] <= sigma.numel()


def test_slices_all_kept_dense_are_reported_dense(tmp_path, tokenizer, calib_file):
    """--fused slices at keep 1.0: every slice reaches break-even and stays dense, so the layer stays an
    ordinary linear (no sliced entry, format version 1) and the report counts every slice as dense."""
    import lowrank
    from archs import COMPRESS, save_source

    save_source("phi3", tmp_path / "src", tokenizer)
    report = lowrank.compress(str(tmp_path / "src"), str(tmp_path / "out"), **dict(COMPRESS, calib=calib_file),
                              ratio=1.0, fused="slices")
    block = json.loads((tmp_path / "out" / "config.json").read_text())["lowrank"]
    assert "sliced" not in block and block["format_version"] == 1 and block["ranks"] == {}
    qkv = next(e for e in report["fused"] if e["layer"] == "self_attn.qkv_proj")
    assert qkv["ranks"] == {part: {"mean": None, "dense": 2} for part in ("q", "k", "v")}
    assert "; mean ranks q dense, k dense, v dense" in (tmp_path / "out" / "compression_report.md").read_text()
