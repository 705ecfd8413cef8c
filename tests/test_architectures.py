"""The architecture matrix (issue 16): for every model type of tests/archs.py, a tiny random checkpoint is
compressed through the API and checked: (a) at explicit full ranks its logits equal the dense model's; (f) the
block walker's statistics equal those of plain forward passes (each block replayed with its own mask and rotary
tables); (b) at keep 0.8 it loads in a fresh process where lowrank cannot be imported, with the model's own Auto
class and remote code, and gives lowrank.load_pretrained's logits; (c) greedy generate() with the KV cache equals
generate() without it; (d) a PEFT LoRA attaches to the factorized layers and changes the output; (e) densify
round-trips. Model types lowrank cannot compress are refused with one line. Select with `-m architectures`.
"""

import os

import archs
import pytest
import torch
from conftest import run

pytestmark = pytest.mark.architectures


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """This module on one intra-op thread: its matrices are far too small to gain from more, and on a shared
    2-core machine two threads each spin-waiting for the other made it 2.5-6x slower (measured: one type's
    checks 15.6 s against 6.5 s under a load average of 6)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, tokenizer, calib_file):
    """Every type's checks in this process, then one fresh lowrank-free process that loads every output."""
    rows, failures = {}, {}
    for model_type in archs.TYPES:
        workdir = str(tmp_path_factory.mktemp(model_type))
        try:
            rows[model_type] = archs.run_type(model_type, workdir, tokenizer, calib_file)
        except Exception as error:  # reported by that type's test, so that one type does not hide the others
            failures[model_type] = f"{type(error).__name__}: {error}"
    foreign = archs.run_foreign([row["foreign_job"] for row in rows.values()])
    return rows, failures, foreign


def test_the_foreign_process_cannot_import_lowrank():
    probe = archs.run_foreign([])
    assert probe.returncode == 0, probe.stderr  # the loader exits non-zero when `import lowrank` succeeds
    done = archs.isolated_python("import transformers\nimport lowrank")
    assert done.returncode != 0 and "No module named 'lowrank'" in done.stderr, done.stderr


@pytest.mark.parametrize("model_type", list(archs.TYPES))
def test_architecture(matrix, model_type):
    rows, failures, foreign = matrix
    assert model_type not in failures, failures.get(model_type)
    assert foreign.returncode == 0, foreign.stderr[-3000:]
    row = rows[model_type]
    failed = [name for name, ok in archs.checks(row).items() if ok is False]
    assert not failed, f"failed {failed}: {row}"


@pytest.mark.parametrize("model_type", list(archs.REFUSED))
def test_refused_architecture_says_why_in_one_line(model_type, tmp_path, tokenizer, calib_file, capsys):
    source = str(tmp_path / "source")
    archs.build(model_type).save_pretrained(source)
    tokenizer.save_pretrained(source)
    output = str(tmp_path / "out")
    code, _, err = run(["compress", source, "-o", output, "--calib", calib_file, "--num-samples", "8",
                        "--seq-len", "32", "--alloc", "uniform", "--no-verify"], capsys)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and archs.REFUSED[model_type][2] in errors[0], err
    assert "Traceback" not in err and not os.path.exists(output)
    if "stacks" in errors[0]:
        assert "--blocks PATH" in errors[0]


def test_blocks_names_one_stack_and_the_rest_stays_dense(tmp_path, tokenizer, calib_file, capsys):
    """BART with --blocks model.encoder.layers at full rank: the encoder is factorized, the decoder is not, the
    run says so, and the logits are the dense model's; the decoder stack is compressed with the encoder
    outputs it really sees (a full-rank decoder run gives the dense logits too)."""
    import lowrank

    source = str(tmp_path / "bart")
    dense = archs.build("bart")
    dense.save_pretrained(source)
    tokenizer.save_pretrained(source)
    ids = archs.probe_ids()
    for stack in ("model.encoder.layers", "model.decoder.layers"):
        ranks = {}
        for index, block in enumerate(dense.get_submodule(stack)):
            for rel, module in block.named_modules():
                if isinstance(module, torch.nn.Linear):
                    ranks[f"{stack}.{index}.{rel}"] = min(module.weight.shape)
        output = str(tmp_path / stack.replace(".", "-"))
        report = lowrank.compress(source, output, **dict(archs.COMPRESS, calib=calib_file), ratio=1.0, ranks=ranks,
                                  blocks=stack)
        names = [layer["name"] for layer in report["layers"]["list"]]
        assert names and all(name.startswith(stack + ".") for name in names)
        model = lowrank.load_pretrained(output).eval()
        assert archs.max_error(archs.logits(model, ids), archs.logits(dense, ids)) < 1e-5
    code, _, err = run(["compress", source, "-o", str(tmp_path / "cli"), "--blocks", "model.decoder.layers",
                        "--calib", calib_file, "--num-samples", "8", "--seq-len", "32", "--alloc", "uniform",
                        "--no-verify", "--ratio", "0.8"], capsys)
    assert code == 0, err
    assert "the other stacks stay dense (model.encoder.layers; name one with --blocks PATH)" in err + _


@pytest.mark.parametrize("path", ["model.decoder", "model.nothing.layers", "model..layers"])
def test_a_wrong_blocks_path_is_one_line(path, tmp_path, tokenizer, calib_file, capsys):
    source = str(tmp_path / "bart")
    archs.build("bart").save_pretrained(source)
    tokenizer.save_pretrained(source)
    output = str(tmp_path / "out")
    code, _, err = run(["compress", source, "-o", output, "--blocks", path, "--calib", calib_file], capsys)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "--blocks" in errors[0], err
    assert "Traceback" not in err and not os.path.exists(output)
