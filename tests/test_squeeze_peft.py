"""`lowrank squeeze` on real PEFT adapters: squeezed, loaded back with PeftModel.from_pretrained, and checked against
the model whose LoRA updates are replaced by their exact (dense SVD) rank-k truncations."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import build_model, tree_digest
from safetensors.torch import load_file

import lowrank
from lowrank.report.files import read_report

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402


class ConvNet(torch.nn.Module):
    """Conv2d (3x3), Conv1d, Embedding and Linear layers: the layouts PEFT's LoRA has beyond linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.emb = torch.nn.Embedding(40, 12)
        self.conv = torch.nn.Conv2d(3, 10, 3, padding=1)
        self.conv1 = torch.nn.Conv1d(12, 10, 3, padding=1)
        self.lin = torch.nn.Linear(10, 7)

    def forward(self, image, tokens):
        x = self.conv(image).mean((2, 3))
        y = self.conv1(self.emb(tokens).transpose(1, 2)).mean(2)
        return self.lin(x + y)


def inputs(kind):
    g = torch.Generator().manual_seed(2)
    if kind == "conv":
        return {"image": torch.randn(2, 3, 6, 6, generator=g), "tokens": torch.randint(0, 40, (2, 5), generator=g)}
    return {"input_ids": torch.randint(0, 320, (2, 12), generator=g)}


def run(model, kind):
    with torch.no_grad():
        out = model(**inputs(kind))
    return out.logits if hasattr(out, "logits") else out


