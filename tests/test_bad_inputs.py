"""Bad input, one row each: every command refuses it with one line, the right exit code, nothing written and the
input untouched.

ROWS is data: bench/bad_inputs_table.py runs this test with LOWRANK_BAD_INPUTS_RECORD set and renders what each
row actually printed into docs/bad-inputs.md, so the published table is always a real run. A row's argv names its
inputs as {placeholders}: {model} (a tiny Llama checkpoint), {calib} (a calibration text file), {adapter} (a PEFT
LoRA adapter of it), {checkpoint} (a lowrank checkpoint of it), {out} (where an output would go, never created),
{tmp} (the row's own directory, also the working directory), and whatever the row's setup makes (usually {bad}).
"""

import json
import os
import random
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from conftest import COMPRESS_FAST, assert_clean_failure, build_model, run, tree_digest

FAST = ["--num-samples", "8", "--seq-len", "64", "--batch-size", "4"]
NEVER_PRINTED = "this line is printed only if the pickle was unpickled"


class Forbidden:
    """Pickles as a call to builtins.print: a global torch's weights-only loader refuses. Loading the file with a
    full unpickler would print NEVER_PRINTED; lowrank must never do that."""

    def __reduce__(self):
        return (print, (NEVER_PRINTED,))


# --- what the setups make (each returns {placeholder: path}) -------------------------------------------------------

def garbage_bytes(size=4096):
    # starts with bytes that are never valid UTF-8, then noise (seeded: the same file every run)
    return b"\x80\xfe\xff\x00" + random.Random(0).randbytes(size)


def write(name, data):
    def setup(tmp, fx):
        path = tmp / name
        path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
        return {"bad": str(path)}

    return setup


def empty_dir(tmp, fx):
    (tmp / "empty").mkdir()
    return {"bad": str(tmp / "empty")}


def weightless_model(tmp, fx):
    """A checkpoint directory whose weights were never copied: config.json and the tokenizer only."""
    bad = tmp / "weightless"
    shutil.copytree(fx.model, bad, ignore=shutil.ignore_patterns("*.safetensors"))
    return {"bad": str(bad)}


def damaged_model(damage):
    def setup(tmp, fx):
        bad = tmp / "damaged"
        shutil.copytree(fx.model, bad)
        damage(bad / "model.safetensors")
        return {"bad": str(bad)}

    return setup


def empty_file(path):
    path.write_bytes(b"")


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)


def header_not_json(path):
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"{not json at all")


def wrong_offsets(path):
    """A header that fits the file but whose offsets do not fit a tensor's shape (a half-written header)."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    key = min(k for k in header if k != "__metadata__")
    start, _ = header[key]["data_offsets"]
    header[key]["data_offsets"] = [start, start + 4]
    blob = json.dumps(header, separators=(",", ":")).encode()
    path.write_bytes(raw[:8] + blob + b" " * (length - len(blob)) + raw[8 + length :])


def bad_config(tmp, fx):
    bad = tmp / "bad-config"
    shutil.copytree(fx.model, bad)
    (bad / "config.json").write_text("{")
    return {"bad": str(bad)}


def pickle_model(tmp, fx):
    """A .bin checkpoint holding more than tensors: torch's weights-only loader refuses it."""
    bad = tmp / "pickled"
    bad.mkdir()
    shutil.copy(os.path.join(fx.model, "config.json"), bad / "config.json")
    torch.save({"lm_head.weight": torch.zeros(2, 2), "extra": Forbidden()}, bad / "pytorch_model.bin")
    return {"bad": str(bad)}


def pickle_adapter(tmp, fx):
    bad = tmp / "pickled-adapter"
    bad.mkdir()
    shutil.copy(os.path.join(fx.adapter, "adapter_config.json"), bad / "adapter_config.json")
    torch.save({"extra": Forbidden()}, bad / "adapter_model.bin")
    return {"bad": str(bad)}


def damaged_adapter(damage):
    def setup(tmp, fx):
        bad = tmp / "adapter"
        shutil.copytree(fx.adapter, bad)
        damage(bad / "adapter_model.safetensors")
        return {"bad": str(bad)}

    return setup


def adapter_config_text(text):
    def setup(tmp, fx):
        bad = tmp / "adapter"
        shutil.copytree(fx.adapter, bad)
        path = bad / "adapter_config.json"
        path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
        return {"bad": str(bad)}

    return setup


def damaged_checkpoint(damage):
    def setup(tmp, fx):
        bad = tmp / "checkpoint"
        shutil.copytree(fx.checkpoint, bad)
        damage(bad / "model.safetensors")
        return {"bad": str(bad)}

    return setup


