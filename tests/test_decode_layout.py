"""The decode layout: float32 linear weights with more outputs than inputs stored column-major on CPU (a faster
batch-1 GEMV there, BENCHMARKS.md "Decode layout"). Only strides may change: never values, names, ties or the files."""

import pytest
import torch
from conftest import COMPRESS_FAST
from torch import nn
from transformers import AutoModelForCausalLM

import lowrank
from lowrank.io.modeling_lowrank import LAID_MIN_INPUTS, Projection


def ids(samples=1, length=12, seed=3):
    return torch.randint(5, 320, (samples, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory, tokenizer):
    """A tiny Llama wide enough for the layout (it leaves inputs narrower than LAID_MIN_INPUTS alone)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=384, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=6,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=128,
                         tie_word_embeddings=True, bos_token_id=0, eos_token_id=1, pad_token_id=3)
    directory = tmp_path_factory.mktemp("wide")
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def factorized(tmp_path_factory, wide_dir, calib_file):
    out = tmp_path_factory.mktemp("layout") / "wide-lr70"
    lowrank.compress(wide_dir, str(out), calib=calib_file, **{**COMPRESS_FAST, "ratio": 0.7})
    return str(out)


def wide_weights(model):
    """{module name: weight} of every linear weight (factors included) that the layout is for."""
    return {name: module.weight for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, Projection)) and "weight" in module._parameters
            and module.weight.shape[0] > module.weight.shape[1] >= LAID_MIN_INPUTS}


def column_major(weight):
    return weight.stride() == (1, weight.shape[0])


def greedy(model, new=6):
    with torch.no_grad():
        return model.generate(ids(), attention_mask=torch.ones_like(ids()), max_new_tokens=new, do_sample=False,
                              pad_token_id=0)


def test_load_pretrained_lays_wide_weights_column_major_and_computes_the_same(factorized):
    laid, plain = lowrank.load_pretrained(factorized), lowrank.load_pretrained(factorized, decode_layout=False)
    wide = wide_weights(laid)
    assert any(name.endswith(".up") for name in wide)  # the up factors are what the layout is for
    assert all(column_major(w) for w in wide.values()), [n for n, w in wide.items() if not column_major(w)]
    assert all(w.is_contiguous() for w in wide_weights(plain).values())
    narrow = [p for p in laid.parameters() if p.dim() == 2 and not p.shape[0] > p.shape[1] >= LAID_MIN_INPUTS]
    assert narrow and all(p.is_contiguous() for p in narrow)  # the down factors keep their rows, and so on
    if laid.config.tie_word_embeddings:
        assert laid.lm_head.weight is laid.get_input_embeddings().weight
    with torch.no_grad():
        for batch in (ids(), ids(samples=3)):  # batch-1 GEMVs and a prefill GEMM
            assert torch.allclose(laid(batch).logits, plain(batch).logits, atol=1e-5)
    assert torch.equal(greedy(laid), greedy(plain))


def test_the_bundled_file_lays_the_model_out_too(factorized):
    """Users of trust_remote_code (lm_eval's hf backend) load through the same class: they get the layout."""
    model = AutoModelForCausalLM.from_pretrained(factorized, trust_remote_code=True)
    assert all(column_major(w) for w in wide_weights(model).values())


def test_save_pretrained_writes_row_major_files_and_keeps_the_layout(factorized, tmp_path):
    """transformers' save_pretrained cannot write a transposed view (it raises): the class saves row-major."""
    model = lowrank.load_pretrained(factorized)
    model.save_pretrained(tmp_path / "again")
    assert all(column_major(w) for w in wide_weights(model).values())
    again = lowrank.load_pretrained(tmp_path / "again", decode_layout=False)
    state, reloaded = model.state_dict(), again.state_dict()
    assert state.keys() == reloaded.keys()
    assert all(torch.equal(state[k], reloaded[k]) for k in state)


def test_eval_lays_out_a_dense_baseline_as_it_does_a_factorized_model(wide_dir, factorized):
    """`lowrank eval --baseline` times both models: a dense baseline left row-major would flatter the factorized one."""
    from lowrank.evaluation.subjects import load_subject

    for source in (wide_dir, factorized):
        wide = wide_weights(load_subject(source).model)
        assert wide and all(column_major(w) for w in wide.values()), source


def test_decode_layout_on_a_dense_model_and_back(wide_dir):
    model = AutoModelForCausalLM.from_pretrained(wide_dir)
    before = greedy(model)
    wide = wide_weights(model)
    assert lowrank.decode_layout(model) == len(wide) > 0
    assert lowrank.decode_layout(model) == 0  # already laid out
    assert all(column_major(w) for w in wide.values())
    assert torch.equal(greedy(model), before)
    assert lowrank.decode_layout(model, enable=False) == len(wide)
    assert all(p.is_contiguous() for p in model.parameters())


def test_only_wide_float32_weights_move():
    """bfloat16 and integer weights keep their rows (the layout is measured faster for float32 only), and so do
    weights with fewer outputs than inputs or fewer inputs than LAID_MIN_INPUTS."""
    n = LAID_MIN_INPUTS
    layer, narrow, thin = nn.Linear(n, 2 * n), nn.Linear(2 * n, n), nn.Linear(n - 1, 2 * n)
    half = nn.Linear(n, 2 * n, dtype=torch.bfloat16)
    integer = nn.Linear(n, 2 * n)
    integer.weight = nn.Parameter(torch.zeros(2 * n, n, dtype=torch.int8), requires_grad=False)
    model = nn.ModuleList([layer, half, integer, narrow, thin])
    assert lowrank.decode_layout(model) == 1
    assert column_major(layer.weight)
    assert all(m.weight.is_contiguous() for m in (half, integer, narrow, thin))
