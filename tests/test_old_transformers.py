"""The bundled modeling_lowrank.py loads in the oldest transformers it states (4.46) where lowrank is absent.

A separate virtual environment gets transformers 4.46.3 (with the huggingface_hub and tokenizers it accepts)
from PyPI; everything else (torch, safetensors, ...) is this environment's, read through a path file. Path files
of that shared directory are not processed, so lowrank's editable import hook stays out and lowrank cannot be
imported there (asserted). Skipped, with the reason, when PyPI cannot be reached.
"""

import json
import os
import subprocess
import sys
import sysconfig

import pytest
import torch
from conftest import COMPRESS_FAST

import lowrank

OLDEST = ["transformers==4.46.3", "huggingface_hub==0.36.0", "tokenizers==0.20.3"]

LOAD = """
import json, sys, torch
try:
    import lowrank
    sys.exit("lowrank is importable here")
except ImportError:
    pass
import transformers
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, torch_dtype=torch.float32)
ids = torch.tensor([[0, 17, 42, 99, 7, 123]])
with torch.no_grad():
    logits = model(ids).logits
tokens = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0).tolist()
print(json.dumps({"version": transformers.__version__, "class": type(model).__name__,
                  "logits": logits.flatten().tolist(), "tokens": tokens}))
"""


@pytest.fixture(scope="module")
def old_python(tmp_path_factory):
    venv = tmp_path_factory.mktemp("old-transformers")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(purelib, "shared.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    installed = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", *OLDEST], capture_output=True,
                               text=True, timeout=600, check=False)
    if installed.returncode != 0:
        pytest.skip(f"could not install {OLDEST[0]} from PyPI: {installed.stderr.strip().splitlines()[-1:]}")
    return python


def test_an_output_loads_and_generates_in_transformers_4_46(old_python, llama_dir, calib_file, tmp_path):
    out = str(tmp_path / "out")
    lowrank.compress(llama_dir, out, ratio=0.6, calib=calib_file, verify=False, **COMPRESS_FAST)
    run = subprocess.run([old_python, "-I", "-c", LOAD, out], capture_output=True, text=True, timeout=600, check=False,
                         cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    old = json.loads(run.stdout.strip().splitlines()[-1])
    assert old["version"] == "4.46.3" and old["class"] == "LowRankLlamaForCausalLM"
    model = lowrank.load_pretrained(out)
    ids = torch.tensor([[0, 17, 42, 99, 7, 123]])
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.allclose(torch.tensor(old["logits"]).reshape(logits.shape), logits, atol=1e-5, rtol=1e-4)
    assert old["tokens"] == model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0).tolist()


def test_every_lowrank_function_the_bundled_file_names_exists():
    """Its messages send users to lowrank's API (a name that once pointed at a function that did not exist)."""
    import re

    from lowrank.io import modeling_lowrank

    with open(modeling_lowrank.__file__) as f:
        text = f.read()
    named = set(re.findall(r"\blowrank\.([a-z_]+)\b", text)) - {"io", "experts"}  # experts: a config.json entry
    assert named and all(hasattr(lowrank, name) for name in named), named
