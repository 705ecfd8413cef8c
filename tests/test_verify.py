"""compress's verdict on held-out text (compression/verify.py), the held-out windows, and self-calibration.

The verdict's numbers are checked against lowrank's evaluation code (evaluation/perplexity.py, an independent
implementation that keeps the full logits): same perplexities, same top-1 agreement, and a KL that is the
documented lower bound of the exact one.
"""

import json
import os

import pytest
import torch
from conftest import COMPRESS_FAST, build_model, run

import lowrank
from lowrank.calibration import draw_windows, held_out_count, load_calibration
from lowrank.calibration.selfgen import batch_size_for, generate
from lowrank.compression import verify


def test_held_out_windows_are_disjoint_and_do_not_change_the_calibration():
    stream = torch.arange(64 * 40)
    alone = draw_windows(stream, 10, 64, seed=3, source="s")
    chosen, held = draw_windows(stream, 10, 64, seed=3, source="s", held_out=6)
    assert torch.equal(alone, chosen) and held.shape == (6, 64)
    starts = {int(w[0]) for w in chosen}
    assert not starts & {int(w[0]) for w in held}  # windows are non-overlapping: disjoint starts, disjoint text
    assert held_out_count(2048) == 1 and held_out_count(256) == 8 and held_out_count(16) == 16


def test_a_calibration_that_uses_every_window_has_no_held_out_text(tokenizer, calib_file):
    model = build_model("llama")
    available = load_calibration(calib_file, model, tokenizer, 1, 64).provenance["stream_tokens"] // 64
    data = load_calibration(calib_file, model, tokenizer, available, 64)
    assert data.held_out is None


def test_self_generation_is_one_batch_and_reproducible():
    model = build_model("llama")
    ticks = []

    class Recorder(lowrank.progress.Progress):
        def advance(self, stage, detail=""):
            ticks.append(detail)

    first = generate(model, 5, 17, seed=7, progress=Recorder())
    assert first.shape == (5, 17) and (first[:, 0] == model.config.bos_token_id).all()
    assert torch.equal(first, generate(model, 5, 17, seed=7))  # same seed, same windows
    assert not torch.equal(first, generate(model, 5, 17, seed=8))
    assert ticks and ticks[-1].startswith("80/80 tokens sampled")  # progress counts every sampled token
    assert batch_size_for(model.config, 5, 17) == 5  # one batched generation
    # a huge request is split into batches by a fixed KV budget (so that the seed decides the windows everywhere)
    assert batch_size_for(model.config, 10**6, 4096) < 10**6


def test_self_calibration_sets_rows_aside_for_the_verdict(tokenizer):
    model = build_model("llama")
    data = load_calibration("self", model, tokenizer, 8, 16, seed=4)
    rows = generate(model, 8 + 2, 16, seed=4)  # a quarter of the calibration rows at most: they cost generation
    assert torch.equal(data.input_ids, rows[:8]) and torch.equal(data.held_out, rows[8:])


@pytest.fixture(scope="module")
def verified(tmp_path_factory, llama_dir, calib_file):
    out = str(tmp_path_factory.mktemp("verify") / "out")
    report = lowrank.compress(llama_dir, out, ratio=0.5, calib=calib_file, **COMPRESS_FAST)
    return out, report


def test_the_verdict_agrees_with_the_evaluation_code(verified, llama_dir, calib_file, tokenizer):
    from lowrank.evaluation.perplexity import score

    out, report = verified
    numbers = report["verify"]
    held = load_calibration(calib_file, build_model("llama"), tokenizer, COMPRESS_FAST["num_samples"],
                            COMPRESS_FAST["seq_len"]).held_out
    original = lowrank.io.loading.load_model(lowrank.io.loading.resolve_model(llama_dir))[0]
    exact = score(lowrank.load_pretrained(out).eval(), held, baseline=original, batch_size=4)
    assert numbers["tokens_scored"] == exact["tokens_scored"] == held[:, 1:].numel()
    assert numbers["perplexity_original"] == pytest.approx(exact["baseline"]["perplexity"], rel=1e-5)
    assert numbers["perplexity_compressed"] == pytest.approx(exact["perplexity"], rel=1e-5)
    assert numbers["top1_agreement"] == pytest.approx(exact["agreement"]["top1"], abs=2 / exact["tokens_scored"])
    assert 0 <= numbers["kl_mean"] <= exact["agreement"]["kl_mean"] * (1 + 1e-4) + 1e-7
    assert numbers["verdict"] == verify.verdict(numbers)
    with open(os.path.join(out, "compression_report.json")) as f:
        assert json.load(f)["verify"]["perplexity_compressed"] == numbers["perplexity_compressed"]


def test_no_verify_writes_the_same_weights_and_says_why_there_is_no_verdict(verified, llama_dir, calib_file,
                                                                             tmp_path):
    out, _ = verified
    report = lowrank.compress(llama_dir, str(tmp_path / "nv"), ratio=0.5, calib=calib_file, verify=False,
                              **COMPRESS_FAST)
    assert report["verify"] == {"skipped": "--no-verify"}
    with open(os.path.join(out, "model.safetensors"), "rb") as a, open(tmp_path / "nv" / "model.safetensors",
                                                                          "rb") as b:
        assert a.read() == b.read()


def sharp_llama(directory, tokenizer):
    """The tiny Llama with a 30x untied LM head: peaked next-token distributions that a damaged model changes
    (the random model's are nearly uniform, so that even keep 0.05 leaves its top-1 choices alone)."""
    model = build_model("llama")
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone() * 30)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def test_a_damaged_model_gets_a_warning_and_a_ratio_to_try(tokenizer, calib_file, tmp_path, capsys):
    code, _, err = run(["compress", sharp_llama(tmp_path / "sharp", tokenizer), "--ratio", "0.05", "--alloc", "global", "--min-rank-fraction", "0",
                        "--calib", calib_file, "--num-samples", "8", "--seq-len", "64", "-o", str(tmp_path / "o")],
                       capsys)
    assert code == 0, err
    with open(tmp_path / "o" / "compression_report.json") as f:
        numbers = json.load(f)["verify"]
    assert numbers["verdict"] != "ok"
    assert numbers["warning"] in err and "--ratio 0.05" in numbers["warning"]
    if numbers["suggested_ratio"] is not None:
        assert 0.05 < numbers["suggested_ratio"] < 1 and f"--ratio {numbers['suggested_ratio']:g}" in err


def test_verdict_limits():
    base = {"top1_agreement": 0.9, "perplexity_ratio": 1.1}
    assert verify.verdict(base) == "ok"
    assert verify.verdict({**base, "perplexity_ratio": 2.0}) == "degraded"
    assert verify.verdict({**base, "top1_agreement": 0.6}) == "degraded"
    assert verify.verdict({**base, "perplexity_ratio": 3.5}) == "damaged"
    assert verify.verdict({**base, "top1_agreement": 0.3}) == "damaged"


def test_suggested_ratio_scales_the_loss_curve_to_the_measured_rise():
    def curve(ratio):
        return (1 - ratio) ** 2

    # measured rise 2.0 nats at 0.5 (curve 0.25): scale 8; acceptable below log(1.5) = 0.405 -> (1-r)^2 <= 0.0507
    assert verify.suggest_ratio(0.5, 2.0, curve) == 0.8
    assert verify.suggest_ratio(0.5, 100.0, curve) is None  # nothing below 1.0 is predicted to be acceptable
    assert verify.suggest_ratio(0.5, -0.1, curve) is None  # no measured rise: nothing to scale
