"""Property-based tests over every parser and loader that reads a user's file: random and mutated inputs.

For each input the outcome is a success or a clean failure: exit code 1, 2 or 3, exactly one `error: ` line
(the last line of stderr), no traceback, no output (or `.lowrank-partial` sibling) left behind, and the input
files unchanged. An internal error's generic line (`error: TypeError: ... (run with --debug for the traceback)`)
is clean in form but is a bug, and fails the test. The defect classes these properties found are fixed; each has
a regression test below.

Examples per property (EXAMPLES) are sized for a 2-core machine; RELIABILITY.md gives the counts.
"""

import json
import os
import shutil
import struct
import tempfile
from fractions import Fraction

import pytest
from conftest import assert_clean_failure, run, tree_digest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowrank.errors import UsageError
from lowrank.units import parse_size

EXAMPLES = {
    "size_valid": 300, "size_random": 300, "size_mutated": 300,
    "squeeze_safetensors": 40, "densify_safetensors": 20, "report_safetensors": 8,
    "peft_config": 40, "report_json": 120, "report_json_gate": 60, "calib": 12,
}
INTERNAL = "(run with --debug for the traceback)"


def slow(name):
    return settings(max_examples=EXAMPLES[name], deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


# --- the outcome -------------------------------------------------------------------------------------------------


def partial_siblings(output):
    parent = os.path.dirname(os.path.abspath(output))
    return [name for name in os.listdir(parent) if "lowrank-partial" in name]


def check_outcome(code, err, output, before, after, gate_failure_ok=False):
    """Success, or a clean failure; `before`/`after`: digests of the inputs. Returns "ok" or "clean"."""
    assert before == after, "the input files changed"
    assert "Traceback" not in err, err
    assert not partial_siblings(output), err
    if code == 0:
        return "ok"
    lines = err.strip().splitlines()
    if gate_failure_ok and code == 1 and any(line.startswith("FAILED ") for line in lines):
        assert not [line for line in lines if line.startswith("error: ")], err
        return "ok"
    assert code in (1, 2, 3), (code, err)
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert not os.path.exists(output), err
    assert INTERNAL not in errors[0], f"an internal error, not a clean message: {errors[0]}"
    return "clean"


# --- sizes -------------------------------------------------------------------------------------------------------

UNITS = {"": (1000, 0), "k": (1000, 1), "m": (1000, 2), "g": (1000, 3), "t": (1000, 4),
         "ki": (1024, 1), "mi": (1024, 2), "gi": (1024, 3), "ti": (1024, 4)}


@st.composite
def size_strings(draw):
    whole = draw(st.integers(0, 10**15))
    fraction = draw(st.one_of(st.just(""), st.text("0123456789", min_size=1, max_size=8)))
    number = f"{whole}.{fraction}" if fraction else str(whole)
    if fraction and draw(st.booleans()) and whole == 0:
        number = "." + fraction
    unit = draw(st.sampled_from(sorted(UNITS)))
    suffix = unit + draw(st.sampled_from(["", "b"]))
    suffix = "".join(c.upper() if draw(st.booleans()) else c for c in suffix)
    space = st.sampled_from(["", " ", "  ", "\t"])
    text = draw(space) + number + draw(space) + suffix + draw(space)
    base, power = UNITS[unit]
    return text, int(Fraction(number) * base**power)


@slow("size_valid")
@given(size_strings())
def test_valid_sizes_give_their_byte_count(case):
    text, expected = case
    assert parse_size(text) == expected


def parses_or_usage_error(value):
    try:
        result = parse_size(value)
    except UsageError:
        return
    assert isinstance(result, int) and result >= 0


@slow("size_random")
@given(st.one_of(st.text(), st.text("0123456789.kmgtibKMGTIB -+eE_,"), st.binary().map(lambda b: b.decode("latin-1")),
                 st.integers(), st.floats(), st.none(), st.booleans()))
def test_any_size_text_parses_or_is_a_usage_error(value):
    parses_or_usage_error(value)


@slow("size_mutated")
@given(size_strings(), st.lists(st.tuples(st.sampled_from(["insert", "delete", "replace"]), st.integers(0, 40),
                                          st.characters()), min_size=1, max_size=4))
def test_mutated_sizes_parse_or_are_a_usage_error(case, edits):
    text = case[0]
    for op, where, char in edits:
        where = where % (len(text) + 1)
        if op == "insert":
            text = text[:where] + char + text[where:]
        elif op == "delete":
            text = text[:where] + text[where + 1:]
        else:
            text = text[:where] + char + text[where + 1:]
    parses_or_usage_error(text)


def test_a_size_of_many_digits_is_exact_not_an_overflow():
    # regression: float('9' * 400) is inf, and int(inf) raised OverflowError (an internal error, not exit 2)
    assert parse_size("9" * 400 + "KB") == int("9" * 400) * 1000
    assert parse_size("4.35KB") == 4350  # a float gives 4349


# --- safetensors files -------------------------------------------------------------------------------------------


def split_safetensors(data):
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length]), data[8 + length:]


