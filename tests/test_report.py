"""`lowrank report`: every format and exit code, gates that must fail do fail, unreadable or incomplete reports exit 3,
markdown structure, JUnit against the schema CI tools use, the plot, two runs side by side, other report kinds."""

import copy
import json
import os
import re
import shutil

import pytest
from conftest import COMPRESS_FAST, english_text
from test_cli import run

import lowrank
from lowrank.report.compression import SPECTRA_FILE
from lowrank.report.markdown import STEP_SUMMARY_LIMIT, report_markdown
from lowrank.report.runs import load_run

SCHEMA = os.path.join(os.path.dirname(__file__), "data", "junit.xsd")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, llama_dir, calib_file):
    """Two compressions of the tiny Llama (keep 50% and 80%), each evaluated once against the original."""
    root = tmp_path_factory.mktemp("reports")
    data = root / "eval.txt"
    data.write_text("\n\n".join(reversed(english_text().split("\n\n")[-30:])))
    paths = {}
    for ratio in (0.5, 0.8):
        out = str(root / f"llama-lr{round(ratio * 100)}")
        lowrank.compress(llama_dir, out, calib=calib_file, ratio=ratio, alloc="uniform", **COMPRESS_FAST)
        evaluation = lowrank.evaluate(out, baseline=llama_dir, data=str(data), seq_len=32, max_tokens=640,
                                      speed=False, command="test")
        lowrank.record_evaluation(evaluation, os.path.join(out, "compression_report.json"))
        paths[ratio] = out
    return paths


@pytest.fixture
def lr50(runs, tmp_path):
    target = tmp_path / "lr50"
    shutil.copytree(runs[0.5], target)
    return str(target)


def report_json(path):
    with open(os.path.join(path, "compression_report.json")) as f:
        return json.load(f)


def latest(path):
    return report_json(path)["evaluations"][-1]


def one_error(err, code, expected, message):
    assert code == expected, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err


def md_tables(markdown):
    """Every table in the document as (header, rows); each row must have exactly the header's number of cells."""
    lines = markdown.splitlines()
    found = []
    for index, line in enumerate(lines):
        if line.startswith("|") and index + 1 < len(lines) and re.fullmatch(r"\|(---\|)+", lines[index + 1]):
            cells = lambda text: [c.strip() for c in re.split(r"(?<!\\)\|", text)[1:-1]]  # noqa: E731
            header, rows = cells(line), []
            for row in lines[index + 2:]:
                if not row.startswith("|"):
                    break
                rows.append(cells(row))
                assert len(rows[-1]) == len(header), (header, row)
            found.append((header, rows))
    return found


# ---- formats and exit codes --------------------------------------------------------------------------------------

def test_table_format_shows_summary_evaluation_protocol_and_worst_layers(lr50, capsys):
    code, out, err = run(["report", lr50], capsys)
    assert code == 0 and out == "", err  # the table is for people: stderr; stdout stays clean
    evaluation = latest(lr50)
    assert "kept" in err and "removed" in err and "whiten" in err
    assert evaluation["protocol"]["statement"][:60] in err.replace("\n", " ")
    assert evaluation["data"]["sha256_text"] in err
    layers = report_json(lr50)["layers"]["list"]
    worst = max(layers, key=lambda layer: layer["rel_error"])["name"]
    table = err[err.index("Layers, worst first (10 of 21)"):]
    shown = [layer["name"] for layer in layers if layer["name"] in table]
    assert len(shown) == 10 and min(shown, key=table.index) == worst  # the worst layer heads the table


