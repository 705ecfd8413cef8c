"""`lowrank densify`: a plain checkpoint of the original architecture whose logits match the factorized model's,
streamed tensor by tensor; `lowrank report` recognises it; bad input fails cleanly. Also `lowrank env`."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import COMPRESS_FAST, WITHOUT_LOWRANK, tree_digest
from safetensors import safe_open
from test_cli import run

import lowrank


def ids(seed=11):
    return torch.randint(5, 320, (2, 40), generator=torch.Generator().manual_seed(seed))


def tensors(directory):
    """{name: shape} over the weight files of a checkpoint directory."""
    shapes = {}
    for name in sorted(os.listdir(directory)):
        if name.startswith("model") and name.endswith(".safetensors"):
            with safe_open(os.path.join(directory, name), "pt") as f:
                shapes.update({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})
    return shapes


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, llama_dir, gpt2_dir, calib_file):
    root = tmp_path_factory.mktemp("densify")
    out = {}
    for name, source in (("llama", llama_dir), ("gpt2", gpt2_dir)):
        out[name] = str(root / f"{name}-lr50")
        lowrank.compress(source, out[name], calib=calib_file, ratio=0.5, **COMPRESS_FAST)
    return out


@pytest.mark.parametrize("kind", ["llama", "gpt2"])  # tied embeddings + GQA; GPT-2's transposed Conv1D
def test_round_trip_loads_without_remote_code_and_matches(kind, compressed, llama_dir, gpt2_dir, tmp_path, capsys):
    source = compressed[kind]
    before = tree_digest(source)
    out = str(tmp_path / "dense")
    code, _, err = run(["densify", source, "-o", out], capsys)
    assert code == 0, err
    assert tree_digest(source) == before  # the input is never modified
    # A plain transformers load in a fresh interpreter without lowrank: no custom code, the original class.
    script = (
        WITHOUT_LOWRANK + "import torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"model = AutoModelForCausalLM.from_pretrained({out!r})\n"
        f"ids = torch.randint(5, 320, (2, 40), generator=torch.Generator().manual_seed(11))\n"
        f"torch.save(model(input_ids=ids).logits.detach(), {str(tmp_path / 'logits.pt')!r})\n"
        "print(type(model).__name__)\n"
    )
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert loaded.stdout.strip() == {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}[kind]
    with torch.no_grad():
        expected = lowrank.load_pretrained(source)(input_ids=ids()).logits
    logits = torch.load(tmp_path / "logits.pt", weights_only=True)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    # Exactly the original architecture's tensors (names and shapes), and its config apart from the marker.
    original = {"llama": llama_dir, "gpt2": gpt2_dir}[kind]
    assert tensors(out) == tensors(original)
    config, base = (json.load(open(os.path.join(d, "config.json"))) for d in (out, original))
    assert config["model_type"] == base["model_type"] and config["architectures"] == base["architectures"]
    assert "auto_map" not in config and "lowrank" not in config
    marker = config["lowrank_densified"]
    # GPT-2's c_attn is factorized per slice under the default (Fisher) allocation: listed under "sliced"
    assert marker["densified_layers"] == len(marker["ranks"]) + len(marker.get("sliced", {})) > 0
    assert marker["method"] == "whiten" and bool(marker.get("sliced")) == (kind == "gpt2")
    assert marker["bytes"] == os.path.getsize(os.path.join(out, "model.safetensors"))
    files = set(os.listdir(out))
    assert "modeling_lowrank.py" not in files and "lowrank_spectra.safetensors" not in files
    assert {"compression_report.json", "tokenizer.json", "README.md"} <= files
    assert open(os.path.join(out, "compression_report.json")).read() == \
        open(os.path.join(source, "compression_report.json")).read()


def test_output_is_reproducible_and_sharded_when_asked(compressed, tmp_path, capsys):
    first, second = str(tmp_path / "a"), str(tmp_path / "b")
    for out in (first, second):
        code, _, err = run(["densify", compressed["llama"], "-o", out, "--max-shard-size", "150KB", "-q"], capsys)
        assert code == 0 and err.strip() == "", err
    index = json.load(open(os.path.join(first, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) > 1
    for name in os.listdir(first):
        if name.endswith(".safetensors"):
            assert open(os.path.join(first, name), "rb").read() == open(os.path.join(second, name), "rb").read()
    model = lowrank.load_pretrained(compressed["llama"])
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(first)
    with torch.no_grad():
        torch.testing.assert_close(dense(input_ids=ids()).logits, model(input_ids=ids()).logits, rtol=1e-4,
                                   atol=1e-5)


def test_densify_streams_without_building_the_model(compressed, tmp_path, monkeypatch):
    """The factors are multiplied tensor by tensor from the files: no model is loaded to do it."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("densify must not load a model")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr("lowrank.io.checkpoint.load_pretrained", refuse)
    summary = lowrank.densify(compressed["gpt2"], str(tmp_path / "dense"))
    assert summary["densified_layers"] == 8 and summary["architectures"] == ["GPT2LMHeadModel"]


