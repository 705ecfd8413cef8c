"""`--experts shared-basis`: one basis per MoE layer shared by its experts (compression/shared_basis.py). The MoE
cycle of test_moe.py on tiny random Mixtral and Qwen3-MoE: full-rank exactness, a keep-0.5 checkpoint that a
process without lowrank loads with every tensor from the file, cache equality, densify, byte-identical reruns,
parameters as reported, and the one-line refusals."""

import json

import pytest
import torch

from conftest import WITHOUT_LOWRANK
from test_moe import EXPERTS_AT, assert_cache_changes_nothing, build_moe, calibration_ids, logits, params_in

KINDS = ["mixtral", "qwen3_moe"]


@pytest.mark.parametrize("kind", KINDS + ["gpt_oss", "llama4_text"])
def test_full_rank_shared_basis_reproduces_the_dense_logits(kind):
    """At full rank the shared input basis is invertible and the output basis orthonormal and square, so the
    closed-form fits are exact: the model computes what it did, through the shared-basis forward."""
    from lowrank import CompressConfig, compress_model
    from lowrank.compression.experts import unpack_model_experts
    from lowrank.compression.targets import select_targets
    from lowrank.io.modeling_lowrank import SharedBasisLinear

    model = build_moe(kind)
    with torch.no_grad():  # gpt-oss's expert biases start at zero: make them count
        for name, param in model.named_parameters():
            if name.endswith("_bias"):
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(5)) * 0.1)
    ids = calibration_ids(2, 24, seed=9)
    before = logits(model, ids)
    unpack_model_experts(model)
    _, _, targets = select_targets(model)
    ranks = {name: min(model.get_submodule(name).weight.shape) for names in targets.values() for name in names}
    result = compress_model(model, calibration_ids(), CompressConfig(alloc="uniform", ranks=ranks, batch_size=4,
                                                                     experts="shared-basis"))
    shared = [name for name, m in model.named_modules() if isinstance(m, SharedBasisLinear)]
    assert len(shared) == 2 * 2 * 8
    experts = model.get_submodule(f"model.layers.0.{EXPERTS_AT.get(kind, 'mlp.experts')}")
    hidden = model.config.hidden_size
    assert experts.gate_up_proj_basis.weight.shape == (hidden, hidden)  # [r, H], r capped at H
    assert experts.down_proj_basis.weight.shape == (hidden, hidden)  # [H, r]
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-4, atol=3e-5)
    assert all(layer.info["shared"]["rank"] == hidden for layer in result.layers if "shared" in layer.info)


def test_shared_rank_spends_the_per_expert_budget():
    """The group's budget is the experts' own factor parameters; the basis is counted once."""
    from lowrank.compression.shared_basis import group_rank

    m, n, experts = 3072, 576, 4
    own = [388] * experts
    rank = group_rank("in", m, n, experts, own)
    assert rank * (n + experts * m) <= experts * 388 * (m + n) < (rank + 1) * (n + experts * m)
    assert group_rank("out", n, 1536, experts, [None] * experts) is None
    assert group_rank("out", 576, 1536, experts, [10**6] * experts) == 576  # never wider than the basis


@pytest.fixture(scope="module", params=KINDS)
def shared_half(request, tmp_path_factory, tokenizer, calib_file):
    import lowrank

    kind = request.param
    directory = tmp_path_factory.mktemp(kind)
    build_moe(kind).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    out = str(tmp_path_factory.mktemp(kind + "-shared") / "out")
    options = dict(ratio=0.5, alloc="uniform", verify=False, calib=calib_file, num_samples=8, seq_len=64,
                   batch_size=4, experts="shared-basis")
    report = lowrank.compress(str(directory), out, **options)
    return kind, str(directory), out, report, options


def test_shared_checkpoint_loads_every_tensor_without_lowrank(shared_half, tmp_path):
    """transformers alone rebuilds the shared-basis experts from the bundled file; every parameter it holds is
    the file's tensor (none left to random init), the basis once per layer and tensor; logits match lowrank's."""
    import os
    import subprocess
    import sys
    import textwrap

    import lowrank
    from safetensors.torch import load_file

    kind, _, out, report, _ = shared_half
    script = WITHOUT_LOWRANK + textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({out!r}, trust_remote_code=True)
        ids = torch.randint(5, 320, (2, 24), generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            torch.save(model(input_ids=ids).logits, {str(tmp_path / "logits.pt")!r})
        torch.save(dict(model.state_dict()), {str(tmp_path / "state.pt")!r})
        experts = model.get_submodule("model.layers.1.mlp.experts")
        print(type(experts.gate_up_proj[3]).__name__, type(experts.down_proj[0]).__name__, "lowrank" in sys.modules)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "SharedBasisLinear SharedBasisLinear False" in run.stdout, run.stdout
    stored = load_file(f"{out}/model.safetensors")
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)
    loaded = {name: value for name, value in loaded.items() if name != "lm_head.weight" or name in stored}
    assert set(loaded) == set(stored)
    for name, value in stored.items():
        assert torch.equal(loaded[name], value), name
    bases = [name for name in stored if name.endswith("_basis.weight")]
    assert len(bases) == 2 * 2  # two layers, gate_up and down: each basis stored once
    assert not any(".gate_up_proj.3.down." in name or ".down_proj.3.up." in name for name in stored)
    ids = torch.randint(5, 320, (2, 24), generator=torch.Generator().manual_seed(7))
    model = lowrank.load_pretrained(out)
    assert torch.equal(torch.load(tmp_path / "logits.pt", weights_only=True), logits(model, ids))

    config = json.load(open(f"{out}/config.json"))["lowrank"]
    assert config["format_version"] == 3
    assert set(config["shared"]) == {"model.layers.0.mlp.experts", "model.layers.1.mlp.experts"}
    assert not any(".experts." in name for name in config["ranks"])


