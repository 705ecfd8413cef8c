"""The shape of the code, checked: no import cycles (module-level or inside functions), modules and functions of a
readable size unless they say why, and the public API importable without torch."""

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The package layout of pyproject.toml: compressor/ is lowrank, the others are its subpackages.
PACKAGES = {"compressor": "lowrank", "calibration": "lowrank.calibration", "cli": "lowrank.cli"}
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 80
REASON = "long:"  # a module or function over the limit says why, after this word, in its docstring or first line


def modules():
    """{dotted name: path} of every module of the installed package, from the source tree."""
    found = {}
    for folder, package in PACKAGES.items():
        for root, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(root, name)
                parts = os.path.relpath(path, os.path.join(ROOT, folder))[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                found[".".join([package, *parts])] = path
    return found


def imports(name, path, known):
    """The lowrank modules that `name` imports anywhere in its file (functions included)."""
    is_package = path.endswith("__init__.py")
    package = name if is_package else name.rpartition(".")[0]
    edges = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from pkg import sub` imports the submodule; `from mod import name` imports mod
            targets = [f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                edges.add(target)
    return edges


def cycles(graph):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles():
    known = modules()
    graph = {name: imports(name, path, known) for name, path in known.items()}
    # A package's __init__ importing its own parent is how submodules see `lowrank.__version__`: still a cycle if
    # the parent imported the child back, which the graph would show.
    assert not cycles(graph), f"import cycles: {cycles(graph)}"


def test_the_cycle_check_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def _too_long():
    problems = []
    for name, path in modules().items():
        source = open(path).read()
        tree = ast.parse(source)
        lines = source.count("\n")
        doc = ast.get_docstring(tree) or ""
        if lines > MAX_MODULE_LINES and REASON not in doc:
            problems.append(f"{name}: {lines} lines")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                first = source.splitlines()[node.body[0].lineno - 1]
                reason = REASON in (ast.get_docstring(node) or "") or REASON in first
                if length > MAX_FUNCTION_LINES and not reason:
                    problems.append(f"{name}.{node.name}: {length} lines")
    return problems


def test_modules_and_functions_are_short_or_say_why():
    assert not _too_long(), "over the limits without a reason ('long:' in the docstring): " + ", ".join(_too_long())


def test_public_api_and_cli_import_without_torch():
    code = ("import sys, lowrank, lowrank.cli, lowrank.compression.config, lowrank.squeezing.config, lowrank.methods;"
            "heavy = [m for m in ('torch', 'transformers', 'datasets') if m in sys.modules];"
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"importing the front end loaded {out}"


@pytest.mark.parametrize("name", ["compress", "squeeze", "compensate", "evaluate", "load_pretrained", "densify",
                                  "record_evaluation", "read_report", "CompressConfig", "SqueezeConfig"])
def test_public_api_resolves(name):
    import lowrank

    assert callable(getattr(lowrank, name))
    assert name in lowrank.__all__
