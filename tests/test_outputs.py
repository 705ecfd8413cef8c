"""What lowrank writes, and what it never touches: --overwrite replaces only an output lowrank wrote (never another
folder or file, the current directory or the input's parents); no tensor with NaN or Inf is ever written; a full
disk leaves an existing output as it was. Every refusal or failure is one line and an exit code, and leaves no
partial sibling behind."""

import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys

import pytest
import torch
from conftest import COMPRESS_FAST, run, save_random_adapter, tree_digest
from safetensors.torch import save_file

import lowrank
from lowrank.errors import LowrankError
from lowrank.io.shards import ShardWriter

FAST = ["--ratio", "0.5", "--num-samples", "8", "--seq-len", "64", "--batch-size", "4"]


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, llama_dir, calib_file):
    """A compress output, made once (copy it before changing it)."""
    out = str(tmp_path_factory.mktemp("outputs") / "llama-lr50")
    lowrank.compress(llama_dir, out, calib=calib_file, ratio=0.5, **COMPRESS_FAST)
    return out


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A PEFT adapter (rank 8 on every linear layer of the tiny Llama)."""
    pytest.importorskip("peft")
    return save_random_adapter(tmp_path_factory.mktemp("adapter") / "my-adapter")


def kohya_file(path, metadata=None):
    g = torch.Generator().manual_seed(0)
    save_file({"lora_unet_x.lora_down.weight": torch.randn(8, 32, generator=g),
               "lora_unet_x.lora_up.weight": torch.randn(24, 8, generator=g)}, path, metadata=metadata)
    return path


def assert_refused(code, err, expected_code, message, parent):
    """One `error:` line (the last) with `message`, no traceback, no partial sibling in `parent`."""
    assert code == expected_code, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0] and err.strip().splitlines()[-1] == errors[0], err
    assert "Traceback" not in err
    assert not [name for name in os.listdir(parent) if "lowrank-partial" in name]


def commands(kind, llama_dir, calib_file, compressed, adapter, out):
    """argv of `kind` writing to `out`."""
    return {
        "compress": ["compress", llama_dir, "-o", out, "--calib", calib_file, *FAST],
        "squeeze": ["squeeze", adapter, "--rank", "4", "-o", out],
        "densify": ["densify", compressed, "-o", out],
        "compensate": ["compensate", llama_dir, compressed, "-o", out, "--calib", calib_file, "--rank", "2",
                       "--num-samples", "8", "--seq-len", "64"],
    }[kind]


# --- --overwrite ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["compress", "squeeze", "densify", "compensate"])
def test_overwrite_refuses_a_folder_lowrank_did_not_write(kind, llama_dir, calib_file, compressed, adapter, tmp_path,
                                                          capsys):
    folder = tmp_path / "x"
    folder.mkdir()
    (folder / "notes.txt").write_text("precious\n")
    before = tree_digest(folder)
    argv = commands(kind, llama_dir, calib_file, compressed, adapter, str(folder))
    code, _, err = run([*argv, "--overwrite"], capsys)
    assert_refused(code, err, 2, "is not a lowrank output", str(tmp_path))
    assert "write the output somewhere else" in err
    assert tree_digest(folder) == before


def test_overwrite_refuses_a_file_lowrank_did_not_write(tmp_path, capsys):
    source = kohya_file(str(tmp_path / "style.safetensors"))
    theirs = kohya_file(str(tmp_path / "theirs.safetensors"), {"format": "pt"})
    before = (tmp_path / "theirs.safetensors").read_bytes()
    code, _, err = run(["squeeze", source, "--rank", "4", "-o", theirs, "--overwrite"], capsys)
    assert_refused(code, err, 2, "is not a file lowrank wrote", str(tmp_path))
    assert (tmp_path / "theirs.safetensors").read_bytes() == before
    # one lowrank wrote is replaced
    ours = str(tmp_path / "ours.safetensors")
    code, _, err = run(["squeeze", source, "--rank", "4", "-o", ours], capsys)
    assert code == 0, err
    code, _, err = run(["squeeze", source, "--rank", "2", "-o", ours, "--overwrite"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "ours.squeeze_report.json").read_text())["totals"]["rank"]["max"] == 2


def test_overwrite_never_replaces_the_current_directory_or_a_parent(llama_dir, calib_file, compressed, tmp_path,
                                                                   monkeypatch, capsys):
    work = tmp_path / "work"
    shutil.copytree(compressed, work)  # a lowrank output: --overwrite would replace it from anywhere else
    (work / "sub").mkdir()
    before = tree_digest(work)
    monkeypatch.chdir(work)
    code, _, err = run(["compress", llama_dir, "-o", ".", "--overwrite", "--calib", calib_file, *FAST], capsys)
    assert_refused(code, err, 2, "is the current directory", str(tmp_path))
    monkeypatch.chdir(work / "sub")
    code, _, err = run(["compress", llama_dir, "-o", "..", "--overwrite", "--calib", calib_file, *FAST], capsys)
    assert_refused(code, err, 2, "holds the current directory", str(tmp_path))
    assert tree_digest(work) == before


def test_overwrite_never_replaces_a_parent_of_the_input(llama_dir, calib_file, compressed, tmp_path, capsys):
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(os.path.join(compressed, "compression_report.json"), root)  # looks like a lowrank output...
    shutil.copytree(llama_dir, root / "model")  # ...and holds the input
    before = tree_digest(root)
    code, _, err = run(["compress", str(root / "model"), "-o", str(root), "--overwrite", "--calib", calib_file,
                        *FAST], capsys)
    assert_refused(code, err, 2, "holds the input", str(tmp_path))
    assert tree_digest(root) == before


@pytest.mark.parametrize("kind", ["compress", "squeeze", "densify"])
def test_output_is_the_input_says_what_works(kind, llama_dir, model_copy, calib_file, compressed, adapter, tmp_path,
                                             capsys):
    source = model_copy({"compress": llama_dir, "squeeze": adapter, "densify": compressed}[kind])
    argv = commands(kind, source, calib_file, source, source, source)
    before = tree_digest(source)
    for overwrite in ([], ["--overwrite"]):
        code, _, err = run([*argv, *overwrite], capsys)
        assert_refused(code, err, 2, "is the input; write the output somewhere else", str(tmp_path))
        assert "--overwrite" not in err  # it would be refused too
    assert tree_digest(source) == before


def test_overwrite_replaces_a_densified_checkpoint(compressed, tmp_path, capsys):
    from lowrank.io.publish import written_by_lowrank

    out = str(tmp_path / "dense")
    code, _, err = run(["densify", compressed, "-o", out], capsys)
    assert code == 0, err
    os.remove(os.path.join(out, "compression_report.json"))  # what marks it then: config.json's lowrank_densified
    assert written_by_lowrank(out)
    open(os.path.join(out, "stale.txt"), "w").close()
    code, _, err = run(["densify", compressed, "-o", out, "--overwrite"], capsys)
    assert code == 0, err
    assert not os.path.exists(os.path.join(out, "stale.txt")) and os.path.exists(os.path.join(out, "config.json"))


def test_report_output_never_replaces_the_report_it_reads(compressed, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(compressed, run_dir)
    before = tree_digest(run_dir)
    for output, message in ((run_dir / "compression_report.json", "is the report being read"),
                            (run_dir, "is a directory")):
        code, _, err = run(["report", str(run_dir), "--format", "markdown", "--output", str(output)], capsys)
        assert_refused(code, err, 2, message, str(run_dir))
    assert tree_digest(run_dir) == before


# --- NaN or Inf is never written ----------------------------------------------------------------------------------


def test_the_writer_refuses_nan_and_inf(tmp_path):
    writer = ShardWriter(str(tmp_path), 1 << 30)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e5m2):
        for bad in (float("nan"), float("inf"), -float("inf")):
            tensor = torch.ones(3, 1000, dtype=torch.float32)
            tensor[2, 999] = bad
            with pytest.raises(LowrankError, match=r"^w\.weight has NaN or Inf values; nothing was written$"):
                writer.add("w.weight", tensor.to(dtype))
        writer.add(f"ok.{dtype}", torch.ones(3, 1000, dtype=dtype))
    writer.add("empty", torch.ones(0))
    writer.add("ints", torch.arange(5))
    assert "w.weight" not in writer.state()["entries"]


def _nan_in_last_block(monkeypatch):
    """decompose_block, with a NaN put in a factor of the last block (blocks before it are journaled by then)."""
    from lowrank.compression import model

    real = model.decompose_block

    def poisoned(block, names, *args):
        results = real(block, names, *args)
        if any(".layers.2." in name for name in names):
            block.self_attn.q_proj.up.weight.data[0, 0] = float("nan")
        return results

    monkeypatch.setattr(model, "decompose_block", poisoned)


def _inf_in_a_factor(source):
    from safetensors.torch import load_file

    path = os.path.join(source, "model.safetensors")
    tensors = load_file(path)
    tensors["model.layers.1.mlp.up_proj.up.weight"][0, 0] = float("inf")
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("kind", ["compress", "densify"])
def test_nan_is_never_written_and_leaves_nothing(kind, llama_dir, calib_file, compressed, model_copy, tmp_path,
                                                 monkeypatch, capsys):
    source = llama_dir
    if kind == "compress":
        _nan_in_last_block(monkeypatch)
        message = "model.layers.2.self_attn.q_proj.up.weight has NaN or Inf values; nothing was written"
    else:
        source = model_copy(compressed)
        _inf_in_a_factor(source)
        message = "model.layers.1.mlp.up_proj.weight has NaN or Inf values; nothing was written"
    previous = str(tmp_path / "previous")
    shutil.copytree(compressed, previous)  # with --overwrite: it stays as it was
    before = tree_digest(previous)
    for out, overwrite in ((str(tmp_path / "new"), []), (previous, ["--overwrite"])):
        code, _, err = run([*commands(kind, source, calib_file, source, None, out), *overwrite], capsys)
        assert_refused(code, err, 1, message, str(tmp_path))
    assert not os.path.exists(tmp_path / "new")
    assert tree_digest(previous) == before


# --- a full disk --------------------------------------------------------------------------------------------------


def _run_with_file_size_limit(argv, limit):
    """The CLI in a subprocess whose files may not grow past `limit` bytes: a write past it fails with EFBIG (as a
    full disk fails with ENOSPC) instead of killing the process (SIGXFSZ ignored)."""

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = subprocess.run([sys.executable, "-m", "lowrank", *argv, "-q"], preexec_fn=limited, capture_output=True,
                            text=True, timeout=900, check=False)
    return result.returncode, result.stderr


def _data_bytes(path):
    """The size of a safetensors file's tensor data (the file less its header)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
    return os.path.getsize(path) - 8 - length


