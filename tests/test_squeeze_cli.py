"""`lowrank squeeze` on the command line: clean JSON, the analysis mode, and bad input (one line, exit code,
nothing written, input unchanged)."""

import json
import os
import shutil

import pytest
from conftest import assert_clean_failure, run, save_random_adapter, tree_digest
from safetensors.torch import load_file, save_file

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return save_random_adapter(tmp_path_factory.mktemp("adapter") / "my-adapter")


@pytest.fixture
def adapter_copy(adapter, tmp_path):
    target = str(tmp_path / "my-adapter")
    shutil.copytree(adapter, target)
    return target


def test_json_is_clean_stdout_and_default_output_name(adapter_copy, capsys):
    code, out, err = run(["squeeze", adapter_copy, "--rank", "4", "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["kind"] == "squeeze" and report["totals"]["rank"] == {"min": 4, "max": 4, "mean": 4.0}
    assert report["output"]["path"] == adapter_copy + "-r4" and os.path.isdir(adapter_copy + "-r4")
    assert "energy kept" in err and "wrote" in err  # the summary goes to stderr


def test_analyze_writes_nothing(adapter_copy, tmp_path, capsys):
    before = sorted(os.listdir(tmp_path))
    code, out, err = run(["squeeze", adapter_copy, "--analyze", "--energy", "0.9", "--json"], capsys)
    assert code == 0, err
    assert sorted(os.listdir(tmp_path)) == before
    report = json.loads(out)
    assert report["mode"] == "plan" and report["output"] is None  # with a rule: the plan, nothing written
    code, out, err = run(["squeeze", adapter_copy, "--analyze", "--json"], capsys)
    analysis = json.loads(out)["analysis"]
    assert [row["rank"] for row in analysis["ranks"]] == [1, 2, 4, 8] and analysis["ranks"][-1]["energy_min"] == 1.0
    assert "uniform rank (worst module)" in err
    assert sorted(os.listdir(tmp_path)) == before


def test_quiet_and_overwrite(adapter_copy, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "squeeze_report.json").write_text("{}")  # an earlier output: --overwrite replaces only those
    (out / "stale.txt").write_text("old")
    code, stdout, err = run(["squeeze", adapter_copy, "--budget", "0.5", "-o", str(out), "--overwrite", "-q"], capsys)
    assert code == 0, err
    assert stdout == "" and err.strip() == ""
    assert not (out / "stale.txt").exists() and (out / "adapter_config.json").exists()


def _corrupt(adapter):
    with open(os.path.join(adapter, "adapter_model.safetensors"), "r+b") as f:
        f.seek(8)
        f.write(b"{not json")


def _truncate(adapter):
    path = os.path.join(adapter, "adapter_model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)


def _nan(adapter):
    path = os.path.join(adapter, "adapter_model.safetensors")
    tensors = load_file(path)
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})


def _bad_config(adapter):
    with open(os.path.join(adapter, "adapter_config.json"), "w") as f:
        f.write("{")


USAGE = {
    "missing": (["{nope}", "--rank", "2"], "no such file"),
    "not-an-adapter": (["{empty}", "--rank", "2"], "not a PEFT adapter directory"),
    "no-rule": (["{a}"], "give a rank rule"),
    "two-rules": (["{a}", "--rank", "2", "--energy", "0.9"], "choose one rank rule"),
    "rank-zero": (["{a}", "--rank", "0"], "--rank must be at least 1"),
    "rank-above-source": (["{a}", "--rank", "16"], "above the source rank"),
    "energy-range": (["{a}", "--energy", "1.5"], "--energy must be in (0, 1]"),
    "max-rank-with-rank": (["{a}", "--rank", "2", "--max-rank", "4"], "does nothing"),
    "min-energy-without-budget": (["{a}", "--energy", "0.9", "--min-energy", "0.5"], "floor for --budget"),
    "min-rank-with-rank": (["{a}", "--rank", "2", "--min-rank", "2"], "floor for --energy and --budget"),
    "pad-with-energy": (["{a}", "--energy", "0.9", "--allow-pad"], "only applies to --rank"),
    "oversample-exact": (["{a}", "--rank", "2", "--oversample", "4"], "only apply to --algorithm rsvd"),
    "algorithm": (["{a}", "--rank", "2", "--algorithm", "magic"], "unknown algorithm"),
    "policy": (["{a}", "--rank", "2", "--alpha-policy", "double"], "unknown alpha policy"),
    "dtype": (["{a}", "--rank", "2", "--dtype", "int8"], "unknown dtype"),
    "budget-text": (["{a}", "--budget", "lots"], "cannot read --budget"),
    "budget-floors": (["{a}", "--budget", "0.05", "--min-rank", "4"], "floors alone"),
    "threads": (["{a}", "--rank", "2", "--threads", "0"], "--threads must be"),
    "analyze-with-output": (["{a}", "--analyze", "-o", "{tmp}/x"], "--analyze writes nothing"),
    "exists": (["{a}", "--rank", "2", "-o", "{tmp}"], "already exists"),
    "inside": (["{a}", "--rank", "2", "-o", "{a}/sub"], "overlaps the input"),
    "base-not-dora": (["{a}", "--rank", "2", "--base-model", "{a}"], "not DoRA"),
    "finetuned-without-base": (["--finetuned", "{a}", "--rank", "2"], "needs --base-model"),
}


@pytest.mark.parametrize("case", list(USAGE))
def test_usage_errors_exit_2(case, adapter_copy, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    argv, message = USAGE[case]
    out = str(tmp_path / "out")
    names = {"a": adapter_copy, "nope": str(tmp_path / "nope"), "empty": str(tmp_path / "empty"),
             "tmp": str(tmp_path)}
    argv = [arg.format(**names) for arg in argv]
    if "-o" not in argv:
        argv += ["-o", out]
    before = tree_digest(adapter_copy)
    code, _, err = run(["squeeze", *argv], capsys)
    check = out if case not in ("exists", "inside") else str(tmp_path / "never")
    assert_clean_failure(code, err, 2, message, check)
    assert not os.path.exists(adapter_copy + "-r2")
    assert tree_digest(adapter_copy) == before  # the input is never modified


@pytest.mark.parametrize("damage, message", [(_corrupt, "is corrupt"), (_truncate, "is truncated"),
                                             (_nan, "NaN or Inf"), (_bad_config, "is not valid JSON")])
def test_failures_exit_1(damage, message, adapter_copy, tmp_path, capsys):
    damage(adapter_copy)
    before = tree_digest(adapter_copy)
    out = str(tmp_path / "out")
    code, _, err = run(["squeeze", adapter_copy, "--rank", "2", "-o", out], capsys)
    assert_clean_failure(code, err, 1, message, out)
    assert tree_digest(adapter_copy) == before


def test_an_untrained_adapter_is_said_to_change_nothing(tmp_path, capsys):
    from conftest import build_model
    from peft import LoraConfig, get_peft_model

    get_peft_model(build_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(
        tmp_path / "fresh")  # PEFT starts B at zero: the update s·B·A is zero until trained
    code, _, err = run(["squeeze", str(tmp_path / "fresh"), "--rank", "2", "-o", str(tmp_path / "out")], capsys)
    assert code == 0 and "looks untrained" in err
    with open(tmp_path / "out" / "squeeze_report.json") as f:
        assert any("looks untrained" in warning for warning in json.load(f)["warnings"])


def test_the_usage_line_shows_the_adapter_as_required(capsys):
    code, out, _ = run(["squeeze", "--help"], capsys)
    assert code == 0 and "[OPTIONS] ADAPTER" in " ".join(out.split()) and "[ADAPTER]" not in out
