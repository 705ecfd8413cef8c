"""The architecture matrix (issue 16): for every model type of tests/archs.py, a tiny random checkpoint is
compressed through the API and checked: (a) at explicit full ranks its logits equal the dense model's; (f) the
block walker's statistics equal those of plain forward passes (each block replayed with its own mask and rotary
tables); (b) at keep 0.8 it loads in a fresh process where lowrank cannot be imported, with the model's own Auto
class and remote code, and gives lowrank.load_pretrained's logits; (c) greedy generate() with the KV cache equals
generate() without it; (d) a PEFT LoRA attaches to the factorized layers and changes the output; (e) densify
round-trips. Model types lowrank cannot compress are refused with one line. Encoder-decoders (T5, BART, and
Whisper, calibrated from audio: test_speech.py) are in the matrix with both stacks compressed; the tests below
check that the decoder is calibrated on the compressed encoder's output of each batch. Select with `-m architectures`.
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


def test_an_encoder_decoder_compresses_both_stacks_by_default(tmp_path, tokenizer, calib_file, capsys):
    """T5 from the CLI, no --blocks: the encoder's and the decoder's blocks are factorized under the one ratio, the
    run says so, and the report names both stacks with nothing left dense as 'other stacks'."""
    import json

    source = str(tmp_path / "t5")
    dense = archs.build("t5")
    dense.save_pretrained(source)
    tokenizer.save_pretrained(source)
    output = str(tmp_path / "out")
    code, out, err = run(["compress", source, "-o", output, "--calib", calib_file, "--num-samples", "8",
                          "--seq-len", "32", "--alloc", "uniform", "--ratio", "0.6"], capsys)
    assert code == 0, err
    assert "compressing the blocks of encoder.block and decoder.block" in out + err
    with open(f"{output}/compression_report.json") as f:
        report = json.load(f)
    assert report["model"]["blocks"] == "encoder.block,decoder.block"
    names = [layer["name"] for layer in report["layers"]["list"]]
    assert {name.split(".")[0] for name in names} == {"encoder", "decoder"}
    assert any(".EncDecAttention.k" in name for name in names)
    assert all(layer["rank"] is not None for layer in report["layers"]["list"])
    assert "stacks" not in {entry["kind"] for entry in report["coverage"]["not_targeted"]}
    assert report["verify"]["skipped"] == "not a causal language model (no next-token perplexity)"


def test_blocks_names_several_stacks_with_commas():
    """An encoder-decoder's default is its two stacks in run order, the same as naming them; the blocks are
    numbered across the stacks, and a wrong name among them is the usual one line."""
    from lowrank.compression.config import CompressConfig
    from lowrank.compression.targets import select_targets
    from lowrank.errors import UsageError

    model = archs.build("bart")
    both = "model.encoder.layers,model.decoder.layers"
    assert CompressConfig.from_options(blocks=both).blocks == both
    name, blocks, targets = select_targets(model)
    assert name == both and len(blocks) == 4 and select_targets(model, blocks=both)[2] == targets
    assert targets[0][0].startswith("model.encoder.layers.0.") and targets[3][0].startswith("model.decoder.layers.1.")
    with pytest.raises(UsageError, match="--blocks model.nothing is not a list of blocks"):
        select_targets(model, blocks="model.encoder.layers,model.nothing")


@pytest.mark.parametrize("options, says", [
    (["--calib", "self"], "--calib FILE"),  # selfgen samples a causal LM
    (["--alloc", "fisher"], "--alloc uniform or global"),  # gradients of a causal LM's loss
    (["--stream", "on"], "--stream off"),  # the decoder's capture runs the whole (compressed) encoder
])
def test_what_an_encoder_decoder_cannot_do_is_one_line(options, says, tmp_path, tokenizer, calib_file, capsys):
    source = str(tmp_path / "bart")
    archs.build("bart").save_pretrained(source)
    tokenizer.save_pretrained(source)
    output = str(tmp_path / "out")
    code, _, err = run(["compress", source, "-o", output, "--calib", calib_file, "--num-samples", "8",
                        "--seq-len", "32", *options], capsys)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and says in errors[0] and "Traceback" not in err, err
    assert not os.path.exists(output)


@pytest.mark.parametrize("model_type", ["bart", "t5", "whisper"])
def test_the_decoder_is_calibrated_on_the_changed_encoders_output(model_type):
    """The walk changes the encoder's blocks (here: their MLP output layer scaled by 0.5, standing for a
    compression); the statistics the walk then collects for the decoder's cross-attention keys and values are
    those of a plain forward pass of the *changed* model, batch by batch, and not the original model's."""
    from lowrank.compression.sequential import WalkOptions, walk_blocks
    from lowrank.compression.targets import select_targets

    model = archs.build(model_type)
    ids = archs.calibration_ids(model_type=model_type)
    blocks_name, _, targets = select_targets(model)
    encoder_blocks = len(model.get_submodule(blocks_name.split(",")[0]))
    cross = [name for names in targets.values() for name in names
             if name.endswith(("encoder_attn.k_proj", "encoder_attn.v_proj", "EncDecAttention.k", "EncDecAttention.v"))]
    assert len(cross) == 4
    walked = {}

    def visit(index, block, names, collector):
        for name in names:
            if name in cross:
                walked[name] = collector.stats_of(name).gram.clone()
        if index < encoder_blocks:
            mlp_out = [module for rel, module in block.named_modules() if rel.endswith(("fc2", "DenseReluDense.wo"))]
            with torch.no_grad():
                mlp_out[0].weight.mul_(0.5)
        return []

    original = {name: gram for name, gram in _forward_grams(archs.build(model_type), cross, ids).items()}
    walk_blocks(model, ids, targets, blocks_name, visit, WalkOptions(batch_size=4))
    changed = _forward_grams(model, cross, ids)
    for name in cross:
        assert float((walked[name] - changed[name]).norm() / changed[name].norm()) < 1e-6, name
        # BART's post-norm encoder moves its output Gram by 1.5% here, T5's by 60%: far above the 1e-6 above
        assert float((walked[name] - original[name]).norm() / original[name].norm()) > 1e-3, name