def existing_output(tmp, fx):
    (tmp / "taken").mkdir()
    (tmp / "taken" / "keep.txt").write_text("mine")
    return {"bad": str(tmp / "taken")}


def report_json(value):
    return write("report.json", json.dumps(value))


# --- the table ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    name: str  # the test id
    description: str  # the bad input, in words (the table's first column)
    argv: tuple  # the command line, with {placeholders}
    code: int  # the exit code
    fragment: str  # a piece of the one error line
    setup: Callable | None = None  # makes the bad input in the row's directory: setup(tmp, fx) -> {name: path}


COMPRESS = ("compress", "{model}", "-o", "{out}", "--calib", "{calib}", *FAST)
COMPENSATE = ("compensate", "{model}", "{model_copy}", "--rank", "4", "-o", "{out}", "--calib", "{calib}", *FAST)
EVAL = ("eval", "{model}", "--no-speed", "--data", "{calib}", "--seq-len", "64", "--max-tokens", "128", "-o",
        "{out}.json")


def model_copy(tmp, fx):
    """A second, distinct model directory, so that compensate's own checks are the ones that fail."""
    shutil.copytree(fx.model, tmp / "copy")
    return {"model_copy": str(tmp / "copy")}


def with_copy(setup):
    def both(tmp, fx):
        return {**model_copy(tmp, fx), **(setup(tmp, fx) if setup else {})}

    return both