def test_json_format_is_versioned_and_complete(lr50, capsys):
    code, out, err = run(["report", lr50, "--format", "json", "--max-kl", "1000"], capsys)
    assert code == 0, err
    document = json.loads(out)  # stdout holds exactly one JSON document
    assert document["schema"] == "lowrank.report" and document["schema_version"] == 1
    assert document["status"] == "pass" and document["exit_code"] == 0 and document["comparison"] is None
    (run_,) = document["runs"]
    report = report_json(lr50)
    assert run_["kind"] == "compress" and run_["schema"] == "lowrank.compression"
    errors = [layer["rel_error"] for layer in run_["layers"]]
    assert errors == sorted(errors, reverse=True) and len(errors) == len(report["layers"]["list"])
    assert run_["evaluations"] == report["evaluations"]
    summary = run_["summary"]
    assert summary["params_before"] == sum(layer["params_before"] for layer in report["layers"]["list"])
    assert summary["bytes_after"] == report["size"]["bytes_after"]
    assert summary["energy_kept_min"] == min(layer["energy_kept"] for layer in report["layers"]["list"])
    (gate,) = document["gates"]
    assert gate["option"] == "max-kl" and gate["status"] == "pass"
    assert gate["value"] == report["evaluations"][-1]["agreement"]["kl_mean"]
    code, out2, _ = run(["report", lr50, "--json", "--max-kl", "1000"], capsys)
    assert json.loads(out2) == document  # --json is --format json


def test_markdown_structure(lr50, capsys):
    code, out, err = run(["report", lr50, "--format", "markdown", "--max-ppl", "1e9", "--max-kl", "0", "--top", "4"],
                         capsys)
    assert code == 1, err
    assert out.startswith(f"## lowrank report: `{lr50}`\n")
    assert "❌ 1 of 2 gates failed" in out
    headings = [line for line in out.splitlines() if line.startswith("#")]
    assert headings[1:] == ["### Summary", "### Evaluation 1 of 1", "### Layers, worst first (4 of 21)"]
    tables = md_tables(out)
    gates, summary, evaluation, top, everything = tables
    assert gates[0] == ["gate", "metric", "value", "threshold", "result"]
    assert [row[0] for row in gates[1]] == ["--max-ppl", "--max-kl"]
    assert gates[1][0][4] == "✅ pass" and gates[1][1][4] == "❌ fail"
    assert ["method", "whiten"] in summary[1]
    assert evaluation[0] == ["metric", "model", "baseline", "change"] and evaluation[1][0][0] == "perplexity"
    assert len(top[1]) == 4 and len(everything[1]) == 21
    errors = [float(row[5]) for row in everything[1]]
    assert errors == sorted(errors, reverse=True) and [row[0] for row in top[1]] == [r[0] for r in everything[1][:4]]
    assert out.count("<details>") == out.count("</details>") == 1
    assert out.index("<details>") < out.index("<summary>All 21 layers") < out.index("</details>")
    assert latest(lr50)["protocol"]["statement"] in out
    names = {layer["name"] for layer in report_json(lr50)["layers"]["list"]}
    assert {row[0] for row in everything[1]} == names


def test_junit_validates_against_the_schema(lr50, tmp_path, capsys):
    import xml.etree.ElementTree as ET

    import xmlschema

    schema = xmlschema.XMLSchema(SCHEMA)
    target = tmp_path / "junit.xml"
    code, out, err = run(["report", lr50, "--format", "junit", "-o", str(target), "--max-ppl", "1e9",
                          "--max-kl", "0", "--min-cosine", "0.5"], capsys)
    assert code == 3, err  # min-cosine cannot be answered for a causal LM: incomplete outranks the failure
    schema.validate(str(target))
    root = ET.parse(target).getroot()
    suite = root.find("testsuite")
    cases = suite.findall("testcase")
    assert [case.get("name") for case in cases] == ["max-ppl <= 1e9", "max-kl <= 0", "min-cosine >= 0.5"]
    assert cases[0].find("failure") is None and cases[0].find("error") is None
    assert "max-kl" in cases[1].find("failure").get("message")
    assert "needs an embedding evaluation" in cases[2].find("error").get("message")
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("3", "1", "1")
    properties = {p.get("name"): p.get("value") for p in suite.find("properties")}
    assert properties["protocol"] == latest(lr50)["protocol"]["statement"]
    assert out == ""  # written to the file, not stdout
    code, out, _ = run(["report", lr50, "--format", "junit"], capsys)  # no gates: a valid, empty suite
    assert code == 0
    schema.validate(out)
    assert ET.fromstring(out).find("testsuite").get("tests") == "0"


# ---- gates ---------------------------------------------------------------------------------------------------------