def join_safetensors(header, body):
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + body


JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
                      st.text(max_size=8))
JSON_VALUE = st.recursive(JSON_LEAF, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                             st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                          max_leaves=6)
OFFSET = st.one_of(st.integers(-10, 2**20), st.integers(0, 2**64 + 5), st.just(0))


@st.composite
def mutated_safetensors(draw, original):
    """Bytes of a damaged safetensors file made from `original` (a valid one)."""
    header, body = split_safetensors(original)
    keys = sorted(k for k in header if k != "__metadata__")
    key = draw(st.sampled_from(keys))
    entry = header[key]
    how = draw(st.sampled_from(["random", "truncate", "length", "offsets", "overlap", "dtype", "shape", "drop_field",
                                "entry", "not_object", "metadata", "body", "bad_utf8", "shift"]))
    if how == "random":
        return draw(st.binary(max_size=200))
    if how == "truncate":
        return original[:draw(st.integers(0, len(original) - 1))]
    if how == "length":
        length = draw(st.one_of(st.integers(0, 2**64 - 1), st.integers(-20, 20).map(
            lambda d: max(0, len(original) - 8 - len(body) + d))))
        return struct.pack("<Q", length) + original[8:]
    if how == "offsets":
        entry["data_offsets"] = [draw(OFFSET), draw(OFFSET)]
    elif how == "overlap":
        entry["data_offsets"] = list(header[draw(st.sampled_from(keys))]["data_offsets"])
    elif how == "dtype":
        entry["dtype"] = draw(st.one_of(st.sampled_from(["F8", "Q4", "float32", "", "BOOL", "I64", "F64", "U8",
                                                         "F8_E4M3", "BF16", "f32"]), JSON_LEAF))
    elif how == "shape":
        entry["shape"] = draw(st.one_of(st.lists(st.integers(-2, 2**62), max_size=4), JSON_VALUE))
    elif how == "drop_field":
        del entry[draw(st.sampled_from(sorted(entry)))]
    elif how == "entry":
        header[key] = draw(JSON_VALUE)
    elif how == "not_object":
        header = draw(st.one_of(JSON_LEAF, st.lists(JSON_LEAF, max_size=3)))
    elif how == "metadata":
        header["__metadata__"] = draw(JSON_VALUE)
    elif how == "body":
        body = body[:draw(st.integers(0, max(0, len(body) - 1)))]
    elif how == "bad_utf8":
        blob = json.dumps(header).encode()
        cut = draw(st.integers(0, len(blob)))
        return join_safetensors(blob[:cut] + draw(st.binary(min_size=1, max_size=4)) + blob[cut:], body)
    elif how == "shift":
        delta = draw(st.integers(-64, 64))
        entry["data_offsets"] = [entry["data_offsets"][0] + delta, entry["data_offsets"][1] + delta]
    return join_safetensors(header, body)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    from test_squeeze_peft import make_adapter

    directory = tmp_path_factory.mktemp("adapter") / "plain"
    make_adapter(str(directory), "plain")
    return str(directory)


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, llama_dir, calib_file):
    import lowrank

    out = str(tmp_path_factory.mktemp("compressed") / "lr")
    lowrank.compress(llama_dir, out, calib=calib_file, ratio=0.5, num_samples=4, seq_len=32, batch_size=4)
    return out


def read(path):
    with open(path, "rb") as f:
        return f.read()


class Blob(bytes):
    """Bytes with a short repr (hypothesis prints a failing example's fixtures)."""

    def __repr__(self):
        return f"<{len(self)} bytes>"


