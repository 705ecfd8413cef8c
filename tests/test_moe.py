"""Mixture-of-experts models: what the ratio can reach is said out loud, and (once targeted) the experts are
factorized per expert, load without lowrank and reproduce the dense model at full rank.

Tiny random configs of the MoE families transformers ships, saved as checkpoint directories."""

import json

import pytest
import torch

from conftest import VOCAB, WITHOUT_LOWRANK

MOE = {
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=96),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48, intermediate_size=96,
                      decoder_sparse_step=1, head_dim=16),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2, intermediate_size=48),
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48,
                      shared_expert_intermediate_size=96, intermediate_size=96, decoder_sparse_step=1),
    # transposed [E, in, out] tensors with biases and an interleaved, clamped gate
    "gpt_oss": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=48, head_dim=16,
                    sliding_window=16, layer_types=["full_attention", "full_attention"]),
    # routed experts plus a shared expert, multi-head latent attention
    "deepseek_v3": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=48, intermediate_size=96,
                        n_shared_experts=1, first_k_dense_replace=0, q_lora_rank=None, kv_lora_rank=16,
                        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1,
                        num_key_value_heads=4),
    "deepseek_v2": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=48, intermediate_size=96,
                        n_shared_experts=1, first_k_dense_replace=0, q_lora_rank=None, kv_lora_rank=16,
                        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1,
                        num_key_value_heads=4),
    "glm4_moe": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=48, intermediate_size=96,
                     n_shared_experts=1, first_k_dense_replace=0, n_group=1, topk_group=1, head_dim=16),
    "granitemoe": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=48),
    # experts read E router-scaled copies of the tokens ([E, in, out] tensors), a linear router, a shared expert
    "llama4_text": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=48, intermediate_size_mlp=96,
                        head_dim=16, interleave_moe_layer_step=1),
}
# where each layer's experts module sits (the others: mlp.experts)
EXPERTS_AT = {"llama4_text": "feed_forward.experts", "granitemoe": "block_sparse_moe.experts"}
# the whole cycle (compress, load without lowrank, generate, densify) and full-rank exactness on every one
CYCLE = sorted(MOE)


def build_moe(kind, seed=0):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    shape = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                 max_position_embeddings=256, bos_token_id=0, eos_token_id=1, pad_token_id=3)
    config = AutoConfig.for_model(kind, **{**shape, **MOE[kind]})
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # random init is isotropic: give every matrix a decaying spectrum, as trained ones have
        for name, param in model.named_parameters():
            if param.dim() >= 2 and "embed" not in name:
                mats = param.view(-1, *param.shape[-2:])
                for mat in mats:
                    u, _, vh = torch.linalg.svd(mat, full_matrices=False)
                    decay = torch.logspace(0, -1.5, u.shape[1])
                    mat.copy_((u * decay * mat.norm() / decay.norm()) @ vh)
    return model.eval()


@pytest.fixture(scope="module")
def saved_moe(tmp_path_factory, tokenizer):
    """kind -> a checkpoint directory of that tiny MoE model (saved once per module)."""
    directories = {}

    def saved(kind):
        if kind not in directories:
            directory = tmp_path_factory.mktemp(kind)
            build_moe(kind).save_pretrained(directory)
            tokenizer.save_pretrained(directory)
            directories[kind] = str(directory)
        return directories[kind]

    return saved


@pytest.fixture(scope="module", params=CYCLE)
def moe_dir(request, saved_moe):
    return request.param, saved_moe(request.param)


def params_in(directory):
    """Parameters actually written: the element count of every tensor in the checkpoint's weight files."""
    import glob
    import math

    from safetensors import safe_open

    total = 0
    for path in sorted(glob.glob(f"{directory}/model*.safetensors")):
        with safe_open(path, "pt") as f:
            total += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    return total