def gate_values(path):
    evaluation = latest(path)
    report = report_json(path)
    layers = report["layers"]["list"]
    return {"max-ppl-increase": evaluation["perplexity"]["increase"], "max-ppl": evaluation["perplexity"]["model"],
            "min-top1-agreement": evaluation["agreement"]["top1"], "max-kl": evaluation["agreement"]["kl_mean"],
            "max-size": report["size"]["bytes_after"], "max-kept": report["ratio"]["model"]["kept"],
            "min-energy": min(layer["energy_kept"] for layer in layers),
            "max-rel-error": max(layer["rel_error"] for layer in layers)}


@pytest.mark.parametrize("option", ["max-ppl-increase", "max-ppl", "min-top1-agreement", "max-kl", "max-size",
                                    "max-kept", "min-energy", "max-rel-error"])
def test_each_gate_passes_and_fails_on_its_own_value(option, lr50, capsys):
    if option == "max-ppl-increase":
        # The sign of a random tiny model's change is luck: give the latest evaluation a known increase.
        report = report_json(lr50)
        report["evaluations"][-1]["perplexity"]["increase"] = 0.123
        _write(os.path.join(lr50, "compression_report.json"), json.dumps(report))
    value = gate_values(lr50)[option]
    lower = option.startswith("min")
    if option == "max-ppl-increase":
        passing, failing = "12.5%", "12%"
    elif option == "max-size":
        passing, failing = str(value), str(value - 1)
    else:
        passing, failing = (value * 0.99, value * 1.01) if lower else (value * 1.01, value * 0.99)
        passing, failing = repr(passing), repr(failing)
    code, _, err = run(["report", lr50, f"--{option}", passing, "-q"], capsys)
    assert code == 0 and "FAILED" not in err, err
    code, _, err = run(["report", lr50, f"--{option}", failing, "-q"], capsys)
    assert code == 1, err
    (line,) = [line for line in err.splitlines() if line.startswith("FAILED")]
    assert f"--{option}" in line and failing.rstrip("%")[:4] in line


def test_a_failing_value_never_prints_as_the_threshold(lr50, capsys):
    size = gate_values(lr50)["max-size"]
    code, _, err = run(["report", lr50, "--max-size", str(size - 1)], capsys)
    assert code == 1 and f"{size:,} B >" in err  # 359.9 KB would read like a pass at 359.9 KB


def test_gate_without_evaluation_is_incomplete_not_a_pass(llama_dir, calib_file, tmp_path, capsys):
    out = str(tmp_path / "fresh")
    lowrank.compress(llama_dir, out, calib=calib_file, ratio=0.5, **COMPRESS_FAST)
    code, _, err = run(["report", out, "--max-ppl-increase", "1000%", "--min-energy", "0"], capsys)
    one_error(err, code, 3, "report incomplete: --max-ppl-increase 1000%: needs a perplexity evaluation against a "
                            "baseline, and it has no evaluation: run lowrank eval --baseline BASE first")
    # An evaluation without a baseline answers --max-ppl but still not --max-ppl-increase.
    evaluation = lowrank.evaluate(out, data=calib_file, seq_len=32, max_tokens=64, speed=False, command="t")
    lowrank.record_evaluation(evaluation, os.path.join(out, "compression_report.json"))
    code, _, err = run(["report", out, "--max-ppl", "1e9"], capsys)
    assert code == 0, err
    code, _, err = run(["report", out, "--max-ppl-increase", "1000%"], capsys)
    one_error(err, code, 3, "its 1 evaluation(s) have none")


@pytest.mark.parametrize("argv, message", [
    (["--max-ppl-increase", "10"], "ambiguous"),
    (["--max-ppl-increase", "ten%"], "not a number"),
    (["--min-energy", "-0.1"], "must be a finite number >= 0"),
    (["--min-energy", "120%"], "cannot exceed 100%"),
    (["--max-size", "huge"], "cannot read size"),
    (["--plot", "out.jpg"], "give a .png file name"),
])
def test_usage_errors_exit_2(argv, message, lr50, capsys):
    code, _, err = run(["report", lr50, *argv], capsys)
    one_error(err, code, 2, message)


def test_click_level_usage_errors_exit_2(lr50, tmp_path, capsys):
    code, _, err = run(["report", lr50, "--format", "xml"], capsys)
    assert code == 2 and "xml" in err and "Traceback" not in err
    code, _, err = run(["report", lr50, lr50, lr50], capsys)
    one_error(err, code, 2, "give one report, or two")
    code, _, err = run(["report", str(tmp_path / "missing")], capsys)
    one_error(err, code, 2, "no such file or directory")


