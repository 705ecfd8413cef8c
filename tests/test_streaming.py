"""Streaming (one block in memory) and resume: the same bytes as the in-memory, uninterrupted run."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import tree_digest

import lowrank
from lowrank.errors import UsageError

FAST = {"num_samples": 16, "seq_len": 64, "batch_size": 4}


def weights_and_config(directory):
    names = sorted(n for n in os.listdir(directory) if n.startswith("model") or n == "config.json")
    return {name: open(os.path.join(directory, name), "rb").read() for name in names}


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_streaming_writes_the_same_bytes_as_in_memory(kind, request, calib_file, tmp_path):
    source = request.getfixturevalue(f"{kind}_dir")
    digest = tree_digest(source)
    a, b = str(tmp_path / "memory"), str(tmp_path / "stream")
    # uniform: --alloc auto would pick the Fisher-weighted ranks in memory only (it needs a backward pass)
    ra = lowrank.compress(source, a, ratio=0.5, calib=calib_file, stream="off", alloc="uniform", **FAST)
    rb = lowrank.compress(source, b, ratio=0.5, calib=calib_file, stream="on", max_shard_size="20KB",
                          alloc="uniform", **FAST)
    assert not ra["streamed"] and rb["streamed"]
    lowrank.compress(source, str(tmp_path / "memory-sharded"), ratio=0.5, calib=calib_file, stream="off",
                     max_shard_size="20KB", alloc="uniform", **FAST)
    assert weights_and_config(b) == weights_and_config(str(tmp_path / "memory-sharded"))
    assert weights_and_config(a)["config.json"] == weights_and_config(b)["config.json"]
    assert tree_digest(source) == digest


def test_streamed_tensors_sit_where_the_allocator_would_put_them(tmp_path):
    """A tensor read from a shard sits at the file's offset (here 24 past a 64-byte boundary) unless copied; matrix
    products round differently on such operands, so a streamed block computed other last bits than the in-memory
    one. Every tensor the index hands out is 64-byte aligned, with the stored values."""
    import torch
    from safetensors.torch import save_file

    from lowrank.io.streaming import TensorIndex

    tensors = {"a": torch.arange(6.0), "b": torch.randn(3, 4, 5), "c": torch.randn(7, 3)}
    save_file(tensors, tmp_path / "model.safetensors")
    index = TensorIndex(str(tmp_path))
    for name, tensor in tensors.items():
        value, row = index.get(name), index.get_row(name, 1)
        assert value.data_ptr() % 64 == 0 and row.data_ptr() % 64 == 0
        assert torch.equal(value, tensor) and torch.equal(row, tensor[1])


def test_streaming_with_anchoring_and_global_allocation(llama_dir, calib_file, tmp_path):
    options = dict(ratio=0.5, calib=calib_file, alloc="global", anchor=True, **FAST)
    lowrank.compress(llama_dir, str(tmp_path / "a"), stream="off", **options)
    lowrank.compress(llama_dir, str(tmp_path / "b"), stream="on", **options)
    assert weights_and_config(str(tmp_path / "a")) == weights_and_config(str(tmp_path / "b"))


@pytest.mark.parametrize("options", [dict(stream="on"), dict(stream="off", anchor=True)])
def test_hidden_states_spilled_to_disk_give_the_same_bytes(options, llama_dir, calib_file, tmp_path, monkeypatch):
    import lowrank.compression.offload

    spill_dirs = []
    mkdtemp = lowrank.compression.offload.tempfile.mkdtemp
    monkeypatch.setattr(lowrank.compression.offload.tempfile, "mkdtemp", lambda **kw: spill_dirs.append(mkdtemp(**kw)) or
                        spill_dirs[-1])
    common = dict(ratio=0.5, calib=calib_file, **options, **FAST)
    lowrank.compress(llama_dir, str(tmp_path / "memory"), offload_budget=None, **common)
    assert not spill_dirs
    report = lowrank.compress(llama_dir, str(tmp_path / "spilled"), offload_budget="10KB",
                              offload_dir=str(tmp_path), **common)
    assert report["offload_budget_bytes"] == 10_000
    assert spill_dirs and all(os.path.dirname(d) == str(tmp_path) for d in spill_dirs)
    assert not any(os.path.exists(d) for d in spill_dirs)  # removed with the states they held
    assert weights_and_config(str(tmp_path / "memory")) == weights_and_config(str(tmp_path / "spilled"))


def test_auto_allocation_is_fisher_where_it_applies(llama_dir, bert_dir, calib_file, tmp_path):
    def chosen(source, **options):
        out = str(tmp_path / f"out{len(os.listdir(tmp_path))}")
        report = lowrank.compress(source, out, ratio=0.5, calib=calib_file, **options, **FAST)
        config = json.load(open(os.path.join(out, "config.json")))["lowrank"]["settings"]
        assert config["alloc_requested"] == "auto" and config["alloc"] == report["method"]["alloc"]
        return config["alloc"], {layer["rank"] for layer in report["layers"]["list"]}

    alloc, ranks = chosen(llama_dir, stream="off")
    assert alloc == "fisher" and len(ranks) > 3  # heterogeneous
    assert chosen(llama_dir, stream="on")[0] == "uniform"
    assert chosen(llama_dir, stream="off", method="svd")[0] == "uniform"
    assert chosen(bert_dir, stream="off")[0] == "fisher"  # an encoder: the Fisher of its final hidden states
    assert chosen(bert_dir, stream="on")[0] == "uniform"


def test_streaming_refuses_what_needs_the_whole_model(llama_dir, calib_file, tmp_path):
    with pytest.raises(UsageError, match="fwsvd needs backward passes over the whole model"):
        lowrank.compress(llama_dir, str(tmp_path / "x"), method="fwsvd", calib=calib_file, stream="on", **FAST)
    with pytest.raises(UsageError, match="calibration text"):
        lowrank.compress(llama_dir, str(tmp_path / "x"), calib="self", stream="on", **FAST)


def compress_command(source, out, calib_file, *extra):
    return [sys.executable, "-m", "lowrank", "compress", source, "-o", out, "--ratio", "0.5", "--calib", calib_file,
            "--num-samples", "48", "--seq-len", "64", "--batch-size", "4", "--max-shard-size", "200KB", "-q",
            *extra]


def journal_blocks(out):
    path = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.lowrank-partial", ".lowrank-journal.json")
    try:
        with open(path) as f:
            return json.load(f)["blocks_done"]
    except (OSError, ValueError, KeyError):
        return 0


def run_until(command, out, blocks, sig, attempts=3):
    """Start the command, send `sig` once `blocks` blocks are durable; return its exit code and stderr.

    On a loaded machine this polling process can be descheduled long enough for the small run to finish before
    the signal goes out: that attempt tested nothing, so the output is removed and the run started again."""
    for _ in range(attempts):
        # A shell's background jobs inherit SIGINT ignored (and Python then installs no handler): restore the
        # default in the child, as a terminal's foreground process has it, wherever the suite is started from.
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline, sent = time.time() + 300, False
        while process.poll() is None and time.time() < deadline:
            if journal_blocks(out) >= blocks:
                process.send_signal(sig)
                sent = True
                break
            time.sleep(0.005)
        _, err = process.communicate(timeout=300)
        if sent:
            return process.returncode, err
        assert process.returncode == 0, err  # it finished (or failed) before the signal could be sent
        shutil.rmtree(out)
    pytest.fail(f"the run finished before {blocks} blocks could be interrupted, {attempts} times")


def every_file(directory):
    """Every output file's bytes; the report and its renderings without what legitimately differs between an
    interrupted-and-resumed run and a straight one (timings, the command line, where it resumed)."""
    files = {}
    for name in sorted(os.listdir(directory)):
        data = open(os.path.join(directory, name), "rb").read()
        if name == "compression_report.json":
            report = json.loads(data)
            for key in ("timings_s", "command", "resumed_at_block", "peak_rss_bytes"):
                report.pop(key)
            data = report
        elif name.endswith(".md"):
            data = [line for line in data.decode().splitlines()
                    if not any(word in line for word in ("time", "memory", "compress ", "resumed"))]
        files[name] = data
    return files


@pytest.mark.parametrize("stream", ["on", "off"])
def test_sigkill_then_resume_gives_identical_output(deep_llama, calib_file, tmp_path, stream):
    # --alloc global: the resumed run must reuse the interrupted run's allocation (journaled), not recompute it
    (tmp_path / "straight").mkdir()
    reference = str(tmp_path / "straight" / "out")
    subprocess.run(compress_command(deep_llama, reference, calib_file, "--stream", stream, "--alloc", "global"),
                   check=True, timeout=600)
    out = str(tmp_path / "out")
    command = compress_command(deep_llama, out, calib_file, "--stream", stream, "--alloc", "global")
    code, _ = run_until(command, out, 6, signal.SIGKILL)
    assert code == -signal.SIGKILL and not os.path.exists(out)
    assert 6 <= journal_blocks(out) < 16
    done = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert every_file(out) == every_file(reference)  # the spectra of the interrupted run's blocks included
    timings = json.load(open(os.path.join(out, "compression_report.json")))["timings_s"]
    assert "allocation" not in timings  # the journaled ranks were used: no second pass over the original model
    report = json.load(open(os.path.join(out, "compression_report.json")))
    assert report["resumed_at_block"] >= 6 and len(report["layers"]["list"]) == 16 * 7
    assert not os.path.exists(os.path.join(tmp_path, ".out.lowrank-partial"))


def test_ctrl_c_keeps_the_work_and_says_how_to_resume(deep_llama, calib_file, tmp_path):
    out = str(tmp_path / "out")
    code, err = run_until(compress_command(deep_llama, out, calib_file), out, 3, signal.SIGINT)
    assert code == 130 and "--resume" in err and "Traceback" not in err
    other = subprocess.run(compress_command(deep_llama, out, calib_file, "--resume", "--ratio", "0.4"),
                           capture_output=True, text=True, timeout=600)
    assert other.returncode == 2 and "other settings" in other.stderr
    done = subprocess.run(compress_command(deep_llama, out, calib_file, "--resume"), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("extra", [["--alloc", "uniform"], ["--alloc", "global", "--anchor", "--stream", "on"]])
def test_two_gloo_processes_write_what_one_process_writes(llama_dir, calib_file, tmp_path, extra):
    """torchrun with 2 CPU processes (gloo): batches split, statistics gathered exactly, rank 0 writes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same arithmetic in every process, as in the single run
    common = ["compress", llama_dir, "--calib", calib_file, "--num-samples", "16", "--seq-len", "64",
              "--batch-size", "4", "--ratio", "0.5", "-q", *extra,
              "--refine-steps", "0"]  # refinement is single-process only; the default resolves to 0 under torchrun
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    subprocess.run([sys.executable, "-m", "lowrank", *common, "-o", one], check=True, env=env, timeout=600)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "lowrank",
                          *common, "-o", two], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert weights_and_config(one) == weights_and_config(two)
    assert json.load(open(os.path.join(two, "compression_report.json")))["processes"] == 2