def run_on_copy(source, replace, argv, capsys, **check):
    """Copy `source` into a fresh directory, write `replace` ({relative name: bytes or None to delete}), run the
    CLI with argv (IN and OUT substituted) and check the outcome."""
    with tempfile.TemporaryDirectory() as work:
        directory = os.path.join(work, "in")
        shutil.copytree(source, directory)
        for name, data in replace.items():
            path = os.path.join(directory, name)
            if data is None:
                os.remove(path)
            else:
                with open(path, "wb") as f:
                    f.write(data)
        output = os.path.join(work, "out")
        before = tree_digest(directory)
        code, _, err = run([directory if a == "IN" else output if a == "OUT" else a for a in argv], capsys)
        return check_outcome(code, err, output, before, tree_digest(directory), **check)


@pytest.fixture(scope="module")
def adapter_weights(adapter):
    return Blob(read(os.path.join(adapter, "adapter_model.safetensors")))


@slow("squeeze_safetensors")
@given(data=st.data())
def test_squeeze_survives_a_damaged_adapter_file(adapter, adapter_weights, capsys, data):
    damaged = data.draw(mutated_safetensors(adapter_weights))
    run_on_copy(adapter, {"adapter_model.safetensors": damaged}, ["squeeze", "IN", "--rank", "2", "-o", "OUT", "-q"],
                capsys)


@slow("densify_safetensors")
@given(data=st.data())
def test_densify_survives_a_damaged_checkpoint_file(compressed, capsys, data):
    damaged = data.draw(mutated_safetensors(read(os.path.join(compressed, "model.safetensors"))))
    run_on_copy(compressed, {"model.safetensors": damaged}, ["densify", "IN", "-o", "OUT", "-q"], capsys)


@slow("report_safetensors")
@given(data=st.data())
def test_report_survives_damaged_weights_and_spectra(compressed, capsys, data):
    name = data.draw(st.sampled_from(["model.safetensors", "lowrank_spectra.safetensors"]))
    damaged = data.draw(mutated_safetensors(read(os.path.join(compressed, name))))
    run_on_copy(compressed, {name: damaged}, ["report", "IN", "--plot", "OUT", "-q"], capsys)