# ---- unreadable, incomplete, foreign, future ---------------------------------------------------------------------

def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


@pytest.mark.parametrize("case, message", [
    ("truncated", "is not valid JSON"),
    ("garbage", "is not valid JSON"),
    ("empty", "is empty"),
    ("binary", "not UTF-8"),
    ("foreign", "is not a lowrank report (it has no 'schema' field)"),
    ("other-schema", "is not a lowrank report (its schema is 'pytest-benchmark')"),
    ("list", "holds a JSON list"),
    ("future", "was written by a newer lowrank (lowrank.compression version 2; this lowrank reads up to version 1)"),
    ("unknown-kind", "report kind 'prune' is unknown"),
    ("no-layers", "is incomplete: it lacks layers"),
    ("layer-field", "lacks energy_kept"),
    ("layer-type", "is not a number"),
    ("future-evaluation", "evaluations[0] was written by a newer lowrank"),
    ("analyze", "is a `lowrank squeeze --analyze` result"),
    ("no-report", "has no lowrank report"),
])
def test_unreadable_or_incomplete_reports_exit_3(case, message, lr50, tmp_path, capsys):
    path = os.path.join(lr50, "compression_report.json")
    report = report_json(lr50)
    text = open(path).read()
    broken = copy.deepcopy(report)
    target = path
    if case == "truncated":
        _write(path, text[: len(text) * 2 // 3])
    elif case == "garbage":
        _write(path, "this is not json")
    elif case == "empty":
        _write(path, "")
    elif case == "binary":
        with open(path, "wb") as f:
            f.write(b"\xff\xfe\x00binary")
    elif case == "foreign":
        _write(path, json.dumps({"name": "some other tool", "results": []}))
    elif case == "other-schema":
        _write(path, json.dumps({"schema": "pytest-benchmark", "benchmarks": []}))
    elif case == "list":
        _write(path, "[1, 2, 3]")
    elif case == "future":
        broken["schema_version"] = 2
    elif case == "unknown-kind":
        broken["kind"] = "prune"
    elif case == "no-layers":
        del broken["layers"]
    elif case == "layer-field":
        del broken["layers"]["list"][3]["energy_kept"]
    elif case == "layer-type":
        broken["layers"]["list"][0]["rel_error"] = "high"
    elif case == "future-evaluation":
        broken["evaluations"][0]["schema_version"] = 7
    elif case == "analyze":
        broken = {"schema": "lowrank.squeeze", "schema_version": 1, "kind": "squeeze", "mode": "analyze",
                  "versions": {}, "command": "lowrank squeeze a --analyze", "analysis": {}, "evaluations": []}
    elif case == "no-report":
        os.remove(path)
        target = lr50
    if broken != report:
        _write(path, json.dumps(broken))
    for argument in ([target] if case == "no-report" else [lr50, path]):  # a directory or the file itself
        code, out, err = run(["report", argument, "--format", "json", "--max-kl", "1"], capsys)
        one_error(err, code, 3, message)
        assert out == ""
    if case == "truncated":
        assert "cut short" in err


# ---- GitHub step summary ----------------------------------------------------------------------------------------

def test_step_summary_is_appended_when_set_and_no_output(lr50, tmp_path, monkeypatch, capsys):
    summary = tmp_path / "summary.md"
    summary.write_text("# Earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    code, _, err = run(["report", lr50, "--max-kl", "1000", "-q"], capsys)
    assert code == 0, err
    text = summary.read_text()
    assert text.startswith("# Earlier step\n") and "## lowrank report:" in text and "✅ all 1 gates passed" in text
    size = len(text)
    code, _, _ = run(["report", lr50, "--format", "json", "-o", str(tmp_path / "r.json")], capsys)
    assert code == 0 and len(summary.read_text()) == size  # --output: the summary is left alone


def test_markdown_stays_under_githubs_limit(lr50):
    run_ = load_run(lr50)
    layer = run_["layers"][0]
    padding = "x" * 120  # long names (a mixture of experts' layers) make a big table from few layers
    run_["layers"] = [{**layer, "name": f"model.layers.{i}.mlp.experts.{padding}.very_long_projection_name_{i}",
                       "rel_error": 1 / (i + 1)} for i in range(6000)]
    full = report_markdown([run_], [], "no-gates")
    assert len(full.encode()) > STEP_SUMMARY_LIMIT  # the case exists
    limit = STEP_SUMMARY_LIMIT - 5000
    text = report_markdown([run_], [], "no-gates", limit=limit)
    assert len(text.encode()) <= limit
    assert "more layers are left out" in text and text.count("<details>") == text.count("</details>")
    assert "very_long_projection_name_0 " in text  # the worst layers are the ones kept


# ---- plot, spectra, comparison, other kinds ---------------------------------------------------------------------

def test_spectra_file_matches_the_report(runs):
    from safetensors import safe_open

    report = report_json(runs[0.5])
    with safe_open(os.path.join(runs[0.5], SPECTRA_FILE), "pt") as f:
        spectra = {name: f.get_tensor(name).double() for name in f.keys()}
    layers = {layer["name"]: layer for layer in report["layers"]["list"]}
    assert set(spectra) == {name for name, layer in layers.items() if layer["rank"] is not None}  # dense: none
    for name, sigma in spectra.items():
        layer = layers[name]
        assert sigma.numel() == min(layer["shape"]) and bool((sigma[:-1] >= sigma[1:]).all())
        energy = float(sigma[: layer["rank"]].square().sum() / sigma.square().sum())
        assert energy == pytest.approx(layer["predicted_energy_kept"], abs=2e-6)  # the spectrum whiten truncated


def test_plot_has_a_spectrum_panel_only_with_spectra(lr50, tmp_path, capsys):
    import matplotlib.image

    with_spectra, without = tmp_path / "a.png", tmp_path / "b.png"
    code, _, err = run(["report", lr50, "--plot", str(with_spectra), "-q"], capsys)
    assert code == 0, err
    os.remove(os.path.join(lr50, SPECTRA_FILE))
    code, _, err = run(["report", lr50, "--plot", str(without), "-q"], capsys)
    assert code == 0, err
    for path in (with_spectra, without):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tall, short = matplotlib.image.imread(with_spectra), matplotlib.image.imread(without)
    assert tall.shape[0] == 2 * short.shape[0] and tall.shape[1] == short.shape[1]  # two panels vs one
    assert tall.std() > 0.01  # something was drawn


def test_two_runs_side_by_side_gates_apply_to_the_second(runs, capsys):
    a, b = runs[0.5], runs[0.8]
    energy_a = gate_values(a)["min-energy"]
    energy_b = gate_values(b)["min-energy"]
    assert energy_b > energy_a  # keeping more parameters keeps more energy
    threshold = repr((energy_a + energy_b) / 2)  # A fails this gate, B passes it
    code, out, err = run(["report", a, b, "--format", "json", "--min-energy", threshold], capsys)
    assert code == 0, err
    document = json.loads(out)
    assert [r["path"] for r in document["runs"]] == [a, b]
    comparison = document["comparison"]
    assert comparison["params_after"]["a"] == document["runs"][0]["summary"]["params_after"]
    assert comparison["params_after"]["b"] > comparison["params_after"]["a"]
    assert comparison["energy_kept_min"]["change"] == pytest.approx(energy_b - energy_a)
    assert comparison["perplexity"]["a"] == latest(a)["perplexity"]["model"]
    code, out, err = run(["report", b, a, "--format", "markdown", "--min-energy", threshold], capsys)
    assert code == 1  # swapped: now the weaker run is the one gated
    assert "### Side by side" in out and f"A = `{b}`, B = `{a}`" in out
    side = md_tables(out)[1]
    assert side[0] == ["", "A", "B", "change"]
    code, _, err = run(["report", a, b], capsys)
    assert code == 0 and "Layers, worst first in B" in err


def _other_kind(directory, kind, name, layer_extra, extra=None):
    os.makedirs(directory, exist_ok=True)
    layers = [{"name": f"model.layers.{i}.self_attn.q_proj", "shape": [64, 64], "rank": 8, "params_before": 1024,
               "params_after": 512, "energy_kept": 0.9 + i / 100, "rel_error": 0.3 - i / 100, **layer_extra(i)}
              for i in range(3)]
    report = {"schema": f"lowrank.{kind}", "schema_version": 1, "kind": kind, "versions": {"lowrank": "0.1.0"},
              "command": f"lowrank {kind} ...", "evaluations": [], "layers": {"list": layers}, **(extra or {})}
    with open(os.path.join(directory, name), "w") as f:
        json.dump(report, f)
    return directory


def test_squeeze_and_compensate_reports_render_their_own_fields(tmp_path, capsys):
    # Shaped like squeeze's report: per-module rank/alpha/scale before and after and sigmas (null where a module
    # drops nothing), totals with the bytes, the algorithm as a block.
    squeeze = _other_kind(str(tmp_path / "adapter-r8"), "squeeze", "squeeze_report.json",
                          lambda i: {"kind": "linear", "rank_before": 64, "alpha_before": 128, "alpha": 8,
                                     "sigma_1": 3.5 - i, "sigma_first_dropped": None if i == 2 else 0.1,
                                     "dora": i == 1},
                          {"totals": {"modules": 3, "bytes_before": 4096, "bytes_after": 2048,
                                      "energy_kept": {"mean": 0.91, "min": 0.9}},
                           "algorithm": {"name": "exact", "method": "QR of B and A^T"}})
    code, out, err = run(["report", squeeze, "--format", "markdown", "--min-energy", "0.9", "--max-size", "2048"],
                         capsys)
    assert code == 0, err
    header, rows = md_tables(out)[-1]
    assert header[-5:] == ["rank_before", "alpha_before", "alpha", "sigma_1", "sigma_first_dropped"]
    assert rows[0][0] == "model.layers.0.self_attn.q_proj" and rows[2][-1] == ""  # null: an empty cell
    summary = dict(map(tuple, md_tables(out)[1][1]))
    assert summary["method"] == "exact" and summary["totals: energy kept"] == "mean 0.91, min 0.9"
    assert summary["size"] == "4.1 KB -> 2.0 KB"
    code, _, err = run(["report", squeeze, "--max-size", "2047"], capsys)
    assert code == 1
    compensate = _other_kind(str(tmp_path / "repair"), "compensate", "compensation_report.json",
                             lambda i: {"error_before": 0.5}, {"summary": {"mean_error_after": 0.2}, "rank": 8})
    code, _, err = run(["report", compensate, "--max-rel-error", "0.25"], capsys)
    assert code == 1 and "model.layers.0.self_attn.q_proj" in err.split("FAILED")[1]
    assert "error_before" in err and "mean error after" in err


def test_eval_only_report_renders_and_refuses_layer_gates(runs, tmp_path, capsys):
    path = str(tmp_path / "evals.json")
    lowrank.record_evaluation(latest(runs[0.5]), path)
    code, out, err = run(["report", path, "--format", "markdown", "--max-ppl", "1e9"], capsys)
    assert code == 0, err
    assert "### Evaluation 1 of 1" in out and "Layers" not in out
    code, _, err = run(["report", path, "--min-energy", "0.5"], capsys)
    one_error(err, code, 3, "no decomposed layer")


def test_single_file_squeeze_report_is_found_beside_its_lora(tmp_path, capsys):
    folder = str(tmp_path / "loras")
    _other_kind(folder, "squeeze", "style.squeeze_report.json", lambda i: {})
    code, out, err = run(["report", folder, "--min-energy", "0.5", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["runs"][0]["report_file"] == os.path.join(folder, "style.squeeze_report.json")
    _other_kind(folder, "squeeze", "other.squeeze_report.json", lambda i: {})
    code, _, err = run(["report", folder], capsys)
    one_error(err, code, 2, "several squeeze reports")


def test_report_does_not_import_torch(lr50):
    """CI runs `lowrank report` on small runners: rendering and gating a report needs no torch."""
    import subprocess
    import sys

    script = ("import sys\nfrom lowrank.cli import main\ncode = 0\ntry:\n"
              f"    main(['report', {lr50!r}, '--format', 'junit', '--max-kl', '1', '--min-energy', '0.5'])\n"
              "except SystemExit as done:\n    code = done.code\nprint(code, 'torch' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip().splitlines()[-1] == "0 False", result.stdout + result.stderr
