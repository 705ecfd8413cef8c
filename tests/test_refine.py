"""Block refinement (--refine-steps): it lowers what it optimises, moves only the factors, and keeps the project's
guarantees: the same bytes on a rerun, and after a SIGKILL and --resume."""

import itertools
import json
import os
import signal
import subprocess

import archs
import pytest
import torch
from conftest import build_model
from test_streaming import compress_command, every_file, journal_blocks, run_until

from lowrank.compression.config import CompressConfig
from lowrank.compression.model import compress_model
from lowrank.compression.plan import AUTO_REFINE_PASSES, AUTO_REFINE_TOKENS, resolve_refine
from lowrank.errors import UsageError
from lowrank.io.modeling_lowrank import LowRankLinear


def ids(samples=8, length=48, seed=0):
    return torch.randint(5, 320, (samples, length), generator=torch.Generator().manual_seed(seed))


def factor_free_state(model):
    """Every tensor but the factors (norms, embeddings, biases)."""
    factors = {id(p) for m in model.modules() if isinstance(m, LowRankLinear) for p in (m.down.weight, m.up.weight)}
    return {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in factors}


@pytest.mark.parametrize("batch", [4, 1])  # steps on whole batches of 4 windows, or on single windows
def test_refinement_lowers_each_blocks_loss_and_moves_only_the_factors(batch):
    plain, refined = build_model("llama"), build_model("llama")
    config = CompressConfig(alloc="uniform", ratio=0.4, batch_size=4, refine_steps=0)
    compress_model(plain, ids(), config)
    result = compress_model(refined, ids(), CompressConfig(alloc="uniform", ratio=0.4, batch_size=4, refine_steps=12,
                                                           refine_lr=1e-3, refine_batch=batch))
    per_block = {layer.name.split(".")[2]: layer.info["refine"] for layer in result.layers}
    assert len(per_block) == build_model("llama").config.num_hidden_layers
    for refine in per_block.values():
        # the whole calibration set, before and after: not one batch's noisy loss
        assert refine["loss_after"] < 0.9 * refine["loss_before"], refine
    before, after = factor_free_state(plain), factor_free_state(refined)
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    moved = [not torch.equal(a, b) for a, b in zip(plain.state_dict().values(), refined.state_dict().values())]
    assert any(moved)


def test_steps_that_make_a_block_worse_are_undone_and_the_walk_goes_on_from_the_closed_form():
    # lr 1e3 wrecks every block's factors: each is put back, and the next block is fed the closed form's
    # outputs (computed again: the outputs of the refinement's last pass are of the discarded factors)
    plain, wrecked = build_model("llama"), build_model("llama")
    compress_model(plain, ids(), CompressConfig(alloc="uniform", ratio=0.4, batch_size=4, refine_steps=0))
    result = compress_model(wrecked, ids(), CompressConfig(alloc="uniform", ratio=0.4, batch_size=4, refine_steps=3,
                                                           refine_lr=1e3, refine_batch=2))
    assert all(not layer.info["refine"]["kept"] for layer in result.layers)
    expected = plain.state_dict()
    assert all(torch.equal(expected[n], t) for n, t in wrecked.state_dict().items())


