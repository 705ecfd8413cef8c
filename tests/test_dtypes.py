"""bfloat16 and float16 checkpoints (issue 16): computed in their own dtype, written in it, sized by it.

A half-precision checkpoint is compressed from the model's own half-precision activations (statistics in
float64, decompositions in float32), its factors are written in the checkpoint's dtype, and its size on disk
follows that dtype: about half of the same run in float32. Overflow in float16 is tested in test_bad_inputs.py.
"""

import json
import os

import pytest
import torch
from conftest import COMPRESS_FAST, build_model
from safetensors import safe_open

import lowrank
from lowrank.compression.targets import is_linear, select_targets


def save(directory, tokenizer, dtype):
    model = build_model("llama").to(dtype)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def stored_dtypes(directory):
    with safe_open(os.path.join(directory, "model.safetensors"), "pt") as f:
        return {str(f.get_slice(name).get_dtype()) for name in f.keys()}  # noqa: SIM118 (safe_open is not iterable)


@pytest.fixture(scope="module")
def float32_bytes(tmp_path_factory, tokenizer, calib_file):
    root = tmp_path_factory.mktemp("f32")
    report = lowrank.compress(save(root / "model", tokenizer, torch.float32), str(root / "out"), ratio=0.8,
                              calib=calib_file, **COMPRESS_FAST)
    return report["size"]["bytes_after"]


@pytest.mark.parametrize("dtype, stored", [(torch.bfloat16, "BF16"), (torch.float16, "F16")])
def test_a_half_precision_checkpoint_stays_in_its_dtype_at_half_the_size(dtype, stored, tmp_path, tokenizer,
                                                                        calib_file, float32_bytes):
    source = save(tmp_path / "model", tokenizer, dtype)
    out = str(tmp_path / "out")
    report = lowrank.compress(source, out, ratio=0.8, calib=calib_file, **COMPRESS_FAST)
    assert stored_dtypes(out) == {stored}
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["dtype"] == str(dtype).removeprefix("torch.")
    assert 0.45 < report["size"]["bytes_after"] / float32_bytes < 0.55  # the same ranks at 2 bytes a value
    loaded = lowrank.load_pretrained(out)
    assert loaded.dtype == dtype
    ids = torch.randint(5, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = loaded(ids).logits
    assert torch.isfinite(logits).all()
    assert report["verify"]["verdict"] in ("ok", "degraded", "damaged")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_full_rank_in_half_precision_reproduces_the_model_to_its_rounding(dtype, tmp_path, tokenizer, calib_file):
    """At full rank up @ down equals W up to the rounding of the factors to the checkpoint's dtype: the logits
    of the factorized model match the dense half-precision model's to that dtype's precision."""
    source = save(tmp_path / "model", tokenizer, dtype)
    dense = build_model("llama").to(dtype)
    _, _, selected = select_targets(dense)
    ranks = {}
    for names in selected.values():
        for name in names:
            module = dense.get_submodule(name)
            assert is_linear(module)
            ranks[name] = min(module.weight.shape)
    out = str(tmp_path / "out")
    lowrank.compress(source, out, ranks=ranks, calib=calib_file, verify=False, **COMPRESS_FAST)
    ids = torch.randint(5, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = dense(ids).logits.float()
        got = lowrank.load_pretrained(out)(ids).logits.float()
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= 0.05 * scale, (got - expected).abs().max() / scale
