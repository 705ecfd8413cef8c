import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import COMPRESS_FAST, WITHOUT_LOWRANK
from safetensors import safe_open
from transformers import AutoTokenizer

import lowrank
from lowrank.compression.config import CompressConfig
from lowrank.compression.model import compress_model
from lowrank.errors import UsageError
from lowrank.io.checkpoint import unique_state_dict
from lowrank.io.loading import load_model, resolve_model
from lowrank.io.modeling_lowrank import FactorizedWeight, LowRankLinear


def ids(samples=2, length=24, seed=7):
    return torch.randint(5, 320, (samples, length), generator=torch.Generator().manual_seed(seed))


def compressed(source, out, calib_file, **kwargs):
    lowrank.compress(source, str(out), calib=calib_file, **{**COMPRESS_FAST, "ratio": 0.5, **kwargs})
    return str(out)


@pytest.fixture(scope="module")
def llama_out(tmp_path_factory, llama_dir, calib_file):
    return compressed(llama_dir, tmp_path_factory.mktemp("out") / "llama-lr50", calib_file)


def weight_keys(directory):
    keys = []
    for name in sorted(os.listdir(directory)):
        if name.startswith("model") and name.endswith(".safetensors"):
            with safe_open(os.path.join(directory, name), "pt") as f:
                keys += list(f.keys())
    return keys


def test_reloaded_logits_equal_in_memory_model(llama_dir, llama_out):
    # Redo the compression in memory with the same calibration windows and compare with the written checkpoint.
    from lowrank.calibration import load_calibration

    config = json.load(open(os.path.join(llama_out, "config.json")))
    calibration = config["lowrank"]["calibration"]
    model, tokenizer = load_model(resolve_model(llama_dir))
    data = load_calibration(calibration["source"], model, tokenizer, calibration["num_samples"],
                            calibration["seq_len"], seed=calibration["seed"])
    alloc = config["lowrank"]["settings"]["alloc"]  # what --alloc auto chose, recorded for reproduction
    compress_model(model, data.input_ids, CompressConfig(ratio=0.5, alloc=alloc, batch_size=COMPRESS_FAST["batch_size"]))
    reloaded = lowrank.load_pretrained(llama_out)
    assert type(reloaded).__name__ == "LowRankLlamaForCausalLM"
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids()).logits, model(input_ids=ids()).logits)


