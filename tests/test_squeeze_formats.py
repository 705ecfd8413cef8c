"""Single-file LoRA formats (kohya / sd-scripts / LoCon, diffusers) and the adapters `lowrank squeeze` refuses."""

import json
import os

import pytest
import torch
from conftest import tree_digest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lowrank
from lowrank.errors import UsageError

F64 = torch.float64


def kohya_tensors(dtype=torch.float16):
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.3).to(dtype)

    return {
        # a linear layer with alpha 4 (scale 0.5) and a DoRA scale
        "lora_unet_mid_block_attentions_0_to_q.lora_down.weight": rand(8, 32),
        "lora_unet_mid_block_attentions_0_to_q.lora_up.weight": rand(24, 8),
        "lora_unet_mid_block_attentions_0_to_q.alpha": torch.tensor(4.0, dtype=dtype),
        "lora_unet_mid_block_attentions_0_to_q.dora_scale": rand(1, 32),
        # a 3x3 conv (LoCon): down (r, in, 3, 3), up (out, r, 1, 1), alpha 8 (scale 1)
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": rand(8, 6, 3, 3),
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": rand(10, 8, 1, 1),
        "lora_unet_down_blocks_0_resnets_0_conv1.alpha": torch.tensor(8.0, dtype=dtype),
        # a text-encoder layer without alpha (alpha = r: scale 1)
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": rand(8, 16),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": rand(20, 8),
    }


METADATA = {"ss_network_dim": "8", "ss_network_alpha": "4", "ss_training_comment": "my style",
            "sshs_model_hash": "0123", "sshs_legacy_hash": "abcd", "modelspec.title": "test"}


def updates(tensors, down_suffix, up_suffix, alphas=True):
    """{module: scale·up·down (float64, flattened)} of a single-file LoRA."""
    out = {}
    for key, down in tensors.items():
        if not key.endswith(down_suffix):
            continue
        prefix = key[: -len(down_suffix)]
        up = tensors[prefix + up_suffix]
        r = down.shape[0]
        alpha = float(tensors[prefix + ".alpha"]) if alphas and prefix + ".alpha" in tensors else r
        out[prefix] = alpha / r * up.reshape(up.shape[0], r).to(F64) @ down.reshape(r, -1).to(F64)
    return out