ROWS = [
    # compress: the model
    Row("compress-missing", "model path that does not exist", ("compress", "{tmp}/nope", "-o", "{out}"), 2,
        "no such file"),
    Row("compress-empty-dir", "an empty directory as the model", ("compress", "{bad}", "-o", "{out}"), 2,
        "not a model directory", empty_dir),
    Row("compress-text-file", "a text file as the model", ("compress", "{bad}", "-o", "{out}"), 2, "is a file",
        write("notes.txt", "not a model")),
    Row("compress-no-weights", "config.json but no weight files", ("compress", "{bad}", "-o", "{out}"), 2,
        "has a config.json but no weights: looked for model.safetensors", weightless_model),
    Row("compress-bad-config", "config.json that is not JSON", ("compress", "{bad}", "-o", "{out}"), 1,
        "config.json is not valid JSON", bad_config),
    Row("compress-empty-safetensors", "an empty (0-byte) model.safetensors",
        ("compress", "{bad}", "-o", "{out}"), 1, "is not a safetensors file", damaged_model(empty_file)),
    Row("compress-truncated", "a truncated model.safetensors", ("compress", "{bad}", "-o", "{out}"), 1,
        "is truncated", damaged_model(truncate)),
    Row("compress-header-not-json", "a safetensors header that is not JSON", ("compress", "{bad}", "-o", "{out}"),
        1, "its header is not valid JSON", damaged_model(header_not_json)),
    Row("compress-wrong-offsets", "a safetensors header whose offsets do not fit the tensor",
        ("compress", "{bad}", "-o", "{out}", "--calib", "{calib}", *FAST), 1,
        "model.safetensors is corrupt: the header's entry for", damaged_model(wrong_offsets)),
    Row("compress-refused-pickle", "a pytorch_model.bin holding objects other than tensors",
        ("compress", "{bad}", "-o", "{out}", "--calib", "{calib}", *FAST), 2,
        "lowrank never unpickles arbitrary objects; convert the checkpoint to safetensors", pickle_model),
    Row("compress-factorized", "a lowrank checkpoint as the model to compress",
        ("compress", "{checkpoint}", "-o", "{out}", "--calib", "{calib}", *FAST), 2,
        "already a lowrank factorized checkpoint"),
    # compress: the options
    Row("compress-ratio-zero", "--ratio 0", (*COMPRESS, "--ratio", "0"), 2, "--ratio must be in (0, 1]"),
    Row("compress-ratio-big", "--ratio 1.5", (*COMPRESS, "--ratio", "1.5"), 2, "--ratio must be in (0, 1]"),
    Row("compress-ratio-text", "--ratio abc (not a number)", (*COMPRESS, "--ratio", "abc"), 2,
        "Invalid value for '--ratio'"),
    Row("compress-unknown-option", "an option that does not exist (--ratoi 0.5)", (*COMPRESS, "--ratoi", "0.5"), 2,
        "No such option: --ratoi"),
    Row("compress-no-model", "no model given", ("compress", "-o", "{out}"), 2,
        "Missing argument 'model' (see lowrank compress --help)"),
    Row("compress-option-no-value", "an option without its value (--ratio at the end)", (*COMPRESS, "--ratio"), 2,
        "Option '--ratio' requires an argument (see lowrank compress --help)"),
    Row("compress-method", "--method magic", (*COMPRESS, "--method", "magic"), 2, "unknown method"),
    Row("compress-alloc", "--alloc magic", (*COMPRESS, "--alloc", "magic"), 2, "unknown allocation 'magic'"),
    Row("compress-dtype", "--dtype int8", (*COMPRESS, "--dtype", "int8"), 2, "--dtype must be one of"),
    Row("compress-device", "--device tpu", (*COMPRESS, "--device", "tpu"), 2, "unknown device 'tpu'"),
    Row("compress-num-samples", "--num-samples 0", (*COMPRESS, "--num-samples", "0"), 2,
        "--num-samples must be a whole number of at least 1"),
    Row("compress-num-samples-text", "--num-samples many (not a number)", (*COMPRESS, "--num-samples", "many"), 2,
        "Invalid value for '--num-samples'"),
    Row("compress-seq-len", "--seq-len 1", (*COMPRESS, "--seq-len", "1"), 2,
        "--seq-len must be a whole number of at least 2"),
    Row("compress-batch-size", "--batch-size 0", (*COMPRESS, "--batch-size", "0"), 2,
        "--batch-size must be a whole number of at least 1"),
    Row("compress-damp", "--damp -1", (*COMPRESS, "--damp", "-1"), 2, "--damp must be a finite number at least 0"),
    Row("compress-damp-nan", "--damp nan", (*COMPRESS, "--damp", "nan"), 2, "--damp must be a finite number"),
    Row("compress-refine-lr", "--refine-lr 0", (*COMPRESS, "--refine-lr", "0"), 2,
        "--refine-lr must be a finite number above 0"),
    Row("compress-refine-batch", "--refine-batch 5 (above --batch-size 4)", (*COMPRESS, "--refine-batch", "5"), 2,
        "--refine-batch (5) cannot exceed --batch-size (4)"),
    Row("compress-min-rank-fraction", "--min-rank-fraction 2", (*COMPRESS, "--min-rank-fraction", "2"), 2,
        "--min-rank-fraction must be in [0, 1]"),
    Row("compress-stream", "--stream maybe", (*COMPRESS, "--stream", "maybe"), 2, "--stream must be auto, on or off"),
    Row("compress-shard-zero", "--max-shard-size 0", (*COMPRESS, "--max-shard-size", "0"), 2,
        "--max-shard-size must be at least one byte"),
    Row("compress-shard-text", "--max-shard-size big", (*COMPRESS, "--max-shard-size", "big"), 2,
        "cannot read size 'big'"),
    Row("compress-shard-dots", "--max-shard-size 1.2.3", (*COMPRESS, "--max-shard-size", "1.2.3"), 2,
        "cannot read size '1.2.3'"),
    Row("compress-offload-budget", "--offload-budget lots", (*COMPRESS, "--offload-budget", "lots"), 2,
        "cannot read size 'lots'"),
    Row("compress-output-exists", "an output directory that already exists", (*COMPRESS[:3], "{bad}", *COMPRESS[4:]),
        2, "already exists", existing_output),
    Row("compress-output-inside", "an output inside the input", (*COMPRESS[:3], "{model}/sub", *COMPRESS[4:]), 2,
        "overlaps the input"),
    Row("compress-no-target", "--targets that match no layer", (*COMPRESS, "--targets", "re:.*nothing.*"), 2,
        "no linear layer matches"),
    # compress: the calibration data
    Row("calib-missing-relative", "--calib ./nofile.txt (does not exist)", (*COMPRESS[:4], "--calib", "./nofile.txt",
        *FAST), 2, "no such file: ./nofile.txt"),
    Row("calib-missing-bare", "--calib nofile.jsonl (a file name that does not exist)",
        (*COMPRESS[:4], "--calib", "nofile.jsonl", *FAST), 2, "no such file: nofile.jsonl"),
    Row("calib-missing-folder", "--calib data/calib/train (a path that does not exist)",
        (*COMPRESS[:4], "--calib", "data/calib/train", *FAST), 2, "no such file: data/calib/train"),
    Row("calib-binary-txt", "--calib of binary garbage (.txt)", (*COMPRESS[:4], "--calib", "{bad}", *FAST), 2,
        "garbage.txt is not UTF-8 text", write("garbage.txt", garbage_bytes())),
    Row("calib-binary-json", "--calib of binary garbage (.jsonl)", (*COMPRESS[:4], "--calib", "{bad}", *FAST), 2,
        "garbage.jsonl is not UTF-8 text", write("garbage.jsonl", garbage_bytes())),
    Row("calib-bad-json", "--calib .json that is not JSON records", (*COMPRESS[:4], "--calib", "{bad}", *FAST), 2,
        "bad.json is not valid JSON", write("bad.json", "3\n")),
    Row("calib-bad-parquet", "--calib .parquet that is not parquet", (*COMPRESS[:4], "--calib", "{bad}", *FAST), 2,
        "garbage.parquet is not a parquet file", write("garbage.parquet", garbage_bytes())),
    Row("calib-empty", "--calib of an empty file", (*COMPRESS[:4], "--calib", "{bad}", *FAST), 2,
        "empty.txt is empty", write("empty.txt", b"")),
    Row("calib-blank", "--calib of a file with only blank lines", (*COMPRESS[:4], "--calib", "{bad}", *FAST), 2,
        "has no text", write("blank.txt", "  \n\n \n")),
    Row("calib-too-little", "--calib with too little text for the windows asked",
        (*COMPRESS[:4], "--calib", "{bad}", *FAST), 1, "gives 12 tokens, but --num-samples 8 x --seq-len 64 needs 512",
        write("short.txt", "Just a few words.")),
    # squeeze
    Row("squeeze-missing", "adapter path that does not exist", ("squeeze", "{tmp}/nope", "--rank", "2", "-o",
        "{out}"), 2, "no such file"),
    Row("squeeze-empty-dir", "an empty directory as the adapter", ("squeeze", "{bad}", "--rank", "2", "-o", "{out}"),
        2, "not a PEFT adapter directory", empty_dir),
    Row("squeeze-budget-text", "--budget abc", ("squeeze", "{adapter}", "--budget", "abc", "-o", "{out}"), 2,
        "cannot read --budget 'abc'"),
    Row("squeeze-budget-zero", "--budget 0", ("squeeze", "{adapter}", "--budget", "0", "-o", "{out}"), 2,
        "--budget must be a fraction in (0, 1] or a whole parameter count"),
    Row("squeeze-budget-big-fraction", "--budget 1.5", ("squeeze", "{adapter}", "--budget", "1.5", "-o", "{out}"),
        2, "--budget must be a fraction in (0, 1] or a whole parameter count"),
    Row("squeeze-budget-zero-count", "--budget 0M", ("squeeze", "{adapter}", "--budget", "0M", "-o", "{out}"), 2,
        "--budget 0M keeps no parameters"),
    Row("squeeze-rank-zero", "--rank 0", ("squeeze", "{adapter}", "--rank", "0", "-o", "{out}"), 2,
        "--rank must be at least 1"),
    Row("squeeze-rank-text", "--rank two (not a number)", ("squeeze", "{adapter}", "--rank", "two", "-o", "{out}"),
        2, "Invalid value for '--rank'"),
    Row("squeeze-energy", "--energy 1.5", ("squeeze", "{adapter}", "--energy", "1.5", "-o", "{out}"), 2,
        "--energy must be in (0, 1]"),
    Row("squeeze-algorithm", "--algorithm magic", ("squeeze", "{adapter}", "--rank", "2", "--algorithm", "magic",
        "-o", "{out}"), 2, "unknown algorithm 'magic'"),
    Row("squeeze-dtype", "--dtype int8", ("squeeze", "{adapter}", "--rank", "2", "--dtype", "int8", "-o", "{out}"),
        2, "unknown dtype 'int8'"),
    Row("squeeze-threads", "--threads 0", ("squeeze", "{adapter}", "--rank", "2", "--threads", "0", "-o", "{out}"),
        2, "--threads must be a whole number >= 1"),
    Row("squeeze-truncated", "a truncated adapter_model.safetensors", ("squeeze", "{bad}", "--rank", "2", "-o",
        "{out}"), 1, "is truncated", damaged_adapter(truncate)),
    Row("squeeze-header-not-json", "an adapter safetensors header that is not JSON",
        ("squeeze", "{bad}", "--rank", "2", "-o", "{out}"), 1, "its header is not valid JSON",
        damaged_adapter(header_not_json)),
    Row("squeeze-bad-config", "adapter_config.json that is not JSON", ("squeeze", "{bad}", "--rank", "2", "-o",
        "{out}"), 1, "adapter_config.json is not valid JSON", adapter_config_text("{")),
    Row("squeeze-config-binary", "adapter_config.json of binary garbage", ("squeeze", "{bad}", "--rank", "2", "-o",
        "{out}"), 1, "adapter_config.json is not UTF-8 text", adapter_config_text(garbage_bytes(64))),
    Row("squeeze-rank-pattern", "adapter_config.json whose rank_pattern is not {regex: rank}",
        ("squeeze", "{bad}", "--rank", "2", "-o", "{out}"), 2, "rank_pattern key '[' is not a regular expression",
        adapter_config_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "rank_pattern": {"[": 4}}))),
    Row("squeeze-refused-pickle", "an adapter_model.bin holding objects other than tensors",
        ("squeeze", "{bad}", "--rank", "2", "-o", "{out}"), 2, "lowrank never unpickles arbitrary objects",
        pickle_adapter),
    # compensate
    Row("compensate-same-dir", "the same model twice", ("compensate", "{model}", "{model}/", "--rank", "4", "-o",
        "{out}", "--calib", "{calib}", *FAST), 2, "are the same model: there is nothing to repair"),
    Row("compensate-missing", "a compressed model that does not exist", (*COMPENSATE[:2], "{tmp}/nope",
        *COMPENSATE[3:]), 2, "no such file"),
    Row("compensate-num-samples", "--num-samples 0", (*COMPENSATE, "--num-samples", "0"), 2,
        "--num-samples must be a whole number of at least 1", model_copy),
    Row("compensate-seq-len", "--seq-len 1", (*COMPENSATE, "--seq-len", "1"), 2,
        "--seq-len must be a whole number of at least 2", model_copy),
    Row("compensate-batch-size", "--batch-size 0", (*COMPENSATE, "--batch-size", "0"), 2,
        "--batch-size must be a whole number of at least 1", model_copy),
    Row("compensate-rank", "--rank 0", (*COMPENSATE, "--rank", "0"), 2, "--rank must be at least 1", model_copy),
    Row("compensate-damp", "--damp -1", (*COMPENSATE, "--damp", "-1"), 2, "--damp must be a finite number",
        model_copy),
    Row("compensate-dtype", "--dtype int8", (*COMPENSATE, "--dtype", "int8"), 2, "--dtype must be one of",
        model_copy),
    Row("compensate-calib-missing", "--calib ./nofile.txt", (*COMPENSATE[:7], "--calib", "./nofile.txt", *FAST), 2,
        "no such file: ./nofile.txt", model_copy),
    Row("compensate-calib-binary", "--calib of binary garbage", (*COMPENSATE[:7], "--calib", "{bad}", *FAST), 2,
        "garbage.txt is not UTF-8 text", with_copy(write("garbage.txt", garbage_bytes()))),
    # eval
    Row("eval-missing", "a model that does not exist", ("eval", "{tmp}/nope", *EVAL[2:]), 2, "no such file"),
    Row("eval-no-weights", "config.json but no weight files", ("eval", "{bad}", *EVAL[2:]), 2,
        "has a config.json but no weights", weightless_model),
    Row("eval-seq-len", "--seq-len 1", (*EVAL, "--seq-len", "1"), 2, "--seq-len must be at least 2"),
    Row("eval-batch-size", "--batch-size 0", (*EVAL, "--batch-size", "0"), 2, "--batch-size must be at least 1"),
    Row("eval-max-tokens", "--max-tokens 0", (*EVAL, "--max-tokens", "0"), 2, "--max-tokens must be at least 1"),
    Row("eval-limit", "--limit -1", (*EVAL, "--limit", "-1"), 2, "--limit must be a finite number above 0"),
    Row("eval-num-fewshot", "--num-fewshot -1", (*EVAL, "--num-fewshot", "-1"), 2,
        "--num-fewshot must be a whole number of at least 0"),
    Row("eval-device", "--device cuda:7 on a machine without CUDA", (*EVAL, "--device", "cuda:7"), 2,
        "CUDA is not available"),
    Row("eval-data-missing", "--data ./nofile.txt", (*EVAL[:3], "--data", "./nofile.txt", *EVAL[5:]), 2,
        "no such file"),
    Row("eval-data-binary", "--data of binary garbage", (*EVAL[:3], "--data", "{bad}", *EVAL[5:]), 2,
        "garbage.txt is not UTF-8 text", write("garbage.txt", garbage_bytes())),
    Row("eval-refused-pickle-adapter", "an --adapter whose adapter_model.bin holds objects other than tensors",
        (*EVAL, "--adapter", "{bad}"), 2, "adapter_model.bin: this PyTorch pickle holds Python objects other than "
        "tensors (it refers to print) and lowrank never unpickles arbitrary objects", pickle_adapter),
    Row("eval-baseline-adapter", "--baseline-adapter without --baseline", (*EVAL, "--baseline-adapter",
        "{adapter}"), 2, "--baseline-adapter needs --baseline"),
    Row("eval-output-dir", "--output that is a directory", (*EVAL[:-1], "{bad}"), 2, "is a directory", empty_dir),
    Row("eval-output-garbage", "--output that is an unreadable report", (*EVAL[:-1], "{bad}"), 3, "not UTF-8",
        write("report.json", garbage_bytes())),
    # report
    Row("report-missing", "a report that does not exist", ("report", "{tmp}/nope.json"), 2,
        "no such file or directory"),
    Row("report-binary", "a report of binary garbage", ("report", "{bad}"), 3, "not UTF-8",
        write("report.json", garbage_bytes())),
    Row("report-empty", "an empty report file", ("report", "{bad}"), 3, "report.json", write("report.json", b"")),
    Row("report-not-json", "a report that is not JSON", ("report", "{bad}"), 3, "report.json",
        write("report.json", "{")),
    Row("report-wrong-schema", "a JSON file that is not a lowrank report", ("report", "{bad}"), 3,
        "report.json", report_json({"hello": "world"})),
    Row("report-no-report", "a directory without a report", ("report", "{bad}"), 3, "empty", empty_dir),
    Row("report-gate-text", "--max-size lots", ("report", "{checkpoint}", "--max-size", "lots"), 2,
        "cannot read size 'lots'"),
    Row("report-three", "three reports", ("report", "{checkpoint}", "{checkpoint}", "{checkpoint}"), 2,
        "give one report, or two to compare"),
    Row("report-output-dir", "--output in a directory that does not exist", ("report", "{checkpoint}", "-o",
        "{tmp}/nowhere/out.md"), 2, "does not exist"),
    # densify
    Row("densify-missing", "a checkpoint that does not exist", ("densify", "{tmp}/nope", "-o", "{out}"), 2,
        "nope: no such file or directory"),
    Row("densify-dense", "a plain (not factorized) checkpoint", ("densify", "{model}", "-o", "{out}"), 2,
        "not a lowrank"),
    Row("densify-empty-dir", "an empty directory", ("densify", "{bad}", "-o", "{out}"), 2, "config.json",
        empty_dir),
    Row("densify-shard-text", "--max-shard-size big", ("densify", "{checkpoint}", "-o", "{out}",
        "--max-shard-size", "big"), 2, "cannot read size 'big'"),
    Row("densify-shard-zero", "--max-shard-size 0", ("densify", "{checkpoint}", "-o", "{out}", "--max-shard-size",
        "0"), 2, "--max-shard-size must be at least one byte"),
    Row("densify-truncated", "a truncated model.safetensors", ("densify", "{bad}", "-o", "{out}"), 1,
        "is truncated", damaged_checkpoint(truncate)),
    Row("densify-output-exists", "an output directory that already exists", ("densify", "{checkpoint}", "-o",
        "{bad}"), 2, "already exists", existing_output),
]