@pytest.mark.parametrize("hub, memory_factor, expected", [(True, 2, True), (False, 2, False), (False, 1.1, "error")])
def test_default_calibration_does_not_switch_streaming_off(llama_dir, monkeypatch, hub, memory_factor, expected):
    # With the defaults (--stream auto, --calib auto) a model over a quarter of memory must stream when calibration
    # text is available (online, auto means WikiText-2); offline auto means --calib self, which needs the whole
    # model: loaded whole if it fits (and said), refused with what to pass if it does not.
    from lowrank.compression import plan
    from lowrank.compression.config import CompressConfig
    from lowrank.io.loading import resolve_model
    from lowrank.progress import Progress

    source = resolve_model(llama_dir)
    size = plan.weight_bytes(source)
    monkeypatch.setattr(plan, "memory_bytes", lambda: int(size * memory_factor))
    monkeypatch.setattr(plan, "_hub_reachable", lambda: hub)
    logged = []

    class Log(Progress):
        def log(self, message):
            logged.append(message)

    if expected == "error":
        with pytest.raises(UsageError, match="do not fit in this machine's memory"):
            plan.choose_streaming(CompressConfig(), source, Log())
        return
    assert plan.choose_streaming(CompressConfig(), source, Log()) is expected
    assert bool(logged) is (not expected)
