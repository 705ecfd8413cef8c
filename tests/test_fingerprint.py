"""Behaviour lock: the same commands write the same bytes. bench/fingerprint.py runs compress (every method, keep
0.8), squeeze (PEFT, rsLoRA, DoRA, kohya) and compensate (adapter, merged) on a tiny seeded model and hashes every
output file (normalized for timings, paths and library versions); the hashes must equal the recorded ones.

A change meant to change outputs regenerates tests/data/fingerprint-tiny.json with
`python bench/fingerprint.py tiny --out tests/data/fingerprint-tiny.json` and says why in its commit."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORDED = os.path.join(ROOT, "tests", "data", "fingerprint-tiny.json")


def test_outputs_are_byte_identical_to_the_recorded_fingerprint(tmp_path):
    import torch
    import transformers

    pytest.importorskip("peft")
    recorded = json.load(open(RECORDED))
    versions = recorded["versions"]
    # float results depend on the kernels: the hashes hold for the torch and transformers they were made with
    if torch.__version__ != versions["torch"] or \
            transformers.__version__.split(".")[:2] != versions["transformers"].split(".")[:2]:
        pytest.skip(f"fingerprint recorded with torch {versions['torch']} / transformers {versions['transformers']}, "
                    f"this is {torch.__version__} / {transformers.__version__}")
    out = tmp_path / "now.json"
    subprocess.run([sys.executable, os.path.join(ROOT, "bench", "fingerprint.py"), "tiny", "--out", str(out)],
                   check=True, capture_output=True, timeout=900)
    now = json.load(open(out))["cases"]
    assert set(now) == set(recorded["cases"])
    changed = {case: sorted(name for name in set(files) | set(now[case]) if files.get(name) != now[case].get(name))
               for case, files in recorded["cases"].items() if files != now[case]}
    assert not changed, f"outputs changed (case: files): {changed}"