def test_report_recognises_a_densified_checkpoint(compressed, tmp_path, capsys):
    out = str(tmp_path / "dense")
    lowrank.densify(compressed["llama"], out)
    code, stdout, err = run(["report", out, "--format", "json"], capsys)
    assert code == 0, err
    (run_,) = json.loads(stdout)["runs"]
    assert run_["densified"]["architectures"] == ["LlamaForCausalLM"]
    assert run_["summary"]["bytes_after"] == os.path.getsize(os.path.join(out, "model.safetensors"))  # dense size
    code, _, err = run(["report", out], capsys)
    assert "densified" in err and "without custom code" in err
    code, _, err = run(["report", out, "--max-size", str(run_["summary"]["bytes_after"] - 1)], capsys)
    assert code == 1  # a size gate judges what is on disk: the dense weights


@pytest.mark.parametrize("case, code_expected, message", [
    ("not-lowrank", 2, "is not a lowrank factorized checkpoint"),
    ("exists", 2, "already exists"),
    ("inside", 2, "overlaps the input"),
    ("missing-factor", 1, "has no tensor"),
    ("truncated", 1, "is truncated"),
])
def test_bad_input_fails_cleanly(case, code_expected, message, compressed, llama_dir, model_copy, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    source = model_copy(compressed["llama"])
    out = str(tmp_path / "out")
    path = os.path.join(source, "model.safetensors")
    if case == "not-lowrank":
        source = llama_dir
    elif case == "exists":
        os.makedirs(out)
    elif case == "inside":
        out = os.path.join(source, "dense")
    elif case == "missing-factor":
        weights = load_file(path)
        del weights["model.layers.1.mlp.up_proj.up.weight"]
        save_file(weights, path, metadata={"format": "pt"})
    elif case == "truncated":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - 100)
    before = tree_digest(source)
    code, stdout, err = run(["densify", source, "-o", out], capsys)
    assert code == code_expected, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err
    assert tree_digest(source) == before
    if case != "exists":
        assert not os.path.exists(out)
    assert not [name for name in os.listdir(tmp_path) if "partial" in name]


def test_env_reports_versions_device_and_platform(capsys):
    code, out, err = run(["env", "--json"], capsys)
    assert code == 0, err
    info = json.loads(out)
    assert info["versions"]["torch"] == torch.__version__ and info["versions"]["lowrank"] == lowrank.__version__
    assert info["device"]["cuda_available"] == torch.cuda.is_available()
    assert info["platform"]["cpu_count"] == os.cpu_count()
    code, out, err = run(["env"], capsys)
    assert code == 0 and out == ""  # for people: stderr, ready to paste
    assert f"- torch: {torch.__version__}" in err and "platform:" in err and "device:" in err
