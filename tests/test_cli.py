import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import assert_clean_failure, run, tree_digest
from safetensors.torch import load_file, save_file

FAST = ["--num-samples", "8", "--seq-len", "64", "--batch-size", "4"]


def test_compress_json_is_clean_stdout(llama_dir, calib_file, tmp_path, capsys):
    out = str(tmp_path / "out")
    code, stdout, err = run(["compress", llama_dir, "--ratio", "0.6", "-o", out, "--calib", calib_file,
                             "--json", *FAST], capsys)
    assert code == 0, err
    report = json.loads(stdout)
    assert report["ratio"]["requested"] == 0.6 and report["method"]["name"] == "whiten"
    assert "kept" in err and "removed" in err and out in err  # the summary goes to stderr
    assert os.path.exists(os.path.join(out, "model.safetensors"))


@pytest.mark.parametrize(
    "case",
    ["missing", "not-a-model", "no-target", "ratio-zero", "ratio-big", "method", "exists", "inside", "shard-size",
     "broken-link", "offload-budget"],
)
def test_usage_errors_exit_2(case, llama_dir, model_copy, calib_file, tmp_path, capsys):
    model = model_copy(llama_dir)
    before = tree_digest(model)
    out = str(tmp_path / "out")
    if case == "broken-link":
        os.symlink(str(tmp_path / "gone"), str(tmp_path / "link"))
    args = {
        "missing": (["compress", str(tmp_path / "nope"), "-o", out], "no such file"),
        "not-a-model": (["compress", str(tmp_path), "-o", out], "not a model directory"),
        "no-target": (["compress", model, "-o", out, "--targets", "re:.*nothing.*"], "no linear layer matches"),
        "ratio-zero": (["compress", model, "-o", out, "--ratio", "0"], "--ratio must be in (0, 1]"),
        "ratio-big": (["compress", model, "-o", out, "--ratio", "1.5"], "--ratio must be in (0, 1]"),
        "method": (["compress", model, "-o", out, "--method", "magic"], "unknown method"),
        "exists": (["compress", model, "-o", str(tmp_path)], "already exists"),
        "inside": (["compress", model, "-o", os.path.join(model, "sub")], "overlaps the input"),
        "shard-size": (["compress", model, "-o", out, "--max-shard-size", "big"], "cannot read size"),
        "broken-link": (["compress", model, "-o", str(tmp_path / "link")], "is a broken symbolic link"),
        "offload-budget": (["compress", model, "-o", out, "--offload-budget", "lots"], "cannot read size"),
    }[case]
    argv, message = args
    code, _, err = run([*argv, "--calib", calib_file, *FAST], capsys)
    check_output = out if case not in ("exists", "inside") else str(tmp_path / "never")
    assert_clean_failure(code, err, 2, message, check_output)
    assert tree_digest(model) == before  # the input is never modified


def test_gguf_without_its_packages_says_what_to_install(tmp_path, calib_file, capsys, monkeypatch):
    # transformers refuses a .gguf file unless gguf and accelerate are installed; its own message names only the
    # first it misses. Ours names both and the extra that brings them, before anything is loaded.
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "accelerate" else real_find_spec(name, *args))
    (tmp_path / "gguf").mkdir()
    model = tmp_path / "gguf" / "model.gguf"
    model.write_bytes(b"GGUF")
    out = str(tmp_path / "out")
    code, _, err = run(["compress", str(model), "-o", out, "--calib", calib_file, *FAST], capsys)
    assert_clean_failure(code, err, 2, "needs the accelerate package: pip install 'lowrank[gguf]'", out)


def _corrupt(model):
    path = os.path.join(model, "model.safetensors")
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"{not json at all")