def test_shared_parameters_are_what_the_report_says(shared_half):
    """The written element count is the report's; the basis counts once, so the experts keep <= the ratio."""
    _, _, out, report, _ = shared_half
    assert report["ratio"]["model"]["params_after"] == params_in(out)
    listed = [layer for layer in report["layers"]["list"] if ".experts." in layer["name"]]
    assert len(listed) == 32
    before = sum(layer["params_before"] for layer in listed)
    after = sum(layer["params_after"] for layer in listed)
    assert 0.45 * before < after <= 0.5 * before
    counted = [layer for layer in listed if layer["info"]["shared"]["basis_counted_here"]]
    assert len(counted) == 4 and all(layer["name"].endswith(".0") for layer in counted)
    from lowrank.report.compression import compression_rows

    rows = dict(compression_rows(report))
    basis = sum(layer["info"]["shared"]["basis_params"] for layer in counted)
    assert rows["shared bases"].startswith(f"4 (one per layer and expert tensor), {basis:,} parameters counted once")


def test_shared_generate_with_cache_equals_without(shared_half):
    import lowrank

    assert_cache_changes_nothing(lowrank.load_pretrained(shared_half[2]))


def test_shared_densify_round_trips_to_the_original_layout(shared_half, tmp_path):
    """densify multiplies each expert's factor with its layer's basis back into the 3-D tensors: plain transformers
    loads it, and it computes what the shared-basis forward (basis once for every token) computes."""
    import lowrank
    from transformers import AutoModelForCausalLM

    _, directory, out, _, _ = shared_half
    dense_dir = str(tmp_path / "dense")
    summary = lowrank.densify(out, dense_dir)
    ranks = json.load(open(f"{out}/config.json"))["lowrank"]["ranks"]
    assert summary["densified_layers"] == len(ranks) + 32  # attention's and every expert's
    dense = AutoModelForCausalLM.from_pretrained(dense_dir)
    original = AutoModelForCausalLM.from_pretrained(directory)
    assert {n: p.shape for n, p in dense.named_parameters()} == {n: p.shape for n, p in original.named_parameters()}
    ids = torch.randint(5, 320, (2, 24), generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(logits(dense, ids), logits(lowrank.load_pretrained(out), ids), rtol=1e-4, atol=2e-5)


def test_shared_rerun_is_byte_identical(shared_half, tmp_path):
    """The weights and config.json of a second run are the same bytes (eigenvector signs fixed, no set order)."""
    import lowrank

    from test_streaming import weights_and_config

    kind, directory, out, _, options = shared_half
    if kind != "mixtral":
        pytest.skip("one layout is enough")
    again = str(tmp_path / "again")
    lowrank.compress(directory, again, **options)
    assert weights_and_config(again) == weights_and_config(out)


@pytest.mark.parametrize("flags, message", [
    (["--experts", "shared-basis", "--method", "svd"], "--experts shared-basis is not supported with --method svd"),
    (["--experts", "shared-basis", "--stream", "on"], "--experts shared-basis is not supported with --stream on"),
    (["--experts", "shared"], "--experts must be one of per-expert, shared-basis"),
])
def test_unsupported_shared_basis_options_are_one_line(flags, message, llama_dir, calib_file, tmp_path, capsys):
    from conftest import assert_clean_failure, run

    output = str(tmp_path / "out")
    code, _, err = run(["compress", llama_dir, "--ratio", "0.5", "-o", output, "--calib", calib_file,
                        "--num-samples", "8", "--seq-len", "64", "--no-verify", *flags], capsys)
    assert_clean_failure(code, err, 2, message, output)


def test_a_model_without_experts_refuses_shared_basis(llama_dir, calib_file, tmp_path, capsys):
    from conftest import assert_clean_failure, run

    output = str(tmp_path / "out")
    code, _, err = run(["compress", llama_dir, "--ratio", "0.5", "-o", output, "--calib", calib_file,
                        "--num-samples", "8", "--seq-len", "64", "--no-verify", "--experts", "shared-basis"], capsys)
    assert_clean_failure(code, err, 2, "this model has no experts", output)


def test_eora_adapter_repairs_shared_experts_and_merge_is_refused(shared_half, calib_file, tmp_path):
    """compensate sees each shared-basis expert as the linear layer it is: a PEFT adapter lowers every expert's
    error; --merge, which would have to change a basis other experts read, is refused with one line."""
    import lowrank
    from lowrank.errors import UsageError

    kind, directory, out, _, _ = shared_half
    if kind != "mixtral":
        pytest.skip("one layout is enough")
    options = dict(rank=4, calib=calib_file, num_samples=8, seq_len=64, batch_size=4)
    report = lowrank.compensate(directory, out, str(tmp_path / "eora"), **options)
    experts = [layer for layer in report["layers"]["list"] if ".experts." in layer["name"]]
    assert len(experts) == 32 and all(layer["rel_error"] < layer["error_before"] for layer in experts)
    with pytest.raises(UsageError, match="shares a basis with its layer's other experts"):
        lowrank.compensate(directory, out, str(tmp_path / "merged"), merge=True, **options)