@pytest.mark.parametrize("kind, where", [("compress", "blocks"), ("compress", "end"), ("squeeze", "blocks")])
def test_a_full_disk_leaves_the_previous_output_as_it_was(kind, where, llama_dir, calib_file, compressed, adapter,
                                                          tmp_path):
    previous = str(tmp_path / "previous")
    if kind == "compress":
        shutil.copytree(compressed, previous)
        weights = os.path.join(previous, "model.safetensors")
    else:
        lowrank.squeeze(adapter, previous, rank=4)
        weights = os.path.join(previous, "adapter_model.safetensors")
    before = tree_digest(previous)
    # "blocks": past the first block (journaled by then, for compress); "end": while the last shard is assembled
    data = _data_bytes(weights)
    limit = data // 2 if where == "blocks" else (data + os.path.getsize(weights)) // 2
    code, err = _run_with_file_size_limit([*commands(kind, llama_dir, calib_file, compressed, adapter, previous),
                                           "--overwrite"], limit)
    assert_refused(code, err, 1, f"could not write {previous}: file too large", str(tmp_path))
    assert tree_digest(previous) == before


# --- a report created by concurrent runs --------------------------------------------------------------------------


@pytest.mark.parametrize("links", ["hard links", "no hard links"])
def test_concurrent_first_evaluations_of_a_new_report_lose_nothing(links, tmp_path, monkeypatch):
    # regression: report.files._create wrote every run's new report through the same temporary sibling
    # (.NAME.lowrank-partial), so runs creating the same report at once overwrote or deleted each other's file;
    # without hard links it checked that the report did not exist, then renamed over it (the last run won)
    import threading

    from lowrank.report.files import append_evaluation, read_report

    if links == "no hard links":
        def no_link(source, target):
            raise PermissionError(1, "Operation not permitted")

        monkeypatch.setattr(os, "link", no_link)

    template = {"schema": "lowrank.evaluation", "schema_version": 1, "versions": {}, "command": "test"}
    for attempt in range(5):
        path = str(tmp_path / f"evals-{attempt}.json")
        start, failures = threading.Barrier(8), []

        def worker(number, path=path, start=start, failures=failures):
            start.wait()
            try:
                append_evaluation(path, {**template, "id": number})
            except Exception as error:  # noqa: BLE001  (reported below)
                failures.append(repr(error))

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not failures, failures
        assert sorted(e["id"] for e in read_report(path)["evaluations"]) == list(range(8))
    assert not [name for name in os.listdir(tmp_path) if "partial" in name]


