"""bfloat16 and float16 checkpoints (issue 16): computed in their own dtype, written in it, sized by it.

A half-precision checkpoint is compressed from the model's own half-precision activations (statistics in
float64, decompositions in float32), its factors are written in the checkpoint's dtype, and its size on disk
follows that dtype: about half of the same run in float32. Overflow in float16 is tested in test_bad_inputs.py.
"""

import json
import os

import pytest
import torch
from conftest import COMPRESS_FAST, assert_clean_failure, build_model, run
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


def tensors(directory):
    with safe_open(os.path.join(directory, "model.safetensors"), "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not iterable)


def test_compute_dtype_float32_runs_a_bf16_checkpoint_in_float32_and_writes_bf16(tmp_path, tokenizer, calib_file):
    """--compute-dtype float32: a bf16 checkpoint is loaded and run in float32 (the upcast is exact), and the output
    is still bf16, the dtype the user brought. Its bytes equal those of the same model saved in float32 and
    compressed with --dtype bfloat16 --compute-dtype float32: the same arithmetic on the same values, so the
    option really computes in float32 and the output dtype is read from the checkpoint, not from the upcast
    model. The default run computes in bf16 and so differs."""
    source = save(tmp_path / "bf16", tokenizer, torch.bfloat16)
    upcast = str(tmp_path / "upcast-model")
    build_model("llama").to(torch.bfloat16).float().save_pretrained(upcast)
    tokenizer.save_pretrained(upcast)
    runs = {}
    for name, model, options in [("f32", source, {"compute_dtype": "float32"}), ("native", source, {}),
                                 ("upcast", upcast, {"compute_dtype": "float32", "dtype": "bfloat16"})]:
        out = str(tmp_path / name)
        report = lowrank.compress(model, out, ratio=0.6, calib=calib_file, verify=False, **COMPRESS_FAST, **options)
        runs[name] = (report, tensors(out))
    report, written = runs["f32"]
    assert report["compute_dtype"] == "float32" and runs["native"][0]["compute_dtype"] == "bfloat16"
    assert report["model"]["dtype"] == "bfloat16" and {str(t.dtype) for t in written.values()} == {"torch.bfloat16"}
    upcast_written = runs["upcast"][1]
    assert written.keys() == upcast_written.keys()
    assert all(torch.equal(written[k], upcast_written[k]) for k in written)
    native = runs["native"][1]
    assert any(not torch.equal(written[k], native[k]) for k in written if k.endswith(".down.weight"))


def test_compute_dtype_float32_is_not_streamed(tmp_path, tokenizer, calib_file, capsys):
    source = save(tmp_path / "bf16", tokenizer, torch.bfloat16)
    output = str(tmp_path / "out")
    code, _, err = run(["compress", source, "-o", output, "--calib", calib_file, "--num-samples", "8", "--seq-len",
                        "32", "--compute-dtype", "float32", "--stream", "on"], capsys)
    assert_clean_failure(code, err, 2, "--compute-dtype float32 holds the whole model in memory", output)