# --- running a row ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    peft = pytest.importorskip("peft")
    directory = str(tmp_path_factory.mktemp("adapter") / "adapter")
    model = peft.get_peft_model(build_model("llama"), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, llama_dir, calib_file):
    import lowrank

    directory = str(tmp_path_factory.mktemp("checkpoint") / "llama-lr50")
    lowrank.compress(llama_dir, directory, calib=calib_file, ratio=0.5, method="svd", alloc="uniform",
                     **COMPRESS_FAST)
    return directory


class Inputs:
    """The shared inputs, made only when a row names them (an adapter needs peft; a checkpoint, a compression)."""

    def __init__(self, request):
        self.request = request

    def __getattr__(self, name):
        fixture = {"model": "llama_dir", "calib": "calib_file", "adapter": "adapter", "checkpoint": "checkpoint"}
        return self.request.getfixturevalue(fixture[name])


def digest(path):
    if os.path.isdir(path):
        return tree_digest(path)
    with open(path, "rb") as f:
        return f.read()


def listing(directory):
    return sorted(os.path.relpath(os.path.join(root, name), directory)
                  for root, dirs, files in os.walk(directory) for name in dirs + files)


def run_row(row, tmp, request, capsys, monkeypatch):
    """Run one row; return (code, the error line, argv, names) once every promise of a clean failure is checked."""
    monkeypatch.chdir(tmp)  # relative paths in a row are relative to its own directory
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no row may wait on the network
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    fx = Inputs(request)
    names = {"tmp": str(tmp), "out": str(tmp / "out")}
    for name in ("model", "calib", "adapter", "checkpoint"):
        if any("{" + name + "}" in arg for arg in row.argv):
            names[name] = getattr(fx, name)
    if row.setup:
        names.update(row.setup(tmp, fx))
    argv = [arg.format(**names) for arg in row.argv]
    inputs = sorted({arg.rstrip("/") for arg in argv if os.path.exists(arg)} - {str(tmp)})
    before = {path: digest(path) for path in inputs}
    files = listing(tmp)
    code, out, err = run(argv, capsys)
    line = err.strip().splitlines()[-1] if err.strip() else ""
    assert_clean_failure(code, err, row.code, row.fragment, str(tmp / "out"))
    assert NEVER_PRINTED not in out + err  # nothing was ever unpickled
    assert listing(tmp) == files, "a failed run left files behind"
    assert {path: digest(path) for path in inputs} == before, "a failed run changed its input"
    return code, line, argv, names


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_bad_input(row, tmp_path, request, capsys, monkeypatch):
    code, line, argv, names = run_row(row, tmp_path, request, capsys, monkeypatch)
    record = os.environ.get("LOWRANK_BAD_INPUTS_RECORD")
    if record:  # bench/bad_inputs_table.py renders these into docs/bad-inputs.md
        with open(record, "a") as f:
            f.write(json.dumps({"name": row.name, "argv": argv, "code": code, "line": line, "names": names}) + "\n")