def _full_disk_on(monkeypatch, name, call):
    """Make the `call`-th fsync of a file called `name` (through lowrank.io.publish) fail as a full disk does."""
    import errno

    from lowrank.io import publish

    real, calls = publish._fsync, []

    def fsync(path, flags):
        if name in os.path.basename(path):
            calls.append(path)
            if len(calls) == call:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, flags)

    monkeypatch.setattr(publish, "_fsync", fsync)


@pytest.mark.parametrize("call", [1, 2])
def test_a_full_disk_at_the_journal_keeps_what_resume_needs_and_says_so(call, llama_dir, calib_file, tmp_path,
                                                                       monkeypatch, capsys):
    # regression: a full disk while the journal of block 2 was saved said "could not write OUT: no space left on
    # device; free some space or write the output elsewhere" and silently left the staging directory behind
    from lowrank.compression.resume import JOURNAL

    out = str(tmp_path / "out")
    argv = ["compress", llama_dir, "-o", out, "--calib", calib_file, *FAST, "-q"]
    _full_disk_on(monkeypatch, JOURNAL, call)
    code, _, err = run(argv, capsys)
    staging = str(tmp_path / ".out.lowrank-partial")
    if call == 1:  # nothing journaled yet: nothing is left behind
        assert_refused(code, err, 1, f"could not write {out}: no space left on device; free some space or write the "
                       "output elsewhere", str(tmp_path))
        return
    assert code == 1 and err.strip() == (f"error: could not write {out}: no space left on device; the work so far "
                                         f"(1 block) is kept in {staging}: free some space and run the same "
                                         "command with --resume, or delete it"), err
    assert sorted(os.listdir(tmp_path)) == [".out.lowrank-partial"]
    assert not [name for name in os.listdir(staging) if "partial" in name]  # no half-written journal
    monkeypatch.undo()
    code, _, err = run([*argv, "--resume"], capsys)
    assert code == 0, err
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_a_full_offload_directory_is_named_with_what_helps(llama_dir, calib_file, tmp_path, monkeypatch, capsys):
    # regression: the spill file's write() error names no file, so the line blamed the output:
    # "could not write: no space left on device; free some space or write the output elsewhere"
    import errno

    from lowrank.compression import offload

    class Full:
        def __init__(self, path, mode):
            self.file = open(path, mode)  # noqa: SIM115  (closed in __exit__)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(offload, "open", Full, raising=False)
    spill = tmp_path / "spill"
    spill.mkdir()
    out = str(tmp_path / "out")
    code, _, err = run(["compress", llama_dir, "-o", out, "--calib", calib_file, *FAST, "--offload-budget", "1",
                        "--offload-dir", str(spill), "-q"], capsys)
    assert_refused(code, err, 1, f"could not spill calibration states to the offload directory {spill} (no space "
                   "left on device); pass --offload-dir DIR on a disk with room", str(tmp_path))
    import gc

    gc.collect()  # the spill directory goes with the states that used it (at the latest when the process ends)
    assert not os.path.exists(out) and os.listdir(spill) == []