VARIANTS = {
    "plain": ("llama", dict(r=8, lora_alpha=16, target_modules="all-linear")),
    "rslora": ("llama", dict(r=8, lora_alpha=4, use_rslora=True, target_modules="all-linear")),
    "dora": ("llama", dict(r=8, lora_alpha=16, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"])),
    "bias": ("llama", dict(r=8, lora_alpha=8, lora_bias=True, target_modules=["q_proj", "up_proj"],
                           modules_to_save=["model.norm"])),
    "embedding": ("llama", dict(r=8, lora_alpha=16, target_modules=["embed_tokens", "o_proj"])),
    "conv": ("conv", dict(r=6, lora_alpha=12, target_modules=["conv", "conv1", "emb", "lin"])),
    "rank_pattern": ("llama", dict(r=8, lora_alpha=16, target_modules="all-linear",
                                   rank_pattern={"q_proj": 12, "layers.1.mlp.up_proj": 4},
                                   alpha_pattern={"v_proj": 32})),
}


def base_model(kind):
    return ConvNet().eval() if kind == "conv" else build_model("llama")


def make_adapter(directory, variant, seed=0):
    """A trained-looking PEFT adapter: random A, B (B is zero at init), magnitudes and biases."""
    kind, kwargs = VARIANTS[variant]
    model = get_peft_model(base_model(kind), LoraConfig(**kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                noise = torch.randn(param.shape, generator=g) * 0.2
                param.copy_(param * (1 + noise) if "magnitude" in name else noise)
            elif "modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=g) * 0.1)
    model.save_pretrained(directory)
    return kind


def lora_pairs(model):
    """{module name: (layer, A param, B param)} of a loaded PeftModel (adapter "default")."""
    pairs = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.r:
            key = name.removeprefix("base_model.model.")
            if "default" in module.lora_A:
                pairs[key] = (module, module.lora_A["default"].weight, module.lora_B["default"].weight)
            else:
                pairs[key] = (module, module.lora_embedding_A["default"], module.lora_embedding_B["default"])
    return pairs


def truncated_reference(kind, adapter, ranks):
    """The original adapter loaded, each update s·B·A replaced by its dense-SVD rank-k truncation (zero-padded to
    the source rank, scale unchanged)."""
    model = PeftModel.from_pretrained(base_model(kind), adapter).eval()
    with torch.no_grad():
        for name, (layer, a, b) in lora_pairs(model).items():
            r, k = a.shape[0], ranks[name]
            scale = layer.scaling["default"]
            dense = scale * b.reshape(b.shape[0], r).double() @ a.reshape(r, -1).double()
            u, s, vh = torch.linalg.svd(dense, full_matrices=False)
            new_b = torch.zeros(b.shape[0], r, dtype=torch.float64)
            new_a = torch.zeros(r, dense.shape[1], dtype=torch.float64)
            new_b[:, :k], new_a[:k] = u[:, :k] * s[:k] / scale, vh[:k]
            b.copy_(new_b.reshape(b.shape))
            a.copy_(new_a.reshape(a.shape))
    return model


def assert_close(actual, expected, tolerance=2e-5):
    scale = expected.abs().max().item()
    difference = (actual - expected).abs().max().item()
    assert difference <= tolerance * scale, f"max difference {difference:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_squeezed_adapter_loads_and_equals_the_exact_truncation(variant, tmp_path):
    adapter, out = str(tmp_path / "adapter"), str(tmp_path / "out")
    kind = make_adapter(adapter, variant)
    before = tree_digest(adapter)
    policy = "unit" if variant == "bias" else None  # a scale change also rescales lora_B.bias
    rule = {"energy": 0.7} if variant == "rank_pattern" else {"rank": 3}
    report = lowrank.squeeze(adapter, out, alpha_policy=policy, **rule)
    assert tree_digest(adapter) == before
    ranks = {layer["name"]: layer["rank"] for layer in report["layers"]["list"]}
    squeezed = PeftModel.from_pretrained(base_model(kind), out).eval()
    pairs = lora_pairs(squeezed)
    assert set(pairs) == set(ranks)
    for name, (layer, a, _) in pairs.items():
        assert layer.r["default"] == ranks[name] == a.shape[0]  # PEFT resolved rank_pattern as intended
    scales = {round(layer.scaling["default"], 12) for layer, _, _ in pairs.values()}
    assert len(scales) == 1  # uniform, so consumers that ignore the patterns (vLLM) scale it right
    config = json.load(open(os.path.join(out, "adapter_config.json")))
    global_scale = config["lora_alpha"] / (math.sqrt(config["r"]) if config["use_rslora"] else config["r"])
    assert scales == {round(global_scale, 12)}
    if variant == "rank_pattern":
        assert len(set(ranks.values())) > 1 and config["rank_pattern"] and config["alpha_pattern"]
    reference = truncated_reference(kind, adapter, ranks)
    assert_close(run(squeezed, kind), run(reference, kind))
    # and the truncation did change the model (the comparison is not vacuous)
    original = PeftModel.from_pretrained(base_model(kind), adapter).eval()
    assert (run(original, kind) - run(squeezed, kind)).abs().max() > 1e-3
    # tensors that are not LoRA factors (magnitudes, modules_to_save) are byte for byte the same
    old, new = load_file(os.path.join(adapter, "adapter_model.safetensors")), load_file(
        os.path.join(out, "adapter_model.safetensors"))
    assert set(old) == set(new)
    for key in old:
        if not any(part in key for part in ("lora_A", "lora_B", "lora_embedding")):
            assert torch.equal(old[key], new[key]), key
    # stored_rel_error is the error of the factors as written, checked densely here
    for name, (layer, a, b) in lora_pairs(original).items():
        entry = next(e for e in report["layers"]["list"] if e["name"] == name)
        _, a_new, b_new = pairs[name]
        dense = layer.scaling["default"] * b.reshape(b.shape[0], -1).double() @ a.reshape(a.shape[0], -1).double()
        new_scale = pairs[name][0].scaling["default"]
        approx = new_scale * b_new.reshape(b_new.shape[0], -1).double() @ a_new.reshape(a_new.shape[0], -1).double()
        assert entry["stored_rel_error"] == pytest.approx(float((dense - approx).norm() / dense.norm()), abs=1e-5)
        assert entry["rel_error"] == pytest.approx(math.sqrt(1 - entry["energy_kept"]), abs=1e-6)


@pytest.mark.parametrize("variant", ["plain", "rslora", "dora", "conv", "rank_pattern", "embedding"])
@pytest.mark.parametrize("policy", ["keep-scale", "unit"])
def test_squeezing_to_the_source_rank_is_lossless(variant, policy, tmp_path):
    adapter, out = str(tmp_path / "adapter"), str(tmp_path / "out")
    kind = make_adapter(adapter, variant)
    report = lowrank.squeeze(adapter, out, energy=1.0, alpha_policy=policy)
    assert all(layer["rank"] == layer["rank_before"] for layer in report["layers"]["list"])
    assert report["totals"]["energy_kept"]["min"] == 1.0
    original = run(PeftModel.from_pretrained(base_model(kind), adapter).eval(), kind)
    assert_close(run(PeftModel.from_pretrained(base_model(kind), out).eval(), kind), original)


def test_dora_true_error_with_the_base_model(tmp_path, llama_dir):
    adapter, out = str(tmp_path / "adapter"), str(tmp_path / "out")
    make_adapter(adapter, "dora")
    report = lowrank.squeeze(adapter, out, rank=2, base_model=llama_dir)
    assert "magnitudes kept" in report["dora"]["note"] and report["dora"]["base_model"] == llama_dir

    def merged(path):
        model = PeftModel.from_pretrained(build_model("llama"), path).merge_and_unload()
        return {name: param.detach() for name, param in model.named_parameters()}

    before, after, base = merged(adapter), merged(out), dict(build_model("llama").state_dict())
    for layer in report["layers"]["list"]:
        key = layer["name"] + ".weight"
        true = float((after[key] - before[key]).double().norm() / (before[key] - base[key]).double().norm())
        assert layer["dora_true_rel_error"] == pytest.approx(true, rel=1e-3)
    plain = lowrank.squeeze(adapter, str(tmp_path / "out2"), rank=2)
    assert "pass --base-model" in plain["dora"]["note"]


def test_rank_pattern_output_under_every_rule(tmp_path):
    adapter = str(tmp_path / "adapter")
    make_adapter(adapter, "plain")
    full = sum(layer["params_before"] for layer in lowrank.squeeze(adapter, analyze=True, rank=8)["layers"]["list"])
    report = lowrank.squeeze(adapter, str(tmp_path / "budget"), budget=0.3, min_rank=2)
    total = report["totals"]
    assert total["params_after"] <= 0.3 * full and total["rank"]["min"] >= 2
    assert total["rank"]["max"] > total["rank"]["min"]  # heterogeneous: written with rank_pattern
    loaded = PeftModel.from_pretrained(build_model("llama"), str(tmp_path / "budget"))
    ranks = {layer["name"]: layer["rank"] for layer in report["layers"]["list"]}
    assert {name: layer.r["default"] for name, (layer, _, _) in lora_pairs(loaded).items()} == ranks
    capped = lowrank.squeeze(adapter, str(tmp_path / "energy"), energy=0.99, max_rank=5)
    assert capped["totals"]["rank"]["max"] == 5 and capped["warnings"]
    kept = lowrank.squeeze(adapter, str(tmp_path / "alpha"), energy=0.6, alpha_policy="keep-alpha")
    assert kept["scaling"]["uniform"] is False and any("vLLM" in w for w in kept["warnings"])
    loaded = PeftModel.from_pretrained(build_model("llama"), str(tmp_path / "alpha")).eval()
    reference = truncated_reference("llama", adapter, {e["name"]: e["rank"] for e in kept["layers"]["list"]})
    assert_close(run(loaded, "llama"), run(reference, "llama"))


def test_output_is_reproducible_and_reports_validate(tmp_path):
    adapter = str(tmp_path / "adapter")
    make_adapter(adapter, "rslora")
    first = lowrank.squeeze(adapter, str(tmp_path / "a"), rank=4)
    lowrank.squeeze(adapter, str(tmp_path / "b"), rank=4)
    for name in ("adapter_model.safetensors", "adapter_config.json", "README.md"):
        assert open(tmp_path / "a" / name, "rb").read() == open(tmp_path / "b" / name, "rb").read(), name
    report = read_report(str(tmp_path / "a" / "squeeze_report.json"))
    assert report["schema"] == "lowrank.squeeze" and report["kind"] == "squeeze"
    assert report == json.loads(json.dumps(first))
    layer = report["layers"]["list"][0]
    for key in ("name", "shape", "rank_before", "rank", "alpha_before", "alpha", "scale_before", "scale",
                "energy_kept", "rel_error", "sigma_1", "sigma_k", "sigma_first_dropped", "params_before",
                "params_after"):
        assert key in layer, key
    assert layer["sigma_first_dropped"] <= layer["sigma_k"] <= layer["sigma_1"]
    # rsLoRA keep-scale: alpha' = scale·sqrt(k)
    assert layer["alpha"] == pytest.approx(4 / math.sqrt(8) * math.sqrt(4), rel=1e-11)
    totals = report["totals"]
    assert totals["bytes_after"] < totals["bytes_before"] and len(totals["worst"]) == 5
    assert "# lowrank squeeze report" in open(tmp_path / "a" / "squeeze_report.md").read()


def test_legacy_bin_and_named_subfolder(tmp_path):
    legacy = str(tmp_path / "legacy")
    model = get_peft_model(build_model("llama"), LoraConfig(r=4, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    model.save_pretrained(legacy, safe_serialization=False)
    assert os.path.exists(os.path.join(legacy, "adapter_model.bin"))
    report = lowrank.squeeze(legacy, str(tmp_path / "legacy-r2"), rank=2)
    assert os.listdir(tmp_path / "legacy-r2").count("adapter_model.safetensors") == 1
    assert any("adapter_model.bin" in w for w in report["warnings"])
    PeftModel.from_pretrained(build_model("llama"), str(tmp_path / "legacy-r2"))
    # PEFT saves a non-default adapter in <dir>/<name>/: the output mirrors it
    root = tmp_path / "multi"
    model.save_pretrained(str(root / "other"))
    (root / "notes.txt").write_text("kept")
    lowrank.squeeze(str(root), str(tmp_path / "multi-r2"), rank=2)
    assert (tmp_path / "multi-r2" / "notes.txt").read_text() == "kept"
    loaded = PeftModel.from_pretrained(build_model("llama"), str(tmp_path / "multi-r2" / "other"))
    assert {layer.r["default"] for layer, _, _ in lora_pairs(loaded).values()} == {2}


def test_squeeze_needs_no_peft_nor_transformers(tmp_path):
    """Squeezing works on the adapter files alone; importing transformers would cost seconds for nothing."""
    adapter = str(tmp_path / "adapter")
    make_adapter(adapter, "plain")
    script = ("import sys; sys.modules['peft'] = None\n"
              "import lowrank\n"
              f"report = lowrank.squeeze({adapter!r}, {str(tmp_path / 'out')!r}, rank=2)\n"
              "print(report['totals']['rank']['max'], sys.modules.get('peft') is not None, "
              "'transformers' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["2", "False", "False"]


def test_randomized_algorithm_and_padding(tmp_path):
    adapter = str(tmp_path / "adapter")
    make_adapter(adapter, "plain")
    # a sketch as wide as the source rank is exact: the same model as the exact algorithm's
    exact = lowrank.squeeze(adapter, str(tmp_path / "exact"), rank=3)
    wide = lowrank.squeeze(adapter, str(tmp_path / "wide"), rank=3, algorithm="rsvd", oversample=5, power_iters=0)
    assert wide["algorithm"] == {"name": "rsvd", "oversample": 5, "power_iters": 0, "seed": 0,
                                 "threads": os.cpu_count() if os.cpu_count() <= 8 else 8, "torch_threads": 1}
    models = {name: run(PeftModel.from_pretrained(build_model("llama"), str(tmp_path / name)).eval(), "llama")
              for name in ("exact", "wide")}
    assert_close(models["wide"], models["exact"])
    # a narrow sketch is an approximation: never better than the exact truncation, close with power iterations
    narrow = lowrank.squeeze(adapter, str(tmp_path / "narrow"), rank=3, algorithm="rsvd", oversample=1,
                             power_iters=3, seed=7)
    gaps = [best["energy_kept"] - fast["energy_kept"]
            for fast, best in zip(narrow["layers"]["list"], exact["layers"]["list"])]
    assert min(gaps) >= -1e-9 and sum(gaps) / len(gaps) < 0.05  # (random adapters have flat spectra: hard)
    for fast in narrow["layers"]["list"]:
        assert fast["stored_rel_error"] == pytest.approx(fast["rel_error"], abs=1e-5)
    lowrank.squeeze(adapter, str(tmp_path / "narrow2"), rank=3, algorithm="rsvd", oversample=1, power_iters=3,
                    seed=7)
    assert open(tmp_path / "narrow" / "adapter_model.safetensors", "rb").read() == open(
        tmp_path / "narrow2" / "adapter_model.safetensors", "rb").read()  # same seed, same bytes
    # --allow-pad: rank 12 from rank 8, zero-padded, the same model
    padded = lowrank.squeeze(adapter, str(tmp_path / "padded"), rank=12, allow_pad=True)
    assert padded["totals"]["rank"]["min"] == 12
    original = run(PeftModel.from_pretrained(build_model("llama"), adapter).eval(), "llama")
    assert_close(run(PeftModel.from_pretrained(build_model("llama"), str(tmp_path / "padded")).eval(), "llama"),
                 original)