def truncate(update, k):
    u, s, vh = torch.linalg.svd(update, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def test_kohya_round_trip(tmp_path):
    source = str(tmp_path / "style.safetensors")
    tensors = kohya_tensors()
    save_file(tensors, source, metadata=METADATA)
    source_bytes = open(source, "rb").read()
    out = str(tmp_path / "style-r3.safetensors")
    report = lowrank.squeeze(source, out, rank=3, dtype="float32")
    squeezed = load_file(out)
    assert set(squeezed) == set(tensors)  # same keys: the alpha-less module stays alpha-less (its scale is 1)
    assert squeezed["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (3, 6, 3, 3)
    assert squeezed["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"].shape == (10, 3, 1, 1)
    assert torch.equal(squeezed["lora_unet_mid_block_attentions_0_to_q.dora_scale"],
                       tensors["lora_unet_mid_block_attentions_0_to_q.dora_scale"])
    assert float(squeezed["lora_unet_mid_block_attentions_0_to_q.alpha"]) == 1.5  # keep-scale: 0.5 * 3
    old = updates(tensors, ".lora_down.weight", ".lora_up.weight")
    new = updates(squeezed, ".lora_down.weight", ".lora_up.weight")
    for name, update in old.items():
        assert torch.allclose(new[name], truncate(update, 3), atol=1e-6 * update.norm())
    with safe_open(out, "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_network_dim"] == "3" and metadata["ss_network_alpha"] == "Dynamic"
    assert metadata["ss_training_comment"].startswith("squeezed by lowrank") and "my style" in metadata[
        "ss_training_comment"]
    assert "sshs_model_hash" not in metadata and metadata["modelspec.title"] == "test"
    assert json.loads(metadata["lowrank_squeeze"])["rank"] == [3]
    saved = json.load(open(tmp_path / "style-r3.squeeze_report.json"))
    assert saved["source"]["format"] == "kohya" and saved["layers"]["list"] == report["layers"]["list"]
    # the output is itself a kohya file lowrank reads; squeezing to its own rank changes nothing
    again = str(tmp_path / "again.safetensors")
    lowrank.squeeze(out, again, rank=3, dtype="float32")
    for name, update in updates(load_file(again), ".lora_down.weight", ".lora_up.weight").items():
        assert torch.allclose(update, new[name], atol=1e-6 * update.norm())
    assert open(source, "rb").read() == source_bytes  # the input is untouched
    assert sorted(os.listdir(tmp_path)) == ["again.safetensors", "again.squeeze_report.json",
                                            "again.squeeze_report.md", "style-r3.safetensors",
                                            "style-r3.squeeze_report.json", "style-r3.squeeze_report.md",
                                            "style.safetensors"]  # and no staging leftovers


def test_kohya_keeps_dtype_and_source_rank_is_lossless(tmp_path):
    source = str(tmp_path / "lora.safetensors")
    tensors = kohya_tensors(torch.bfloat16)
    save_file(tensors, source)
    out = str(tmp_path / "lora-r8.safetensors")
    report = lowrank.squeeze(source, out, rank=8)
    squeezed = load_file(out)
    assert all(squeezed[k].dtype == torch.bfloat16 for k in squeezed)
    for name, update in updates(tensors, ".lora_down.weight", ".lora_up.weight").items():
        new = updates(squeezed, ".lora_down.weight", ".lora_up.weight")[name]
        assert float((new - update).norm() / update.norm()) < 1e-2  # bf16 storage
    stored = {layer["name"]: layer["stored_rel_error"] for layer in report["layers"]["list"]}
    assert all(0 < error < 1e-2 for error in stored.values())  # measured after the bf16 cast
    assert {layer["energy_kept"] for layer in report["layers"]["list"]} == {1.0}


def test_diffusers_single_file(tmp_path):
    g = torch.Generator().manual_seed(1)
    tensors = {
        "transformer.blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 16, generator=g),
        "transformer.blocks.0.attn.to_q.lora_B.weight": torch.randn(12, 4, generator=g),
        "transformer.blocks.0.attn.to_k.lora_A.weight": torch.randn(4, 16, generator=g),
        "transformer.blocks.0.attn.to_k.lora_B.weight": torch.randn(12, 4, generator=g),
        "transformer.blocks.0.attn.to_k.alpha": torch.tensor(2.0),
        "transformer.norm_out.weight": torch.randn(16, generator=g),
    }
    source = str(tmp_path / "pytorch_lora_weights.safetensors")
    save_file(tensors, source)
    report = lowrank.squeeze(source, str(tmp_path / "out.safetensors"), rank=2)
    assert report["source"]["format"] == "diffusers"
    squeezed = load_file(str(tmp_path / "out.safetensors"))
    assert set(squeezed) == set(tensors)  # no alpha invented for to_q (scale 1 stays 1)
    assert float(squeezed["transformer.blocks.0.attn.to_k.alpha"]) == 1.0  # scale 0.5 kept at rank 2
    assert torch.equal(squeezed["transformer.norm_out.weight"], tensors["transformer.norm_out.weight"])
    old = updates(tensors, ".lora_A.weight", ".lora_B.weight")
    new = updates(squeezed, ".lora_A.weight", ".lora_B.weight")
    for name, update in old.items():
        assert torch.allclose(new[name], truncate(update, 2), atol=1e-5 * update.norm())


def peft_dir(tmp_path, config=None, tensors=None):
    directory = tmp_path / "adapter"
    directory.mkdir(exist_ok=True)
    base = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q"]}
    (directory / "adapter_config.json").write_text(json.dumps({**base, **(config or {})}))
    g = torch.Generator().manual_seed(0)
    default = {"base_model.model.q.lora_A.weight": torch.randn(4, 6, generator=g),
               "base_model.model.q.lora_B.weight": torch.randn(5, 4, generator=g)}
    save_file(tensors if tensors is not None else default, str(directory / "adapter_model.safetensors"))
    return str(directory)


REFUSED = {
    "loha": (lambda t: save_file({"lora_unet_x.hada_w1_a": torch.zeros(2, 2), "lora_unet_x.hada_w1_b":
                                  torch.zeros(2, 2)}, str(t / "x.safetensors")) or str(t / "x.safetensors"),
             "LoHa adapter"),
    "lokr": (lambda t: save_file({"lora_unet_x.lokr_w1": torch.zeros(2, 2)}, str(t / "x.safetensors"))
             or str(t / "x.safetensors"), "LoKr adapter"),
    "adalora-type": (lambda t: peft_dir(t, {"peft_type": "ADALORA"}), "is not additive LoRA"),
    "adalora-keys": (lambda t: peft_dir(t, tensors={"base_model.model.q.lora_E": torch.zeros(4, 1)}), "AdaLoRA"),
    "vera": (lambda t: peft_dir(t, {"peft_type": "VERA"}), "is not additive LoRA"),
    "bdlora": (lambda t: peft_dir(t, {"use_bdlora": {"nblocks": 2}}), "block-diagonal"),
    "adapter-name-in-keys": (lambda t: peft_dir(t, tensors={"base_model.model.q.lora_A.default.weight":
                                                            torch.zeros(4, 6)}), "carries an adapter name"),
    "no-lora": (lambda t: save_file({"model.embed.weight": torch.zeros(3, 3)}, str(t / "x.safetensors"))
                or str(t / "x.safetensors"), "no LoRA module found"),
    "no-B": (lambda t: peft_dir(t, tensors={"base_model.model.q.lora_A.weight": torch.zeros(4, 6)}),
             "has a LoRA A factor but no B"),
    "stale-config": (lambda t: peft_dir(t, {"r": 8}), "does not belong to these weights"),
    "shapes": (lambda t: peft_dir(t, tensors={"base_model.model.q.lora_A.weight": torch.zeros(4, 6),
                                             "base_model.model.q.lora_B.weight": torch.zeros(5, 3)}),
               "do not form a LoRA pair"),
    "grouped-conv": (lambda t: peft_dir(t, tensors={"base_model.model.q.lora_A.weight": torch.zeros(4, 6, 3, 3),
                                                   "base_model.model.q.lora_B.weight": torch.zeros(8, 2, 1, 1)}),
                     "grouped-conv"),
    "weights-file-of-a-dir": (lambda t: os.path.join(peft_dir(t), "adapter_model.safetensors"),
                              "part of a PEFT adapter directory"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_adapters(case, tmp_path):
    make, message = REFUSED[case]
    path = make(tmp_path)
    before = tree_digest(str(tmp_path))
    with pytest.raises(UsageError, match=message):
        lowrank.squeeze(path, str(tmp_path / "out.safetensors" if path.endswith(".safetensors") else tmp_path / "out"),
                        rank=1)
    assert tree_digest(str(tmp_path)) == before  # nothing written, nothing changed