# regression: read_header checked the length prefix, JSON and the promised size, but not the header's structure:
# a non-object header, an entry that is not an object or lacks data_offsets, or data_offsets that are not two
# integers escaped as `error: KeyError: 'data_offsets' (run with --debug for the traceback)`.
@pytest.mark.parametrize("header", [[1], None, 3, {"a": []},
                                    {"a": {"dtype": "F32", "shape": [1]}},
                                    {"a": {"dtype": "F32", "shape": [1], "data_offsets": None}},
                                    {"a": {"dtype": "F32", "shape": [1], "data_offsets": [4]}},
                                    {"a": {"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]}}],
                         ids=["list", "null", "number", "entry-list", "no-offsets", "offsets-null", "one-offset",
                              "offsets-strings"])
@pytest.mark.parametrize("command", ["squeeze", "densify"])
def test_a_structurally_wrong_header_is_a_clean_error(command, header, adapter, compressed, capsys):
    source, name = (adapter, "adapter_model.safetensors") if command == "squeeze" else (compressed,
                                                                                         "model.safetensors")
    argv = ["squeeze", "IN", "--rank", "2", "-o", "OUT"] if command == "squeeze" else ["densify", "IN", "-o", "OUT"]
    with tempfile.TemporaryDirectory() as work:
        directory = os.path.join(work, "in")
        shutil.copytree(source, directory)
        with open(os.path.join(directory, name), "wb") as f:
            f.write(join_safetensors(header, b"\0" * 64))
        output = os.path.join(work, "out")
        code, _, err = run([directory if a == "IN" else output if a == "OUT" else a for a in argv], capsys)
        assert_clean_failure(code, err, 1, name, output)
        assert INTERNAL not in err


F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize("header,message", [
    ({"a": {**F32, "dtype": "Q4"}}, "dtype 'Q4'"),
    ({"a": {**F32, "dtype": 4}}, "dtype 4"),
    ({"a": {**F32, "shape": [-2]}}, "shape [-2]"),
    ({"a": {**F32, "shape": "2"}}, "shape \"2\""),
    ({"a": {**F32, "shape": [True, 2]}}, "shape [true, 2]"),
    ({"a": {**F32, "data_offsets": [8, 0]}}, "data_offsets [8, 0]"),
    ({"a": {**F32, "data_offsets": [-8, 0]}}, "data_offsets [-8, 0]"),
    ({"a": {**F32, "data_offsets": [0.0, 8]}}, "data_offsets [0.0, 8]"),
    ({"a": {**F32, "data_offsets": [False, 8]}}, "data_offsets [false, 8]"),
    ({"a": {**F32, "shape": [3]}}, "spans 8 bytes, but F32 of shape [3] needs 12 bytes"),
    ({"a": {**F32, "dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}, "12 bits, not a whole number of bytes"),
    ({"a": {**F32, "shape": [2**62] * 9}}, "needs"),
    ({"a": {"shape": [2], "data_offsets": [0, 8]}}, "has no dtype"),
    ({"__metadata__": {"format": 1}, "a": F32}, "__metadata__ is not an object of strings"),
    ({"__metadata__": [], "a": F32}, "__metadata__ is not an object of strings"),
    ({"a\nb": "x"}, "entry for 'a\\nb' is a JSON string"),
    ({"a": {**F32, "data_offsets": [0, 16], "shape": [4]}}, "truncated: the header promises"),
])
def test_read_header_refuses_a_malformed_header_by_name(tmp_path, header, message):
    from lowrank.errors import LowrankError
    from lowrank.io.shards import read_header

    path = tmp_path / "w.safetensors"
    path.write_bytes(join_safetensors(header, b"\0" * 8))
    with pytest.raises(LowrankError) as refused:
        read_header(str(path))
    assert "w.safetensors" in str(refused.value) and message in str(refused.value), str(refused.value)
    assert len(f"a{refused.value}a".splitlines()) == 1


@pytest.mark.parametrize("header", [{}, {"__metadata__": None, "a": F32}, {"a": {**F32, "extra": [1]}},
                                    {"a": {**F32, "dtype": "F4", "shape": [16]}},
                                    {"a": {**F32, "shape": [0], "data_offsets": [8, 8]}, "b": F32}])
def test_read_header_accepts_what_safetensors_reads(tmp_path, header):
    from safetensors import safe_open

    from lowrank.io.shards import read_header

    path = tmp_path / "w.safetensors"
    path.write_bytes(join_safetensors(header, b"\0" * 8 if len(header) - ("__metadata__" in header) else b""))
    with safe_open(str(path), "pt"):
        pass
    assert read_header(str(path)) == header


# regression: an input string with a line break (a dtype, a module name, a field value) quoted in an error message
# split the `error:` line in two (the main entry point printed str(error) as is); e.g. the safetensors error for
# dtype '\n' in squeezing/formats.py _open_weights
def test_an_error_quoting_a_line_break_stays_one_line(adapter, adapter_weights, capsys):
    header, body = split_safetensors(adapter_weights)
    header[min(k for k in header if k != "__metadata__")]["dtype"] = "\n"
    with tempfile.TemporaryDirectory() as work:
        directory = os.path.join(work, "in")
        shutil.copytree(adapter, directory)
        with open(os.path.join(directory, "adapter_model.safetensors"), "wb") as f:
            f.write(join_safetensors(header, body))
        output = os.path.join(work, "out")
        code, _, err = run(["squeeze", directory, "--rank", "2", "-o", output], capsys)
        assert_clean_failure(code, err, 1, "adapter_model.safetensors", output)



@pytest.mark.parametrize("error", ["lowrank", "internal"])
@pytest.mark.parametrize("brk", ["\n", "\r\n", "\r", "\x0b", "\x0c", "\x1c", "\x85", "\u2028"])
def test_every_line_break_in_a_message_is_escaped(error, brk, capsys, monkeypatch):
    import lowrank.environment
    from lowrank.errors import LowrankError

    def fail():
        raise (LowrankError if error == "lowrank" else ValueError)(f"name{brk}x{brk}")

    monkeypatch.setattr(lowrank.environment, "env_info", fail)
    code, _, err = run(["env"], capsys)
    assert code == 1 and len(err.splitlines()) == 1 and err.startswith("error: "), repr(err)
    shown = repr(brk)[1:-1]
    assert f"name{shown}x" in err if error == "lowrank" else "ValueError: name (run with --debug" in err, repr(err)

# --- PEFT adapter configs ----------------------------------------------------------------------------------------

CONFIG_FIELDS = ["r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora",
                 "peft_type", "modules_to_save", "fan_in_fan_out", "layers_to_transform", "lora_bias",
                 "base_model_name_or_path", "task_type", "bias"]
FIELD_VALUES = st.one_of(JSON_VALUE, st.integers(-3, 64), st.sampled_from([0, -1, 2**40, 1.5, float("nan"),
                                                                          float("inf"), "8", "all-linear", "q_proj",
                                                                          ["q_proj"], ["nope"], {"q_proj": 0},
                                                                          {"q_proj": -2}, {"q_proj": "x"},
                                                                          {"[": 4}, True, "LORA", "LOHA"]))


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory, adapter, adapter_weights):
    """Weights that do not match the plain adapter's config: fewer tensors, another rank, a DoRA's, none."""
    import torch
    from safetensors.torch import load_file, save, save_file
    from test_squeeze_peft import make_adapter

    tensors = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    names = sorted(tensors)
    half = {k: v for k, v in tensors.items() if k not in names[::2]}
    only_a = {k: v for k, v in tensors.items() if "lora_A" in k}
    smaller = {k: (v[:4] if "lora_A" in k else v[:, :4]).contiguous() for k, v in tensors.items()}
    renamed = {k.replace("layers", "blocks"): v for k, v in tensors.items()}
    wide = {k: torch.cat([v, v], 0 if "lora_A" in k else 1).contiguous() for k, v in tensors.items()}
    halfp = {k: v.half() for k, v in tensors.items()}
    dora = tmp_path_factory.mktemp("dora") / "a"
    make_adapter(str(dora), "dora")
    path = str(tmp_path_factory.mktemp("w") / "x.safetensors")
    save_file({}, path)
    files = {"original": adapter_weights, "half": save(half), "only_a": save(only_a), "rank4": save(smaller),
             "renamed": save(renamed), "rank16": save(wide), "float16": save(halfp), "empty": read(path),
             "dora": read(os.path.join(dora, "adapter_model.safetensors"))}
    return {"missing": None, **{name: Blob(data) for name, data in files.items()}}


@st.composite
def mutated_configs(draw, config):
    config = dict(config)
    how = draw(st.sampled_from(["fields", "fields", "fields", "not_object", "text"]))
    if how == "not_object":
        return json.dumps(draw(st.one_of(JSON_LEAF, st.lists(JSON_LEAF, max_size=3)))).encode()
    for _ in range(draw(st.integers(1, 3))):
        field = draw(st.sampled_from(CONFIG_FIELDS))
        if draw(st.integers(0, 3)) == 0:
            config.pop(field, None)
        else:
            config[field] = draw(FIELD_VALUES)
    text = json.dumps(config).encode()
    if how == "text":
        return text[:draw(st.integers(0, len(text) - 1))] + draw(st.binary(max_size=3))
    return text


# regression: squeeze read rank_pattern/alpha_pattern of adapter_config.json without checking them
# (squeezing/formats.py: `(patterns or {}).items()`, `re.match(key)`): a non-object pattern or a key that is not a
# regular expression was an internal error (`error: AttributeError: 'int' object has no attribute 'items'`), not a
# usage error naming the field
@pytest.mark.parametrize("field,value", [("rank_pattern", 3), ("rank_pattern", {"[": 4}), ("alpha_pattern", [1]),
                                         ("rank_pattern", {"q_proj": 0}), ("rank_pattern", {"q_proj": 2.5}),
                                         ("rank_pattern", {"q_proj": True}), ("alpha_pattern", {"q_proj": "x"}),
                                         ("alpha_pattern", {"q_proj": float("nan")}), ("alpha_pattern", {"(": 2})])
def test_a_malformed_pattern_is_a_usage_error(field, value, adapter, capsys):
    with open(os.path.join(adapter, "adapter_config.json")) as f:
        config = json.load(f)
    config[field] = value
    with tempfile.TemporaryDirectory() as work:
        directory = os.path.join(work, "in")
        shutil.copytree(adapter, directory)
        with open(os.path.join(directory, "adapter_config.json"), "w") as f:
            json.dump(config, f)
        output = os.path.join(work, "out")
        code, _, err = run(["squeeze", directory, "--rank", "2", "-o", output], capsys)
        assert_clean_failure(code, err, 2, field, output)


# regression: densify opened shards with safetensors without wrapping its errors (squeeze's formats._open_weights
# does): a header whose offsets do not tile the data, or a dtype safetensors does not know, was `error:
# SafetensorError: Error while deserializing header: ... (run with --debug for the traceback)`
@pytest.mark.parametrize("damage", ["shift", "dtype"])
def test_densify_names_a_shard_safetensors_refuses(damage, compressed, capsys):
    header, body = split_safetensors(read(os.path.join(compressed, "model.safetensors")))
    entry = header[sorted(k for k in header if k != "__metadata__")[1]]
    if damage == "shift":
        entry["data_offsets"] = [entry["data_offsets"][0] + 4, entry["data_offsets"][1] + 4]
    else:
        entry["dtype"] = "Q4"
    with tempfile.TemporaryDirectory() as work:
        directory = os.path.join(work, "in")
        shutil.copytree(compressed, directory)
        with open(os.path.join(directory, "model.safetensors"), "wb") as f:
            f.write(join_safetensors(header, body))
        output = os.path.join(work, "out")
        code, _, err = run(["densify", directory, "-o", output], capsys)
        assert_clean_failure(code, err, 1, "model.safetensors", output)
        assert INTERNAL not in err


@slow("peft_config")
@given(data=st.data())
def test_squeeze_survives_a_damaged_adapter_config(adapter, other_weights, capsys, data):
    with open(os.path.join(adapter, "adapter_config.json")) as f:
        config = json.load(f)
    text = data.draw(mutated_configs(config))
    weights = data.draw(st.sampled_from(sorted(other_weights)))
    run_on_copy(adapter, {"adapter_config.json": text, "adapter_model.safetensors": other_weights[weights]},
                ["squeeze", "IN", "--rank", "2", "-o", "OUT", "-q"], capsys)


# --- report JSON -------------------------------------------------------------------------------------------------


@st.composite
def contract_reports(draw):
    """A report that follows report/schema.py's contract and nothing more."""
    from lowrank.report.schema import READABLE_VERSIONS

    kind = draw(st.sampled_from(sorted(READABLE_VERSIONS)))
    number = st.one_of(st.integers(0, 10**9), st.floats(0, 1e9, allow_nan=False))
    layer = st.fixed_dictionaries({
        "name": st.text(min_size=1, max_size=20), "rank": st.one_of(st.none(), st.integers(1, 64)),
        "params_before": number, "params_after": number, "energy_kept": st.floats(0, 1), "rel_error": st.floats(0, 2),
    })
    evaluation = st.fixed_dictionaries({"schema": st.just("lowrank.evaluation"), "schema_version": st.just(1)})
    return {
        "schema": "lowrank." + draw(st.sampled_from(["compression", "squeeze", "compensate", "evaluation", "x"])),
        "schema_version": draw(st.integers(1, READABLE_VERSIONS[kind])), "kind": kind,
        "versions": draw(st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3)),
        "command": draw(st.text(max_size=30)),
        "evaluations": draw(st.lists(evaluation, max_size=2)),
        "layers": {"list": draw(st.lists(layer, max_size=4))},
    }


def paths_of(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from paths_of(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from paths_of(child, (*prefix, index))


@st.composite
def mutated_reports(draw, real_reports):
    """Text of a report JSON: a contract report or a real one, then damaged (or not)."""
    report = draw(st.one_of(contract_reports(), st.sampled_from(real_reports).map(json.loads)))
    how = draw(st.sampled_from(["none", "delete", "replace", "replace", "extra", "truncate", "bytes", "non_json"]))
    if how in ("delete", "replace", "extra"):
        for _ in range(draw(st.integers(1, 3))):
            path = draw(st.sampled_from(list(paths_of(report))[1:] or [()]))
            if not path:
                break
            parent = report
            for step in path[:-1]:
                parent = parent[step]
            if how == "delete":
                del parent[path[-1]]
            elif how == "replace":
                parent[path[-1]] = draw(JSON_VALUE)
            elif isinstance(parent, dict):
                parent[draw(st.text(max_size=8))] = draw(JSON_VALUE)
    text = json.dumps(report, indent=2).encode()
    if how == "truncate":
        return text[:draw(st.integers(0, len(text) - 1))]
    if how == "bytes":
        return draw(st.binary(max_size=300))
    if how == "non_json":
        return draw(st.text(max_size=200)).encode("utf-8", "surrogatepass")
    return text


@pytest.fixture(scope="module")
def real_reports(compressed, adapter, tmp_path_factory):
    import lowrank

    squeezed = str(tmp_path_factory.mktemp("squeezed") / "s")
    lowrank.squeeze(adapter, squeezed, rank=2)
    return [read(os.path.join(compressed, "compression_report.json")).decode(),
            read(os.path.join(squeezed, "squeeze_report.json")).decode()]


def check_report_text(text, gate, capsys):
    with tempfile.TemporaryDirectory() as work:
        path = os.path.join(work, "report.json")
        with open(path, "wb") as f:
            f.write(text)
        before = read(path)
        code, _, err = run(["report", path, *gate], capsys)
        return check_outcome(code, err, os.path.join(work, "no-output"), before, read(path), gate_failure_ok=True)


@slow("report_json")
@given(data=st.data())
def test_report_reads_any_report_json(real_reports, capsys, data):
    check_report_text(data.draw(mutated_reports(real_reports)), [], capsys)


@slow("report_json_gate")
@given(data=st.data())
def test_report_gates_any_report_json(real_reports, capsys, data):
    check_report_text(data.draw(mutated_reports(real_reports)), ["--max-ppl-increase", "10%"], capsys)


# --- calibration files -------------------------------------------------------------------------------------------


@st.composite
def calibration_files(draw):
    """(suffix, bytes) of a calibration file that is probably unusable."""
    how = draw(st.sampled_from(["bytes", "unicode", "empty", "jsonl", "csv", "json"]))
    if how == "bytes":
        return draw(st.sampled_from([".txt", ".jsonl", ".csv", ".bin", ".parquet"])), draw(st.binary(max_size=400))
    if how == "unicode":
        return ".txt", draw(st.text(max_size=300)).encode("utf-8", "surrogatepass")
    if how == "empty":
        return draw(st.sampled_from([".txt", ".jsonl", ".csv", ".json"])), draw(st.sampled_from([b"", b"\n", b" \n\t"]))
    if how == "jsonl":
        rows = draw(st.lists(st.dictionaries(st.sampled_from(["txt", "content", "Text", "text "]), JSON_LEAF,
                                             min_size=1, max_size=2), min_size=1, max_size=4))
        return ".jsonl", "\n".join(json.dumps(row) for row in rows).encode()
    if how == "json":
        return ".json", json.dumps(draw(JSON_VALUE)).encode()
    columns = draw(st.lists(st.sampled_from(["a", "body", "label", "TEXT"]), min_size=1, max_size=3, unique=True))
    rows = draw(st.lists(st.lists(st.text("abc ,\"xyz", max_size=10), min_size=len(columns),
                                  max_size=len(columns)), max_size=4))
    return ".csv", "\n".join(",".join(row) for row in [columns, *rows]).encode()


@slow("calib")
@given(calibration_files())
def test_compress_survives_any_calibration_file(llama_dir, capsys, case):
    suffix, data = case
    with tempfile.TemporaryDirectory() as work:
        path = os.path.join(work, "calib" + suffix)
        with open(path, "wb") as f:
            f.write(data)
        before = tree_digest(llama_dir)
        output = os.path.join(work, "out")
        code, _, err = run(["compress", llama_dir, "-o", output, "--calib", path, "--num-samples", "2",
                            "--seq-len", "16", "-q"], capsys)
        assert read(path) == data
        check_outcome(code, err, output, before, tree_digest(llama_dir))



def test_a_report_with_a_bare_evaluation_is_a_report_error(tmp_path, capsys):
    # regression (found by test_report_reads_any_report_json): the contract requires only schema_version of an
    # evaluation; rendering one without `model` was `error: KeyError: 'model' (run with --debug ...)`
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"schema": "lowrank.compression", "schema_version": 1, "kind": "compensate",
                                "versions": {}, "command": "", "layers": {"list": []},
                                "evaluations": [{"schema": "lowrank.evaluation", "schema_version": 1}]}))
    for gate in ([], ["--max-ppl-increase", "10%"]):
        code, _, err = run(["report", str(path), *gate], capsys)
        assert_clean_failure(code, err, 3, "is damaged", str(tmp_path / "none"))
        assert INTERNAL not in err
