"""Vision-language models (issue 16, item 4): the language model's blocks are compressed by default, the vision
tower stays dense and the summary counts it, the processor files travel with the checkpoint, and the output
loads with AutoModelForImageTextToText in a process where lowrank cannot be imported; a LLaVA output generates
from an image. Calibration is text only: a stack that text never reaches (a vision tower named with --blocks) is
refused with one line."""

import json
import os

import archs
import pytest
import torch
from conftest import run

import lowrank

CLI = ["--num-samples", "8", "--seq-len", "32", "--alloc", "uniform", "--ratio", "0.8"]

LOAD_AND_SCORE = r"""
import sys, torch, transformers
model = transformers.AutoModelForImageTextToText.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
with torch.no_grad():
    torch.save(model(input_ids=torch.load(sys.argv[2])).logits.float(), sys.argv[3])
print(type(model).__name__)
"""

GENERATE_FROM_IMAGE = r"""
import json, sys, torch, transformers
model = transformers.AutoModelForImageTextToText.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
ids = torch.tensor([[0] + [300] * 16 + [17, 42, 99]])  # 16 image tokens: a 32 x 32 image in 8 x 8 patches
pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
out = {}
for cache in (True, False):
    with torch.no_grad():
        tokens = model.generate(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids),
                                max_new_tokens=5, do_sample=False, use_cache=cache)
    out[str(cache)] = tokens[0, ids.shape[1]:].tolist()
print(json.dumps(out))
"""


def source(model_type, tmp_path, tokenizer):
    directory = tmp_path / model_type
    archs.build(model_type).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "CLIPImageProcessor"}))
    return str(directory)


@pytest.mark.parametrize("model_type", list(archs.VLM))
def test_a_vision_language_model_compresses_its_language_model(model_type, tmp_path, tokenizer, calib_file,
                                                               capsys):
    stack = archs.VLM[model_type][2]
    model_dir, output = source(model_type, tmp_path, tokenizer), str(tmp_path / "out")
    code, out, err = run(["compress", model_dir, "-o", output, "--calib", calib_file, *CLI], capsys)
    assert code == 0, err
    assert f"compressing the blocks of {stack}; the other stacks stay dense" in err + out
    with open(os.path.join(output, "compression_report.json")) as f:
        report = json.load(f)
    names = [layer["name"] for layer in report["layers"]["list"]]
    assert names and all(name.startswith(stack + ".") for name in names)
    dense = {row["kind"]: row for row in report["coverage"]["not_targeted"]}
    assert dense["stacks"]["params"] > 0  # the vision tower, counted and said
    assert os.path.exists(os.path.join(output, "preprocessor_config.json"))
    ids = archs.probe_ids()
    ids_file, logits_file = str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt")
    torch.save(ids, ids_file)
    foreign = archs.isolated_python(LOAD_AND_SCORE, output, ids_file, logits_file)
    assert foreign.returncode == 0, foreign.stderr[-3000:]
    with torch.no_grad():
        expected = lowrank.load_pretrained(output).eval()(input_ids=ids).logits.float()
    assert archs.max_error(torch.load(logits_file), expected) < 1e-5


def test_a_compressed_llava_generates_from_an_image_without_lowrank(tmp_path, tokenizer, calib_file, capsys):
    output = str(tmp_path / "out")
    code, _, err = run(["compress", source("llava", tmp_path, tokenizer), "-o", output, "--calib", calib_file,
                        *CLI], capsys)
    assert code == 0, err
    foreign = archs.isolated_python(GENERATE_FROM_IMAGE, output)
    assert foreign.returncode == 0, foreign.stderr[-3000:]
    tokens = json.loads(foreign.stdout.strip().splitlines()[-1])
    assert len(tokens["True"]) == 5 and tokens["True"] == tokens["False"]


def test_a_stack_text_never_reaches_is_refused_in_one_line(tmp_path, tokenizer, calib_file, capsys):
    output = str(tmp_path / "out")
    code, _, err = run(["compress", source("llava", tmp_path, tokenizer), "-o", output, "--calib", calib_file,
                        "--blocks", "model.vision_tower.encoder.layers", *CLI], capsys)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "never run on text" in errors[0], err
    assert "Traceback" not in err and not os.path.exists(output)