def test_rows_are_distinct_and_many():
    assert len({row.name for row in ROWS}) == len(ROWS) >= 40
    commands = {row.argv[0] for row in ROWS}
    assert {"compress", "squeeze", "compensate", "eval", "report", "densify"} <= commands


# --- the defects the table came from, checked where they were fixed ------------------------------------------------

def test_missing_calibration_path_is_not_a_hub_name(tmp_path, monkeypatch):
    from lowrank.calibration.text import check_source, load_texts
    from lowrank.errors import UsageError

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for spec in ("./nofile.txt", "nofile.parquet", "a/b/c", "~/nofile.csv"):
        with pytest.raises(UsageError, match="no such file: "):
            load_texts(spec)
    for spec in ("auto", "self", "wikitext:wikitext-2-raw-v1", "allenai/c4:en"):
        check_source(spec)  # hub names (org/name has one slash) and the keywords pass


def test_unreadable_calibration_says_which_file_and_what_is_read(tmp_path):
    from lowrank.calibration.text import load_texts
    from lowrank.errors import UsageError

    path = tmp_path / "garbage.txt"
    path.write_bytes(garbage_bytes())
    with pytest.raises(UsageError, match=r"garbage.txt is not UTF-8 text .*\.json/\.jsonl, \.parquet or \.csv"):
        load_texts(str(path))