def test_refinement_is_seeded():
    outputs = []
    for batch in (4, 4, 2, 2):
        model = build_model("llama")
        compress_model(model, ids(), CompressConfig(alloc="uniform", ratio=0.4, batch_size=4, refine_steps=6,
                                                    refine_lr=1e-3, refine_batch=batch))
        outputs.append({n: t.clone() for n, t in model.state_dict().items()})
    same = [all(torch.equal(a[n], b[n]) for n in a) for a, b in itertools.pairwise(outputs)]
    assert same == [True, False, True]  # reruns agree; micro-batches of 2 windows are other steps


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "modernbert", "t5", "whisper"])
def test_a_micro_batch_is_run_with_the_arguments_of_its_windows(model_type):
    """Refinement's micro-batches (--refine-batch) run a block on some windows of a batch, with arguments the
    capture recorded for that size (masks, rotary tables, sliding windows, T5's position bias, a decoder's
    cross-attention memory sliced to the same windows): each piece's output equals those rows of the whole batch's."""
    from lowrank.compression.capture import capture_block_inputs
    from lowrank.compression.refine import hidden_states, micro_batch_sizes, micro_batches
    from lowrank.compression.targets import is_encoder_decoder, select_targets, stack_names

    model = archs.build(model_type)
    data = archs.calibration_ids(model_type=model_type)
    sizes = [4, 4]  # 8 windows in batches of 4, pieces of 3: [0:3] and [3:4] of each batch
    pieces = micro_batches(sizes, 3)
    assert [(i, r.start, r.stop) for i, r in pieces] == [(0, 0, 3), (0, 3, 4), (1, 0, 3), (1, 3, 4)]
    checked = 0
    for stack in stack_names(select_targets(model)[0]):
        blocks = model.get_submodule(stack)
        states, extras = capture_block_inputs(model, blocks, data, 4, "cpu", run_blocks=is_encoder_decoder(model),
                                              also_sizes=micro_batch_sizes(sizes, 3))
        assert len(states) == 2 and [s.shape[0] for s in states] == sizes  # the probe batches are not kept
        with torch.no_grad():
            for index, block in enumerate(blocks):
                whole = [hidden_states(block(x, *args, **kwargs))
                         for batch, x in enumerate(states) for args, kwargs in [extras[index].of(batch, 4, "cpu")]]
                for batch, rows in pieces:
                    args, kwargs = extras[index].of(batch, rows.stop - rows.start, "cpu", rows)
                    piece = hidden_states(block(states[batch][rows], *args, **kwargs))
                    torch.testing.assert_close(piece, whole[batch][rows], rtol=1e-4, atol=1e-5)
                    checked += 1
                states = whole
    assert checked == 4 * sum(len(model.get_submodule(stack)) for stack in stack_names(select_targets(model)[0]))


@pytest.mark.parametrize("steps", [0, 4])
def test_blocks_without_targets_are_walked_through(steps):
    """--targets naming one block: the others have nothing to factorize and are only run (their statistics pass
    has no hooks; with the default --refine-target model the original stream runs beside them too)."""
    model = build_model("llama")
    dense = build_model("llama")
    result = compress_model(model, ids(), CompressConfig(alloc="uniform", ratio=0.4, batch_size=4, refine_steps=steps,
                                                         targets=["model.layers.0.*"]))
    assert result.layers and all(layer.name.startswith("model.layers.0.") for layer in result.layers)
    later = [n for n in dense.state_dict() if n.startswith(("model.layers.1.", "model.layers.2."))]
    assert later and all(torch.equal(model.state_dict()[n], dense.state_dict()[n]) for n in later)


def test_refine_batch_is_checked():
    with pytest.raises(UsageError, match="--refine-batch"):
        CompressConfig(refine_batch=0)
    with pytest.raises(UsageError, match="--refine-batch .9. cannot exceed --batch-size .8."):
        CompressConfig(refine_batch=9)


# model: the resumed run rebuilds the original stream too; micro-batches: the capture's extra sizes too
@pytest.mark.parametrize("target, batch", [("block", ["--refine-batch", "2"]), ("model", [])])
def test_refined_output_is_the_same_on_a_rerun_and_after_sigkill_and_resume(deep_llama, calib_file, tmp_path, target,
                                                                             batch):
    refine = ["--alloc", "uniform", "--refine-steps", "6", "--refine-lr", "1e-3", "--refine-target", target, *batch]
    straight, again = str(tmp_path / "a" / "out"), str(tmp_path / "b" / "out")
    for out in (straight, again):
        os.makedirs(os.path.dirname(out))
        subprocess.run(compress_command(deep_llama, out, calib_file, *refine), check=True, timeout=600)
    assert every_file(straight) == every_file(again)
    with open(os.path.join(straight, "config.json")) as f:
        settings = json.load(f)["lowrank"]["settings"]
    # --refine-batch unset: 64-token windows, 8 a step for 512 tokens, capped at the batch of 4
    assert (settings["refine_steps"], settings["refine_batch"]) == (6, 2 if batch else 4)
    plain = str(tmp_path / "plain")
    subprocess.run(compress_command(deep_llama, plain, calib_file, "--alloc", "uniform", "--refine-steps", "0"),
                   check=True, timeout=600)
    weights = [name for name in os.listdir(plain) if name.endswith(".safetensors")]
    assert any(open(os.path.join(plain, n), "rb").read() != open(os.path.join(straight, n), "rb").read()
               for n in weights)  # refinement changed the bytes: the comparisons above test it

    out = str(tmp_path / "out")
    command = compress_command(deep_llama, out, calib_file, *refine)
    code, _ = run_until(command, out, 6, signal.SIGKILL)
    assert code == -signal.SIGKILL and not os.path.exists(out)
    assert 6 <= journal_blocks(out) < 16
    done = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert every_file(out) == every_file(straight)