def _truncate(model):
    path = os.path.join(model, "model.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 1000)


def _nan(model):
    path = os.path.join(model, "model.safetensors")
    tensors = load_file(path)
    tensors["model.layers.1.mlp.up_proj.weight"][3, 4] = float("inf")
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize(
    "case, message",
    [(_corrupt, "is corrupt"), (_truncate, "is truncated"), (_nan, "NaN or Inf"), (None, "needs 6,400,000")],
)
def test_failures_exit_1(case, message, llama_dir, model_copy, calib_file, tmp_path, capsys):
    model = model_copy(llama_dir)
    argv = FAST
    if case is not None:
        case(model)
    else:
        argv = ["--num-samples", "100000", "--seq-len", "64"]
    before = tree_digest(model)
    out = str(tmp_path / "out")
    code, _, err = run(["compress", model, "-o", out, "--calib", calib_file, *argv], capsys)
    assert_clean_failure(code, err, 1, message, out)
    assert tree_digest(model) == before


def test_debug_shows_the_traceback(tmp_path):
    run_ = subprocess.run([sys.executable, "-m", "lowrank", "compress", str(tmp_path / "nope"), "--debug"],
                          capture_output=True, text=True, timeout=120)
    assert run_.returncode != 0 and "Traceback" in run_.stderr and "UsageError" in run_.stderr


def test_overwrite_replaces_the_output(llama_dir, calib_file, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "compression_report.json").write_text("{}")  # an earlier output: --overwrite replaces only those
    (out / "stale.txt").write_text("old")
    code, _, err = run(["compress", llama_dir, "-o", str(out), "--calib", calib_file, "--overwrite", "-q", *FAST],
                       capsys)
    assert code == 0, err
    assert not (out / "stale.txt").exists() and (out / "config.json").exists()
    assert err.strip() == ""  # -q: nothing on stderr


def test_help_is_fast_and_states_the_ratio_definition():
    probe = "import sys, lowrank, lowrank.cli; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "[]"  # importing the CLI pulls in neither torch nor transformers
    env = {**os.environ, "COLUMNS": "200", "TERMINAL_WIDTH": "200"}
    result = subprocess.run([sys.executable, "-m", "lowrank", "compress", "--help"], capture_output=True,
                            text=True, timeout=60, env=env)
    assert result.returncode == 0
    assert "KEPT" in result.stdout and "removes 20%" in result.stdout
    script = os.path.join(os.path.dirname(sys.executable), "lowrank")
    assert os.path.exists(script) or shutil.which("lowrank")  # the console script is installed


def test_version(capsys):
    code, out, _ = run(["--version"], capsys)
    assert code == 0 and out.startswith("lowrank ")


def test_recorded_command_is_the_one_typed(monkeypatch):
    from lowrank.environment import invocation

    monkeypatch.setattr(sys, "argv", ["/venv/bin/lowrank", "compress", "my model", "--ratio", "0.5"])
    assert invocation() == "lowrank compress 'my model' --ratio 0.5"  # once, not "lowrank compress compress"
    monkeypatch.setattr(sys, "argv", ["/x/lowrank/__main__.py", "squeeze", "a"])
    assert invocation() == "lowrank squeeze a"
    monkeypatch.setattr(sys, "argv", ["run.py", "--fast"])
    assert invocation() == "python run.py --fast"


@pytest.mark.parametrize("where, phase", [("lowrank.calibration.load_calibration", "preparing the calibration data"),
                                          ("lowrank.compression.api.load_model", "loading the model")])
def test_ctrl_c_before_the_first_block_says_what_was_interrupted(where, phase, llama_dir, calib_file, tmp_path,
                                                                   capsys, monkeypatch):
    # typer turns a KeyboardInterrupt into a silent exit 130: the library must say what it interrupted
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(where, interrupt)
    out = str(tmp_path / "out")
    code, _, err = run(["compress", llama_dir, "-o", out, "--calib", calib_file, "--num-samples", "8",
                        "--seq-len", "64", "-q"], capsys)
    assert code == 130 and f"interrupted while {phase}; nothing was written" in err.strip().splitlines()[-1]
    assert "Traceback" not in err and not os.path.exists(out)


def test_every_option_and_argument_of_every_command_has_help():
    import typer

    from lowrank.cli import compensate, compress, densify, env, evaluate, report, squeeze  # noqa: F401
    from lowrank.cli.app import app

    group = typer.main.get_command(app)
    assert {"compress", "squeeze", "compensate", "eval", "report", "densify"} <= set(group.commands)
    missing = [f"{name} {param.name}" for name, command in group.commands.items() for param in command.params
               if not (getattr(param, "help", None) or "").strip()]
    assert not missing, missing


def test_help_shows_the_default_output_name(capsys):
    code, out, _ = run(["compress", "--help"], capsys)
    assert code == 0 and "-lr80" in out and "(default: -lr)" not in out
