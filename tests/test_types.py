"""The public API is typed (the package ships py.typed): every exported function carries annotations, and mypy
accepts the modules that define it."""

import importlib
import inspect
import os
import shutil
import subprocess
import sys

import pytest

import lowrank

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def exported():
    return {name: getattr(lowrank, name) for name in lowrank._API}


@pytest.mark.parametrize("name", sorted(lowrank._API))
def test_exported_functions_are_annotated(name):
    value = exported()[name]
    function = value.__init__ if inspect.isclass(value) else value
    if inspect.isclass(value) and function is object.__init__:
        return  # a class without its own __init__ (a dataclass has one; an exception class inherits)
    signature = inspect.signature(function)
    missing = [p.name for p in signature.parameters.values()
               if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
               and p.annotation is inspect.Parameter.empty]
    if inspect.isclass(value) and issubclass(value, Exception):
        return
    assert not missing, f"lowrank.{name}: parameters without annotations: {missing}"
    if not inspect.isclass(value):
        assert signature.return_annotation is not inspect.Signature.empty, f"lowrank.{name} has no return type"


def test_mypy_accepts_the_public_api(tmp_path):
    pytest.importorskip("mypy")
    # The installed layout (compressor/ is lowrank, calibration/ and cli/ its subpackages), rebuilt for mypy.
    package = tmp_path / "lowrank"
    shutil.copytree(os.path.join(ROOT, "compressor"), package)
    shutil.copytree(os.path.join(ROOT, "calibration"), package / "calibration")
    shutil.copytree(os.path.join(ROOT, "cli"), package / "cli")
    files = sorted({importlib.import_module(module).__file__ for module, _ in lowrank._API.values()})
    relative = [os.path.join("lowrank", os.path.relpath(path, os.path.dirname(lowrank.__file__))) for path in files]
    command = [sys.executable, "-m", "mypy", "--config-file", os.path.join(ROOT, "pyproject.toml"),
               "--cache-dir", str(tmp_path / "cache"), *relative]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