def test_the_default_refines_whitening_in_one_process_and_nothing_else():
    # steps of at least AUTO_REFINE_TOKENS tokens (one 512-token window; four of 128), as many steps as read
    # AUTO_REFINE_PASSES batches' worth of windows
    assert AUTO_REFINE_TOKENS == 512
    assert resolve_refine(CompressConfig(), distributed=False, window=512) == (AUTO_REFINE_PASSES * 8, 1, None)
    assert resolve_refine(CompressConfig(), distributed=False, window=2048) == (AUTO_REFINE_PASSES * 8, 1, None)
    assert resolve_refine(CompressConfig(), distributed=False, window=128) == (AUTO_REFINE_PASSES * 2, 4, None)
    assert resolve_refine(CompressConfig(), distributed=False, window=48) == (AUTO_REFINE_PASSES, 8, None)  # a batch
    assert resolve_refine(CompressConfig(batch_size=4, refine_batch=2), distributed=False) == (
        AUTO_REFINE_PASSES * 2, 2, None)  # the same windows read, two a step
    assert resolve_refine(CompressConfig(refine_steps=5), distributed=False, window=256) == (5, 2, None)
    assert resolve_refine(CompressConfig(), distributed=False) == (None, None, None)  # waits for the windows
    assert resolve_refine(CompressConfig(refine_steps=5), distributed=False) == (5, None, None)
    steps, _, why = resolve_refine(CompressConfig(), distributed=True)
    assert steps == 0 and "torchrun" in why  # said, not silent
    assert resolve_refine(CompressConfig(method="svd"), distributed=False) == (0, None, None)  # the papers' baselines
    assert resolve_refine(CompressConfig(refine_steps=0), distributed=False) == (0, None, None)
    steps, _, why = resolve_refine(CompressConfig(experts="shared-basis"), distributed=False)
    assert steps == 0 and "shared" in why  # it trains per-layer factors, not a basis that experts share
    with pytest.raises(UsageError, match="--refine-steps"):
        CompressConfig(experts="shared-basis", refine_steps=4)
    assert CompressConfig().refine_lr == 6e-4  # the rate the protocol measured (BENCHMARKS.md)


def test_the_default_compress_refines_and_records_it():
    model = build_model("llama")
    result = compress_model(model, ids(), CompressConfig(alloc="uniform", ratio=0.4, batch_size=4))
    # 48-token windows: a step of 512 tokens would be 11 windows, capped at the batch of 4
    assert (result.config.refine_steps, result.config.refine_batch) == (AUTO_REFINE_PASSES, 4)
    refined = [layer.info["refine"] for layer in result.layers if "refine" in layer.info]
    assert len(refined) == len(result.layers)
    assert all(r["loss_after"] <= r["loss_before"] for r in refined)
    assert any(r["kept"] and r["loss_after"] < r["loss_before"] for r in refined)


def last_block_output(model, input_ids):
    """The last decoder block's output over the calibration windows, in float64."""
    seen = []
    block = model.model.layers[-1]
    handle = block.register_forward_hook(lambda module, args, out: seen.append(out[0] if isinstance(out, tuple)
                                                                               else out))
    try:
        with torch.no_grad():
            model(input_ids)
    finally:
        handle.remove()
    return seen[0].double()


@pytest.mark.parametrize("target", ["model", "block"])
def test_refine_target_is_what_the_loss_measures(target):
    """--refine-target model fits the original MODEL's outputs: the last block's reported loss is the compressed
    model's whole error there against the dense model. --refine-target block fits the original block fed the
    compressed stream, which leaves out what earlier blocks got wrong: its loss is below that whole error."""
    reference = last_block_output(build_model("llama"), ids())
    model = build_model("llama")
    result = compress_model(model, ids(), CompressConfig(alloc="uniform", ratio=0.4, batch_size=4, refine_steps=12,
                                                         refine_lr=1e-3, refine_target=target))
    last = next(layer.info["refine"] for layer in result.layers if layer.name.startswith("model.layers.2."))
    out = last_block_output(model, ids())
    whole = float((out - reference).square().sum() / reference.square().sum())
    if target == "model":
        assert last["loss_after"] == pytest.approx(whole, rel=1e-3)
        assert last["kept"] and last["loss_after"] < last["loss_before"]
    else:
        assert last["loss_after"] < 0.9 * whole


def test_refine_target_is_checked():
    with pytest.raises(UsageError, match="--refine-target"):
        CompressConfig(refine_target="stream")