def test_summary_says_what_the_ratio_reaches(tmp_path, tokenizer, calib_file):
    """A MoE model whose experts stay dense must not read as compressed: the report counts every parameter once,
    as targeted or dense with its reason, the whole-model ratio is the one written, and a warning says so."""
    import lowrank
    from lowrank.compression.coverage import measure_coverage
    from lowrank.compression.targets import select_targets

    model = build_moe("mixtral")
    source = tmp_path / "mixtral"
    model.save_pretrained(source)
    tokenizer.save_pretrained(source)
    blocks_name, _, targets = select_targets(model, ["*self_attn*"])
    coverage = measure_coverage(model, blocks_name, targets)
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    attention = sum(p.numel() for n, p in model.named_parameters() if "self_attn" in n and p.dim() == 2)
    assert coverage.total == sum(p.numel() for p in model.parameters())
    assert coverage.targeted == attention
    assert coverage.dense["experts"] == experts and experts > 0.5 * coverage.total
    assert coverage.targeted + sum(coverage.dense.values()) == coverage.total
    warning = coverage.warning(0.5)
    assert "expert tensors" in warning and f"{attention / coverage.total:.1%}" in warning

    report = lowrank.compress(str(source), str(tmp_path / "out"), ratio=0.5, alloc="uniform", verify=False,
                              calib=calib_file, targets=["*self_attn*"], num_samples=8, seq_len=64, batch_size=4)
    kinds = {part["kind"]: part for part in report["coverage"]["not_targeted"]}
    assert kinds["experts"]["params"] == experts
    assert report["coverage_warning"] and "expert tensors" in report["coverage_warning"]
    model_ratio = report["ratio"]["model"]
    assert model_ratio["params_after"] == params_in(tmp_path / "out")
    assert model_ratio["kept"] > 0.9  # the truth: the experts are kept whole
    rows = dict(lowrank.report.compression.compression_rows(report))
    assert "warning" in rows and "targeted share" in rows
    # experts nobody targeted are written in the model's own layout and load as its own class
    assert "experts" not in json.load(open(tmp_path / "out" / "config.json"))["lowrank"]
    loaded = lowrank.load_pretrained(str(tmp_path / "out"))
    assert type(loaded.model.layers[0].mlp.experts).__name__ == "MixtralExperts"
    ids = calibration_ids(2, 16, seed=4)
    assert torch.isfinite(logits(loaded, ids)).all()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def calibration_ids(samples=8, length=32, seed=0):
    return torch.randint(5, VOCAB, (samples, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", sorted(MOE))
def test_full_rank_reproduces_the_dense_logits(kind):
    """Every expert matrix factorized at full rank (whitening: the data-weighted SVD, folded back) computes the
    model it came from: the unpacked per-expert forward and the factorization are exact up to float rounding."""
    from lowrank import CompressConfig, LowRankLinear, compress_model
    from lowrank.compression.experts import unpack_model_experts
    from lowrank.compression.targets import select_targets

    model = build_moe(kind)
    ids = calibration_ids(2, 24, seed=9)
    before = logits(model, ids)
    unpack_model_experts(model)
    _, _, targets = select_targets(model)
    ranks = {name: min(model.get_submodule(name).weight.shape) for names in targets.values() for name in names}
    experts = [name for name in ranks if ".experts." in name]
    assert len(experts) == 2 * 2 * 8  # two tensors of eight experts in each of two layers
    result = compress_model(model, calibration_ids(), CompressConfig(alloc="uniform", ranks=ranks, batch_size=4))
    factorized = {name for name, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert set(experts) <= factorized
    assert not any("router" in name or name.endswith(".gate") for name in factorized)
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-4, atol=2e-5)
    tokens = {layer.name: layer.info["tokens"] for layer in result.layers if "tokens" in layer.info}
    assert set(tokens) == set(experts)
    # each token goes to top-k = 2 experts: the gate_up inputs of one layer count every calibration token twice
    layer0 = [count for name, count in tokens.items()
              if name.startswith("model.layers.0.") and ".experts.gate_up_proj." in name]
    assert sum(layer0) == 2 * calibration_ids().numel()


@pytest.fixture(scope="module")
def half(moe_dir, tmp_path_factory, calib_file):
    """Each MoE kind compressed to keep 0.5 of its targeted parameters (uniform ranks)."""
    import lowrank

    kind, directory = moe_dir
    out = str(tmp_path_factory.mktemp(kind + "-half") / "out")
    report = lowrank.compress(directory, out, ratio=0.5, alloc="uniform", verify=False, calib=calib_file,
                              num_samples=8, seq_len=64, batch_size=4)
    return kind, directory, out, report


def test_half_loads_without_lowrank_and_says_what_it_kept(half, tmp_path):
    """transformers alone (lowrank blocked) rebuilds the unpacked experts from the bundled modeling file and
    computes what lowrank.load_pretrained computes; the kept fraction is the parameters actually written."""
    import os
    import subprocess
    import sys
    import textwrap

    import lowrank
    from lowrank.io.checkpoint import unique_state_dict

    kind, _, out, report = half
    script = WITHOUT_LOWRANK + textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({out!r}, trust_remote_code=True)
        ids = torch.randint(5, 320, (2, 24), generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            torch.save(model(input_ids=ids).logits, {str(tmp_path / "logits.pt")!r})
        experts = model.get_submodule("model.layers.1.{EXPERTS_AT.get(kind, 'mlp.experts')}")
        print(type(experts).__name__, type(experts.down_proj[3]).__name__, "lowrank" in sys.modules)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "Experts LowRankLinear False" in run.stdout, run.stdout
    model = lowrank.load_pretrained(out)
    ids = torch.randint(5, 320, (2, 24), generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.load(tmp_path / "logits.pt", weights_only=True), logits(model, ids))

    config = json.load(open(f"{out}/config.json"))["lowrank"]
    at = EXPERTS_AT.get(kind, "mlp.experts")
    assert config["experts"] == [f"model.layers.0.{at}", f"model.layers.1.{at}"]
    assert report["ratio"]["model"]["params_after"] == params_in(out)
    assert sum(t.numel() for t in unique_state_dict(model).values()) == params_in(out)  # buffers included
    assert report["ratio"]["targets"]["kept"] <= 0.5
    assert report["coverage"]["targeted"]["fraction"] > 0.75 and not report["coverage_warning"]
    listed = [layer for layer in report["layers"]["list"] if ".experts." in layer["name"]]
    assert len(listed) == 32 and all("tokens" in layer["info"] for layer in listed if not layer["dense"])


def assert_cache_changes_nothing(model):
    """Greedy generation with the KV cache gives the tokens of generation without it."""
    prompt = torch.randint(5, 320, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=3)
        uncached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=3)
    assert torch.equal(cached, uncached)


def test_generate_with_cache_equals_without(half):
    import lowrank

    assert_cache_changes_nothing(lowrank.load_pretrained(half[2]))


def test_densify_round_trips_to_the_original_layout(half, tmp_path):
    """densify stacks the experts back into the model's own 3-D tensors: plain transformers loads it (no remote
    code) and it computes what the factorized model computes."""
    import lowrank
    from transformers import AutoModelForCausalLM

    kind, directory, out, _ = half
    dense_dir = str(tmp_path / "dense")
    lowrank.densify(out, dense_dir)
    dense = AutoModelForCausalLM.from_pretrained(dense_dir)
    original = AutoModelForCausalLM.from_pretrained(directory)
    assert {n: p.shape for n, p in dense.named_parameters()} == {n: p.shape for n, p in original.named_parameters()}
    ids = torch.randint(5, 320, (2, 24), generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(logits(dense, ids), logits(lowrank.load_pretrained(out), ids), rtol=1e-4, atol=2e-5)


def test_an_expert_no_token_reaches_borrows_pooled_statistics(tmp_path):
    """gpt-oss's router has a bias: at -1e4 for expert 7 no calibration token is routed there. Its matrices are
    still factorized (finite factors) from the layer's pooled statistics, and the report lists it with 0 tokens."""
    from lowrank import CompressConfig, compress_model
    from lowrank.report.compression import expert_rows, expert_tokens_markdown, layer_entry

    model = build_moe("gpt_oss")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.router.bias[7] = -1e4
    result = compress_model(model, calibration_ids(), CompressConfig(alloc="uniform", ratio=0.5, batch_size=4))
    info = {layer.name: layer.info for layer in result.layers}
    starved = info["model.layers.0.mlp.experts.gate_up_proj.7"]
    assert starved["tokens"] == 0 and starved["pooled_tokens"] == 64  # its input width
    down = info["model.layers.0.mlp.experts.down_proj.7"]
    assert down["tokens"] == 0 and down["pooled_tokens"] == 48
    fed = [i for name, i in info.items() if ".gate_up_proj." in name and i["tokens"] >= 64]
    assert fed and all(i["pooled_tokens"] == 0 for i in fed)
    expert = model.get_submodule("model.layers.0.mlp.experts.gate_up_proj.7")
    assert torch.isfinite(expert.up.weight).all() and torch.isfinite(expert.down.weight).all()
    report = {"layers": {"list": [layer_entry(layer) for layer in result.layers]}}
    assert "fewest 0" in expert_rows(report)[0][1]
    assert "| model.layers.0.mlp.experts.gate_up_proj.7 | 0 | 64 |" in expert_tokens_markdown(report)


def test_llama4_experts_see_the_tokens_their_router_sends():
    """Llama 4's experts read E router-scaled copies of every token. Unpacked, each expert's statistics count the
    tokens its own router's top-k sent it, nothing else (the report's tokens per expert), and the router, a linear
    layer, is not a target."""
    from lowrank import CompressConfig, compress_model

    model = build_moe("llama4_text")
    ids = calibration_ids()
    routed = {}

    def count(index):
        def hook(module, args, output):
            top = output[1].topk(module.top_k, dim=-1).indices  # its logits' top-k: where the model routes
            routed[index] = torch.bincount(top.reshape(-1), minlength=module.num_experts)
        return hook

    handles = [layer.feed_forward.router.register_forward_hook(count(i)) for i, layer in enumerate(model.model.layers)]
    sent = torch.zeros(2, 8, dtype=torch.long)
    with torch.no_grad():
        for batch in ids.split(4):
            model(input_ids=batch)
            sent += torch.stack([routed[0], routed[1]])
    for handle in handles:
        handle.remove()
    result = compress_model(model, ids, CompressConfig(alloc="uniform", ratio=0.5, batch_size=4))
    info = {layer.name: layer.info for layer in result.layers}
    for e in range(8):  # layer 0 reads the model's own stream (layer 1, the compressed layer 0's: other routes)
        for tensor in ("gate_up_proj", "down_proj"):
            assert info[f"model.layers.0.feed_forward.experts.{tensor}.{e}"]["tokens"] == sent[0, e]
    assert sum(info[f"model.layers.1.feed_forward.experts.down_proj.{e}"]["tokens"] for e in range(8)) == \
        2 * ids.numel()  # top-2 of every token
    assert not any(".router" in name for name in info)


def test_gradient_methods_work_through_the_router():
    """fwsvd's Fisher weights and the Fisher allocation need gradients of the LM loss at every expert matrix: the
    unpacked experts are ordinary linear layers on the router's path, so they get them."""
    from lowrank import CompressConfig, compress_model

    model = build_moe("mixtral")
    result = compress_model(model, calibration_ids(), CompressConfig(alloc="uniform", ratio=0.5, method="fwsvd",
                                                                     batch_size=4))
    experts = [layer for layer in result.layers if ".experts." in layer.name]
    assert len(experts) == 32 and all(layer.rank for layer in experts)
    model = build_moe("mixtral")
    result = compress_model(model, calibration_ids(), CompressConfig(alloc="fisher", ratio=0.5, batch_size=4))
    ranks = {layer.rank for layer in result.layers if ".experts.down_proj." in layer.name}
    assert len(ranks) > 1  # heterogeneous per-expert ranks: the list layout stores them without padding
    assert sum(l.params_after for l in result.layers) <= 0.5 * sum(l.params_before for l in result.layers) + 1


def without_one_expert(directory, tmp_path):
    """A copy of the checkpoint `directory` (Mixtral's older per-expert names) that lacks expert 3's w1 of layer 0."""
    import shutil

    from safetensors.torch import load_file, save_file

    copy = tmp_path / "damaged"
    shutil.copytree(directory, copy)
    tensors = load_file(copy / "model.safetensors")
    del tensors["model.layers.0.block_sparse_moe.experts.3.w1.weight"]
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    return str(copy)


@pytest.mark.parametrize("flags, message", [
    (["--anchor"], "--anchor and --refit do not support mixture-of-experts models yet"),
    # transformers 5 saves Mixtral's experts as block_sparse_moe.experts.N.w1/w2/w3 and converts them at load;
    # with one of them gone, no reading of the checkpoint makes gate_up_proj
    (["--stream", "on"], "in a layout --stream on cannot read (no gate_up_proj tensor"),
])
def test_what_moe_does_not_support_yet_is_one_line(flags, message, saved_moe, calib_file, tmp_path, capsys):
    from conftest import assert_clean_failure, run

    directory = saved_moe("mixtral")
    if "--stream" in flags:
        directory = without_one_expert(directory, tmp_path)
    output = str(tmp_path / "out")
    code, _, err = run(["compress", directory, "--ratio", "0.5", "-o", output, "--calib", calib_file,
                        "--num-samples", "8", "--seq-len", "64", "--no-verify", *flags], capsys)
    assert_clean_failure(code, err, 2, message, output)


@pytest.mark.parametrize("kind", ["gpt_oss", "mixtral", "qwen3_moe", "deepseek_v3"])
def test_streaming_and_resume_write_the_in_memory_bytes(kind, saved_moe, calib_file, tmp_path, monkeypatch):
    """--stream on reads each expert's row of the stacked checkpoint tensors (transposed back for gpt-oss, whose
    checkpoint stores them stacked), or of the per-expert matrices under older names that make it (Mixtral's w1
    and w3, the Qwen and DeepSeek gate_proj and up_proj), and writes what the in-memory run writes; a run
    interrupted after its first block and resumed does too."""
    import lowrank
    from lowrank.compression import api
    from lowrank.errors import Interrupted

    from test_streaming import every_file, weights_and_config

    directory = saved_moe(kind)
    options = dict(ratio=0.5, calib=calib_file, alloc="uniform", num_samples=8, seq_len=64, batch_size=4,
                   verify=False, max_shard_size="200KB")
    memory, streamed = str(tmp_path / "memory"), str(tmp_path / "streamed")
    lowrank.compress(directory, memory, stream="off", **options)
    assert lowrank.compress(directory, streamed, stream="on", **options)["streamed"]
    assert weights_and_config(streamed) == weights_and_config(memory)

    resumed = str(tmp_path / "resumed")
    done = api._Job.block_done

    def stop_after_first(self, index, block, layers):
        done(self, index, block, layers)
        raise KeyboardInterrupt

    monkeypatch.setattr(api._Job, "block_done", stop_after_first)
    with pytest.raises(Interrupted, match="--resume"):
        lowrank.compress(directory, resumed, stream="off", **options)
    monkeypatch.setattr(api._Job, "block_done", done)
    report = lowrank.compress(directory, resumed, stream="off", resume=True, **options)
    assert report["resumed_at_block"] == 1
    assert every_file(resumed) == every_file(memory)


def test_eora_repairs_the_experts(half, calib_file, tmp_path):
    """compensate compares the original with the compressed model expert by expert (the original's experts are
    unpacked the same way): the PEFT adapter covers the expert matrices and lowers their error."""
    import lowrank
    from peft import PeftModel

    kind, directory, out, _ = half
    if kind != "qwen2_moe":
        pytest.skip("one layout with routed and shared experts is enough")
    # the 1 x 64 shared_expert_gate cannot hold a rank-4 correction (compensate says so): left out
    report = lowrank.compensate(directory, out, str(tmp_path / "eora"), rank=4, calib=calib_file, num_samples=8,
                                seq_len=64, batch_size=4, ignore=["shared_expert_gate"])
    layers = {layer["name"]: layer for layer in report["layers"]["list"]}
    experts = [layer for name, layer in layers.items() if ".experts." in name]
    assert len(experts) == 32 and all(layer["rel_error"] < layer["error_before"] for layer in experts)
    assert any(".shared_expert." in name for name in layers)
    model = PeftModel.from_pretrained(lowrank.load_pretrained(out), str(tmp_path / "eora"))
    assert sum(".experts.gate_up_proj." in name and "lora_A" in name for name, _ in model.named_parameters()) == 16


def test_switch_transformers_experts_are_targets_and_its_router_stays_dense():
    """Switch Transformers keeps experts as per-expert linear layers in a ModuleDict (`experts.expert_3.wi`) and
    routes with a linear `router.classifier`: the experts are targets with routed statistics (top-1: the tokens
    of a layer add up over its experts), the classifier inside the router stays dense."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    from lowrank import CompressConfig, compress_model

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "switch_transformers", d_model=64, d_ff=96, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=16,
        num_experts=4, expert_capacity=1024, num_sparse_encoder_layers=2, num_sparse_decoder_layers=2,
        vocab_size=VOCAB, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    model = AutoModelForSeq2SeqLM.from_config(config).eval()
    ids = calibration_ids()
    result = compress_model(model, ids, CompressConfig(alloc="uniform", ratio=0.5, batch_size=4))
    names = {layer.name: layer for layer in result.layers}
    assert not any("router" in name for name in names)
    experts = [f"encoder.block.0.layer.1.mlp.experts.expert_{e}.wi" for e in range(4)]
    assert all(names[name].rank for name in experts)
    assert sum(names[name].info["tokens"] for name in experts) == ids.numel()