def test_checkpoint_layout(llama_out):
    files = set(os.listdir(llama_out))
    assert {"config.json", "model.safetensors", "modeling_lowrank.py", "compression_report.json",
            "compression_report.md", "README.md", "tokenizer.json", "generation_config.json"} <= files
    assert not any(name.startswith(".") for name in files)
    config = json.load(open(os.path.join(llama_out, "config.json")))
    assert config["model_type"] == "lowrank_llama"
    assert config["architectures"] == ["LowRankLlamaForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_lowrank.LowRankLlamaForCausalLM"
    block = config["lowrank"]
    assert block["format_version"] == 1 and block["method"] == "whiten" and block["ratio"] == 0.5
    assert "kept" in block["ratio_definition"]
    rank = block["ranks"]["model.layers.0.self_attn.q_proj"]  # --alloc auto: Fisher-weighted, below break-even
    assert block["settings"]["alloc"] == "fisher" and 1 <= rank < 32
    assert block["calibration"]["num_samples"] == 8 and block["calibration"]["seq_len"] == 64
    keys = weight_keys(llama_out)
    assert "model.layers.0.self_attn.q_proj.down.weight" in keys and "model.layers.0.mlp.down_proj.up.weight" in keys
    assert "model.layers.0.self_attn.q_proj.weight" not in keys
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys  # tied: stored once
    with safe_open(os.path.join(llama_out, "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert f.get_tensor("model.layers.0.self_attn.q_proj.down.weight").shape == (rank, 64)


def test_report_states_both_fractions(llama_out):
    report = json.load(open(os.path.join(llama_out, "compression_report.json")))
    assert report["schema"] == "lowrank.compression" and report["schema_version"] == 1
    targets, model = report["ratio"]["targets"], report["ratio"]["model"]
    assert targets["kept"] + targets["removed"] == pytest.approx(1)
    assert 0.45 < targets["kept"] <= 0.5 and model["kept"] > targets["kept"]
    factorized = [layer for layer in report["layers"]["list"] if layer["rank"] is not None]
    assert len(report["layers"]["list"]) == 21 and report["layers"]["factorized"] == len(factorized) >= 15
    layer = report["layers"]["list"][0]
    assert {"name", "shape", "rank", "params_before", "params_after", "energy_kept", "rel_error"} <= set(layer)
    assert report["size"]["bytes_after"] == os.path.getsize(os.path.join(llama_out, "model.safetensors"))
    markdown = open(os.path.join(llama_out, "compression_report.md")).read()
    assert "| layer | shape | rank |" in markdown and "removed" in markdown


def test_remote_code_load_without_lowrank(llama_out, tmp_path):
    """transformers alone (lowrank import blocked) loads the checkpoint with trust_remote_code, and refuses
    without it instead of building random weights."""
    script = WITHOUT_LOWRANK + textwrap.dedent(f"""
        import torch
        from transformers import AutoModel, AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained({llama_out!r}, trust_remote_code=False)
            print("LOADED-WITHOUT-FLAG")
        except Exception as error:
            print("REFUSED", type(error).__name__)
        model = AutoModelForCausalLM.from_pretrained({llama_out!r}, trust_remote_code=True)
        ids = torch.randint(5, 320, (2, 24), generator=torch.Generator().manual_seed(7))
        torch.save(model(input_ids=ids).logits.detach(), {str(tmp_path / "logits.pt")!r})
        base = AutoModel.from_pretrained({llama_out!r}, trust_remote_code=True)
        print(type(base).__name__, type(base.layers[0].mlp.up_proj).__name__, "lowrank" in sys.modules)
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained({llama_out!r}, trust_remote_code=True)
        print("TOKENS", tokenizer("hello world")["input_ids"])
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "REFUSED" in run.stdout and "LOADED-WITHOUT-FLAG" not in run.stdout
    assert "LowRankLlamaModel GroupedLowRankLinear False" in run.stdout  # factorized, grouped downs (the default)
    assert "Do you wish to run the custom code" not in run.stdout + run.stderr
    assert f"TOKENS {AutoTokenizer.from_pretrained(llama_out, trust_remote_code=True)('hello world')['input_ids']}" \
        in run.stdout
    remote = torch.load(tmp_path / "logits.pt", weights_only=True)
    with torch.no_grad():
        local = lowrank.load_pretrained(llama_out)(input_ids=ids()).logits
    assert torch.equal(remote, local)


def test_the_tokenizer_loads_without_a_prompt_once_lowrank_loaded_the_model(llama_out, tmp_path):
    """After lowrank.load_pretrained (which registers the checkpoint's classes), the usual
    AutoTokenizer.from_pretrained(out) needs no flag and asks nothing (stdin closed: a prompt would show)."""
    script = textwrap.dedent(f"""
        import lowrank
        from transformers import AutoTokenizer
        model = lowrank.load_pretrained({llama_out!r})
        print("TOKENS", AutoTokenizer.from_pretrained({llama_out!r})("hello world")["input_ids"])
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                         stdin=subprocess.DEVNULL, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "TOKENS [" in run.stdout and "custom code" not in run.stdout + run.stderr


def test_same_inputs_give_byte_identical_checkpoints(llama_dir, calib_file, tmp_path):
    a = compressed(llama_dir, tmp_path / "a", calib_file)
    b = compressed(llama_dir, tmp_path / "b", calib_file)
    for name in ("model.safetensors", "config.json", "modeling_lowrank.py", "tokenizer.json"):
        assert open(os.path.join(a, name), "rb").read() == open(os.path.join(b, name), "rb").read()


def test_sharded_output_loads(llama_dir, calib_file, tmp_path):
    out = compressed(llama_dir, tmp_path / "sharded", calib_file, max_shard_size="40KB")
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(index["weight_map"]) == sorted(weight_keys(out))
    total = sum(os.path.getsize(os.path.join(out, s)) for s in shards)
    assert index["metadata"]["total_size"] < total  # tensor bytes, without headers
    single = compressed(llama_dir, tmp_path / "single", calib_file)
    with torch.no_grad():
        a = lowrank.load_pretrained(out)(input_ids=ids()).logits
        b = lowrank.load_pretrained(single)(input_ids=ids()).logits
    assert torch.equal(a, b)


def test_gpt2_and_bert_round_trip(gpt2_dir, bert_dir, calib_file, tmp_path):
    from transformers import AutoModel, AutoModelForMaskedLM

    gpt2 = compressed(gpt2_dir, tmp_path / "gpt2", calib_file)
    model = lowrank.load_pretrained(gpt2)
    assert type(model).__name__ == "LowRankGPT2LMHeadModel"
    assert isinstance(model.transformer.h[1].mlp.c_fc, LowRankLinear)
    assert model(input_ids=ids()).logits.shape == (2, 24, 320)

    bert = compressed(bert_dir, tmp_path / "bert", calib_file)
    config = json.load(open(os.path.join(bert, "config.json")))
    assert config["architectures"] == ["LowRankBertForMaskedLM"]
    masked = lowrank.load_pretrained(bert)
    assert type(masked).__name__ == "LowRankBertForMaskedLM"
    encoder = AutoModel.from_pretrained(bert, trust_remote_code=True)
    assert type(encoder).__name__ == "LowRankBertModel"
    assert isinstance(encoder.encoder.layer[0].attention.self.query, LowRankLinear)
    head = AutoModelForMaskedLM.from_pretrained(bert, trust_remote_code=True)
    with torch.no_grad():
        assert torch.allclose(head(input_ids=ids()).logits, masked(input_ids=ids()).logits)


@pytest.mark.parametrize("kind", ["llama_dir", "gpt2_dir"])
def test_loaded_weights_own_their_memory(kind, request):
    """A weight left as a view into the mmapped checkpoint would pin the whole file in memory until the end of a
    compression: replacing a layer must free its weights. The copies equal the file's tensors, ties included."""
    from safetensors.torch import load_file

    from lowrank.io.loading import _safetensors_mappings

    directory = request.getfixturevalue(kind)
    model, _ = load_model(resolve_model(directory))
    path = os.path.realpath(os.path.join(directory, "model.safetensors"))
    assert not [m for m in _safetensors_mappings() if os.path.realpath(m[3]) == path]
    stored = load_file(path)
    state = model.state_dict()
    for name, tensor in stored.items():
        assert torch.equal(state[name], tensor), name
    if kind == "llama_dir":  # tied: one Parameter still serves both names
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_unique_state_dict_keeps_the_embedding(llama_dir):
    model, _ = load_model(resolve_model(llama_dir))
    state = unique_state_dict(model)
    assert "model.embed_tokens.weight" in state and "lm_head.weight" not in state


def test_factorized_layer_is_a_peft_target(llama_out, tmp_path):
    peft = pytest.importorskip("peft")
    model = lowrank.load_pretrained(llama_out)
    with torch.no_grad():
        base = model(input_ids=ids()).logits
    config = peft.LoraConfig(target_modules="all-linear", r=4, init_lora_weights=False)
    tuned = peft.get_peft_model(model, config)
    q = tuned.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q.base_layer, LowRankLinear) and q.lora_A["default"].weight.shape == (4, 64)
    assert not any(name.endswith((".down.lora_A", ".up.lora_A")) for name, _ in tuned.named_modules())
    out = tuned(input_ids=ids()).logits
    assert not torch.allclose(out, base)
    out.sum().backward()  # adapters train on a factorized base
    tuned.save_pretrained(tmp_path / "adapter")
    reloaded = peft.PeftModel.from_pretrained(lowrank.load_pretrained(llama_out), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids()).logits, out)
    with pytest.raises(RuntimeError, match="factorized"):
        reloaded.merge_and_unload()  # merging into a factorized weight would be lost silently: refuse


def test_factorized_weight_is_read_only():
    layer = LowRankLinear(6, 4, 2)
    torch.nn.init.normal_(layer.down.weight)
    torch.nn.init.normal_(layer.up.weight)
    dense = layer.weight
    assert isinstance(dense, FactorizedWeight) and dense.shape == (4, 6)
    assert torch.allclose(dense * 1.0, layer.up.weight @ layer.down.weight)
    with pytest.raises(RuntimeError):
        layer.weight.data += 1
    with pytest.raises(RuntimeError):
        layer.weight.add_(1)


def test_load_pretrained_refuses_other_directories(llama_dir, tmp_path):
    with pytest.raises(UsageError, match="not a lowrank"):
        lowrank.load_pretrained(llama_dir)
    with pytest.raises(UsageError, match="no config.json"):
        lowrank.load_pretrained(str(tmp_path))


def test_future_format_is_refused(llama_out, tmp_path):
    import shutil

    target = tmp_path / "future"
    shutil.copytree(llama_out, target)
    config = json.load(open(target / "config.json"))
    config["lowrank"]["format_version"] = 99
    json.dump(config, open(target / "config.json", "w"))
    with pytest.raises(UsageError, match="upgrade lowrank"):
        lowrank.load_pretrained(str(target))


def test_the_model_card_speaks_the_hubs_language_without_machine_paths(llama_dir, calib_file, tmp_path):
    """The card's front matter carries the source card's license and pipeline tag (else the tag of the model
    class), base_model and its relation only for a hub id, and no machine path appears anywhere in the card."""
    import yaml

    from lowrank.report.card import front_matter

    source = tmp_path / "models" / "tiny-llama"
    shutil.copytree(llama_dir, source)
    (source / "README.md").write_text("---\nlicense: apache-2.0\nlanguage: en\n---\n# tiny\n")
    out = tmp_path / "tiny-lr80"
    command = f"lowrank compress {source} --ratio 0.8 --calib {calib_file} -o {out}"  # as a shell passes it
    lowrank.compress(str(source), str(out), ratio=0.8, calib=calib_file, command=command, **COMPRESS_FAST)
    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---", 2)[1])
    assert meta["license"] == "apache-2.0" and meta["pipeline_tag"] == "text-generation"
    assert meta["library_name"] == "transformers" and {"lowrank", "low-rank"} <= set(meta["tags"])
    assert "base_model" not in meta  # a local path is no hub id
    assert "`tiny-llama`" in card and "lowrank compress tiny-llama --ratio 0.8" in card and "-o tiny-lr80`" in card
    assert str(tmp_path) not in card and f"--calib {os.path.basename(calib_file)}" in card
    hub = {"model": {"source": "org/model", "kind": "hub"}}
    meta = yaml.safe_load(front_matter(hub, "BertForMaskedLM").split("---", 2)[1])
    assert meta["base_model"] == "org/model" and meta["base_model_relation"] == "quantized"
    assert meta["pipeline_tag"] == "fill-mask"