def test_compensate_refuses_bad_options_before_loading(llama_dir, calib_file, tmp_path, capsys, monkeypatch):
    from lowrank.repair import eora

    def never(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(eora, "load_model", never)
    monkeypatch.setattr(eora, "_load_compressed", never)
    copy = str(tmp_path / "copy")
    shutil.copytree(llama_dir, copy)
    out = str(tmp_path / "out")
    base = ["compensate", llama_dir, copy, "-o", out, "--calib", calib_file, *FAST]
    for extra, message in ((["--num-samples", "0"], "--num-samples"), (["--seq-len", "1"], "--seq-len"),
                           (["--batch-size", "0"], "--batch-size"), (["--calib", "./nofile.txt"], "no such file")):
        code, _, err = run([*base, *extra], capsys)
        assert_clean_failure(code, err, 2, message, out)
    code, _, err = run(["compensate", llama_dir, llama_dir, "-o", out, "--calib", calib_file, *FAST], capsys)
    assert_clean_failure(code, err, 2, "the same model", out)


def test_the_compensate_api_refuses_bad_options_before_loading(llama_dir, calib_file, tmp_path, monkeypatch):
    # regression: only the CLI checked these; lowrank.compensate loaded both models first
    import lowrank
    from lowrank.errors import UsageError
    from lowrank.repair import eora

    def never(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(eora, "load_model", never)
    monkeypatch.setattr(eora, "_load_compressed", never)
    copy = str(tmp_path / "copy")
    shutil.copytree(llama_dir, copy)
    out = str(tmp_path / "out")
    for options, message in (({"num_samples": 0}, "--num-samples"), ({"seq_len": 1}, "--seq-len"),
                             ({"batch_size": 0}, "--batch-size"), ({"damp": float("nan")}, "--damp"),
                             ({"dtype": "int8"}, "--dtype"), ({"rank": 0}, "--rank"), ({"rank": "4"}, "--rank"),
                             ({"calib": "./nofile.txt"}, "no such file")):
        with pytest.raises(UsageError, match=message):
            lowrank.compensate(llama_dir, copy, out, **{"calib": calib_file, **options})
    with pytest.raises(UsageError, match="the same model"):
        lowrank.compensate(llama_dir, llama_dir, out, calib=calib_file)
    assert not os.path.exists(out)


def test_same_model(llama_dir, tmp_path):
    from lowrank.io.loading import same_model

    assert same_model(llama_dir, llama_dir + "/") and same_model(llama_dir, os.path.relpath(llama_dir))
    os.symlink(llama_dir, tmp_path / "link")
    assert same_model(llama_dir, str(tmp_path / "link"))
    linked = tmp_path / "linked"  # the hub cache's way: another directory, the same weight files
    linked.mkdir()
    for name in os.listdir(llama_dir):
        os.link(os.path.join(llama_dir, name), linked / name)
    assert same_model(llama_dir, str(linked))
    shutil.copytree(llama_dir, tmp_path / "copy")
    assert not same_model(llama_dir, str(tmp_path / "copy"))  # a copy is found by the pass itself


def test_squeeze_budget_form_is_checked_with_the_config():
    from lowrank.errors import UsageError
    from lowrank.squeezing.config import SqueezeConfig

    for budget in ("abc", "0", "1.5", "-1", "0M", ""):
        with pytest.raises(UsageError, match="--budget"):
            SqueezeConfig(budget=budget)
    for budget in ("0.25", "1", "2M", "1500", "800k", 0.5):
        SqueezeConfig(budget=budget)


def test_squeeze_budget_text_fails_before_any_module_is_decomposed(tmp_path, capsys, monkeypatch, adapter):
    from lowrank.squeezing import api

    def never(*args, **kwargs):
        raise AssertionError("a module was decomposed")

    monkeypatch.setattr(api, "decompose_every_module", never)
    out = str(tmp_path / "out")
    code, _, err = run(["squeeze", adapter, "--budget", "abc", "-o", out], capsys)
    assert_clean_failure(code, err, 2, "cannot read --budget", out)


def test_refused_pickle_never_suggests_unsafe_loading(tmp_path, capsys, llama_dir, calib_file):
    class Fx:
        model = llama_dir

    names = pickle_model(tmp_path, Fx())
    out = str(tmp_path / "out")
    code, stdout, err = run(["compress", names["bad"], "-o", out, "--calib", calib_file, *FAST], capsys)
    assert_clean_failure(code, err, 2, os.path.join(names["bad"], "pytorch_model.bin"), out)
    assert "weights_only" not in err and NEVER_PRINTED not in stdout + err


@pytest.mark.parametrize("alloc", ["auto", "uniform"])  # the Fisher pass sees the overflow first, else whitening
def test_float16_overflow_stops_the_run_with_the_fix(alloc, tmp_path, tokenizer, calib_file, capsys):
    """A float16 model whose activations exceed float16's range (65504) gives Inf, then NaN: the run stops with one
    line that names the fix, instead of NaN statistics passing for a dead input or a NaN Fisher deciding the
    ranks (which kept a whole block dense, silently). With --dtype float32 the same model compresses, and with
    --compute-dtype float32 too, written in float16."""
    model = build_model("llama").half()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(2e5)  # finite weights, outputs ~1e5: Inf in float16
    source = str(tmp_path / "f16")
    model.save_pretrained(source)
    tokenizer.save_pretrained(source)
    output = str(tmp_path / "out")
    argv = ["compress", source, "--ratio", "0.8", "--alloc", alloc, "--calib", calib_file, "-o", output,
            "--num-samples", "8", "--seq-len", "64"]
    code, _, err = run(argv, capsys)
    assert_clean_failure(code, err, 1, "overflowed on the calibration text); run with --dtype float32", output)
    code, _, err = run([*argv, "--dtype", "float32"], capsys)
    assert code == 0, err
    if alloc == "uniform":  # float32 arithmetic, float16 output: the fix the line names that keeps the dtype
        code, _, err = run([*argv, "--compute-dtype", "float32", "--overwrite"], capsys)
        assert code == 0, err
        with open(os.path.join(output, "config.json")) as f:
            assert json.load(f)["dtype"] == "float16"