def _forward_grams(model, names, ids, batch_size=4):
    """Gram matrices (float64) of the named layers' inputs over plain forward passes, in the walk's batches."""
    grams, handles = {}, []

    def hook(name):
        def accumulate(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            grams[name] = grams.get(name, 0) + x.T @ x
        return accumulate

    for name in names:
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook(name)))
    try:
        with torch.no_grad():
            for batch in ids.split(batch_size):
                model(**archs.model_kwargs(model, batch), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return grams


def test_an_encoder_decoder_run_resumes_in_the_decoder(tmp_path, tokenizer, calib_file, monkeypatch):
    """Interrupted after the first decoder block (block 2 of 4, numbered across the stacks), `resume` rebuilds the
    encoder from the journal, captures the decoder from it, and writes the bytes of an uninterrupted run."""
    import lowrank
    from lowrank.compression import api
    from lowrank.errors import Interrupted

    source = str(tmp_path / "bart")
    archs.save_source("bart", source, tokenizer)
    options = dict(archs.COMPRESS, calib=calib_file, ratio=0.6)
    lowrank.compress(source, str(tmp_path / "whole"), **options)
    block_done = api._Job.block_done

    def stop_after_the_first_decoder_block(job, index, block, layers):
        block_done(job, index, block, layers)
        if index == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(api._Job, "block_done", stop_after_the_first_decoder_block)
    with pytest.raises(Interrupted, match="after block 3"):
        lowrank.compress(source, str(tmp_path / "out"), **options)
    monkeypatch.setattr(api._Job, "block_done", block_done)
    report = lowrank.compress(source, str(tmp_path / "out"), **options, resume=True)
    assert report["resumed_at_block"] == 3
    written = [(tmp_path / name / "model.safetensors").read_bytes() for name in ("out", "whole")]
    assert written[0] == written[1]
