import json

import pytest
import torch
from conftest import build_model

from lowrank.calibration import draw_windows, load_calibration, tokenize_stream
from lowrank.errors import LowrankError, UsageError
from lowrank.progress import Progress


@pytest.fixture(scope="module")
def llama():
    return build_model("llama")


def test_windows_are_reproducible_and_non_overlapping():
    stream = torch.arange(1000)
    a = draw_windows(stream, 10, 50, seed=3, source="x")
    b = draw_windows(stream, 10, 50, seed=3, source="x")
    c = draw_windows(stream, 10, 50, seed=4, source="x")
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a[:, 0] % 50 == 0).all() and len(set(a[:, 0].tolist())) == 10  # whole, distinct windows
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(10, 49, dtype=a.dtype))


def test_too_little_text_is_an_error():
    with pytest.raises(LowrankError, match="needs 1,000"):
        draw_windows(torch.arange(999), 10, 100, seed=0, source="tiny.txt")


def test_text_file(llama, tokenizer, calib_file, calib_text):
    data = load_calibration(calib_file, llama, tokenizer, 8, 32, seed=1)
    assert data.input_ids.shape == (8, 32) and data.input_ids.dtype == torch.long
    p = data.provenance
    assert p["kind"] == "local" and p["num_samples"] == 8 and p["seq_len"] == 32 and p["seed"] == 1
    stream, digest = tokenize_stream([calib_text], tokenizer)
    assert p["sha256_text"] == digest and p["stream_tokens"] == stream.numel()


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "csv"])
def test_structured_files(llama, tokenizer, tmp_path, calib_text, fmt):
    rows = [{"id": i, "body": paragraph} for i, paragraph in enumerate(calib_text.split("\n\n")[:400])]
    path = tmp_path / f"data.{fmt}"
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps(row) for row in rows))
    else:
        import datasets

        dataset = datasets.Dataset.from_list(rows)
        dataset.to_parquet(str(path)) if fmt == "parquet" else dataset.to_csv(str(path))
    data = load_calibration(str(path), llama, tokenizer, 4, 32)  # "body" is the only text column
    assert data.provenance["text_column"] == "body" and data.input_ids.shape == (4, 32)


def test_explicit_text_column(llama, tokenizer, tmp_path, calib_text):
    path = tmp_path / "data.jsonl"
    paragraphs = calib_text.split("\n\n")[:300]
    path.write_text("\n".join(json.dumps({"a": p, "b": p.upper()}) for p in paragraphs))
    with pytest.raises(UsageError, match="pass --text-column"):
        load_calibration(str(path), llama, tokenizer, 4, 32)
    assert load_calibration(str(path), llama, tokenizer, 4, 32, text_column="b").provenance["text_column"] == "b"


def test_self_generation_is_seeded(llama, tokenizer):
    a = load_calibration("self", llama, tokenizer, 3, 20, seed=5)
    b = load_calibration("self", llama, tokenizer, 3, 20, seed=5)
    assert a.input_ids.shape == (3, 20) and torch.equal(a.input_ids, b.input_ids)
    assert (a.input_ids[:, 0] == llama.config.bos_token_id).all()
    assert a.provenance["source"] == "self"


def test_auto_falls_back_to_self_offline(llama, tokenizer, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    messages = []

    class Log(Progress):
        def log(self, message):
            messages.append(message)

    data = load_calibration("auto", llama, tokenizer, 2, 16, progress=Log())
    assert data.provenance["source"] == "self" and data.provenance["requested"] == "auto"
    assert messages and "self" in messages[0]


def test_bad_requests(llama, tokenizer, tmp_path):
    with pytest.raises(UsageError, match="exceeds the model's maximum"):
        load_calibration("self", llama, tokenizer, 2, 10_000)
    with pytest.raises(LowrankError, match="could not load calibration"):
        load_calibration(str(tmp_path / "missing") + "/nope:cfg", llama, tokenizer, 2, 16)
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    with pytest.raises(LowrankError, match="no text"):
        load_calibration(str(empty), llama, tokenizer, 2, 16)
