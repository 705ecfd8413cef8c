"""The decode kernel (`lowrank.decode_layout`): linear layers run a decode step's few float32 rows on CPU as
(weight @ x^T)^T, a faster MKL path there (BENCHMARKS.md "Decode kernel"), and one or two bfloat16 rows on torch's
own GEMV instead of oneDNN's. Only the modules' classes may change: never values, names, ties or the files."""

import pytest
import torch
import torch.nn.functional as F
from conftest import COMPRESS_FAST
from torch import nn
from transformers import AutoModelForCausalLM

import lowrank
from lowrank.io.modeling_lowrank import (DECODE_MAX_ROWS, DECODE_MIN_WEIGHT, NATIVE_MAX_ROWS, DecodeKernel, Projection,
                                        decode_linear)

BF16 = torch.bfloat16


def ids(samples=1, length=12, seed=3):
    return torch.randint(5, 320, (samples, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory, tokenizer):
    """A tiny Llama whose q, o, MLP and LM head weights reach DECODE_MIN_WEIGHT (k and v do not)."""
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


def linears(model):
    """{module name: module} of every module that owns a linear weight (the factors of factorized layers too)."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, Projection)) and "weight" in module._parameters}


def on_kernel(model):
    return all(isinstance(m, DecodeKernel) for m in linears(model).values())


def greedy(model, new=6):
    with torch.no_grad():
        return model.generate(ids(), attention_mask=torch.ones_like(ids()), max_new_tokens=new, do_sample=False,
                              pad_token_id=0)


@pytest.fixture
def mm_calls(monkeypatch):
    """Counts torch.mm calls: decode_linear's own path makes one, F.linear none."""
    calls, mm = [], torch.mm
    monkeypatch.setattr(torch, "mm", lambda *a, **k: calls.append(1) or mm(*a, **k))
    return calls


@pytest.mark.parametrize("shape", [(1, 384), (2, 384), (3, 5, 384), (DECODE_MAX_ROWS, 384)])
@pytest.mark.parametrize("bias", [True, False])
def test_decode_linear_takes_its_path_for_few_rows_and_computes_f_linear(shape, bias, mm_calls):
    torch.manual_seed(0)
    layer = nn.Linear(384, 512, bias=bias)
    x = torch.randn(shape, requires_grad=True)
    out = decode_linear(x, layer.weight, layer.bias)
    assert len(mm_calls) == 1
    reference = F.linear(x, layer.weight, layer.bias)
    assert out.shape == reference.shape and out.is_contiguous()
    assert torch.allclose(out, reference, atol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), (x, layer.weight))
    assert all(torch.allclose(a, b, atol=1e-4)
               for a, b in zip(grads, torch.autograd.grad(reference.square().sum(), (x, layer.weight))))


def test_decode_linear_leaves_the_rest_to_f_linear(mm_calls):
    """More rows than DECODE_MAX_ROWS, small weights, a non-contiguous weight, more bfloat16 rows than
    NATIVE_MAX_ROWS, float16, mixed dtypes: F.linear, bit for bit."""
    torch.manual_seed(0)
    big, small = torch.randn(512, 384), torch.randn(DECODE_MIN_WEIGHT // 384, 383)
    cases = [(torch.randn(DECODE_MAX_ROWS + 1, 384), big), (torch.randn(1, 383), small), (torch.randn(1, 512), big.t()),
             (torch.randn(NATIVE_MAX_ROWS + 1, 384, dtype=BF16), big.to(BF16)),
             (torch.randn(1, 384, dtype=torch.float16), big.half()), (torch.randn(1, 384, dtype=BF16), big)]
    for x, weight in cases:
        if x.dtype != weight.dtype:  # F.linear's own error
            with pytest.raises(RuntimeError, match="dtype"):
                decode_linear(x, weight)
            continue
        assert torch.equal(decode_linear(x, weight), F.linear(x, weight))
    x, bias = torch.randn(1, 384), torch.randn(512)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # F.linear's autocast rules, output dtype included
        assert torch.equal(decode_linear(x, big, bias), F.linear(x, big, bias))
    assert not mm_calls


@pytest.fixture
def onednn_at_linear(monkeypatch):
    """Whether oneDNN was on at each F.linear call (decode_linear's bfloat16 path switches it off for its own)."""
    seen, linear = [], F.linear
    monkeypatch.setattr(F, "linear", lambda *a, **k: seen.append(torch._C._get_mkldnn_enabled()) or linear(*a, **k))
    return seen


@pytest.mark.parametrize("shape", [(1, 384), (1, 1, 384), (NATIVE_MAX_ROWS, 384)])
def test_bfloat16_rows_run_on_torchs_own_kernels_and_compute_f_linear(shape, onednn_at_linear):
    torch.manual_seed(0)
    weight, bias, x = torch.randn(512, 384, dtype=BF16), torch.randn(512, dtype=BF16), torch.randn(shape, dtype=BF16)
    out = decode_linear(x, weight, bias)
    assert onednn_at_linear == [False] and torch._C._get_mkldnn_enabled()  # off for the call only
    exact = F.linear(x.double(), weight.double(), bias.double())
    assert out.dtype == BF16 and out.shape == exact.shape
    # float32 accumulation: within the two roundings to bfloat16 (product, then with the bias) of the exact value
    assert ((out.double() - exact).abs() <= exact.abs() * 2 ** -7 + 2 ** -7).all()


def test_the_bfloat16_path_leaves_onednn_as_it_found_it(onednn_at_linear):
    """Switched off by the user: it stays off. A failing call: oneDNN is back on all the same."""
    weight = torch.randn(512, 384, dtype=BF16)
    with torch.backends.mkldnn.flags(enabled=False):
        decode_linear(torch.randn(1, 384, dtype=BF16), weight)
        assert not torch._C._get_mkldnn_enabled()
    with pytest.raises(RuntimeError):
        decode_linear(torch.randn(1, 383, dtype=BF16), weight)
    assert torch._C._get_mkldnn_enabled() and onednn_at_linear == [False, False]


def test_a_bfloat16_model_on_the_kernel_is_as_accurate_as_on_f_linear(factorized, onednn_at_linear):
    """One bfloat16 decode step: the kernel's logits are no further from the float32 model's than F.linear's are;
    more rows than NATIVE_MAX_ROWS keep F.linear (oneDNN on)."""
    exact = lowrank.load_pretrained(factorized, decode_layout=False)
    fast = lowrank.load_pretrained(factorized, dtype=BF16)
    plain = lowrank.load_pretrained(factorized, dtype=BF16, decode_layout=False)
    assert on_kernel(fast)
    with torch.no_grad():
        batch = ids(length=1)
        reference = exact(batch).logits
        errors = [(model(batch).logits.float() - reference).abs().mean() for model in (fast, plain)]
        assert errors[0] <= 1.25 * errors[1] and False in onednn_at_linear
        del onednn_at_linear[:]
        fast(ids(samples=1, length=NATIVE_MAX_ROWS + 1))
    assert onednn_at_linear and all(onednn_at_linear)


def test_load_pretrained_runs_the_kernel_and_computes_the_same(factorized, mm_calls):
    fast, plain = lowrank.load_pretrained(factorized), lowrank.load_pretrained(factorized, decode_layout=False)
    assert on_kernel(fast) and any(name.endswith(".up") for name in linears(fast))
    assert not any(isinstance(m, DecodeKernel) for m in plain.modules())
    if fast.config.tie_word_embeddings:
        assert fast.lm_head.weight is fast.get_input_embeddings().weight
    with torch.no_grad():
        for batch in (ids(), ids(samples=3)):  # 12 rows: the kernel's path; 36: F.linear
            assert torch.allclose(fast(batch).logits, plain(batch).logits, atol=1e-5)
    assert mm_calls  # the 12-row prefill went through it
    assert torch.equal(greedy(fast), greedy(plain))


def test_the_bundled_file_runs_the_kernel_too(factorized):
    """Users of trust_remote_code (lm_eval's hf backend) load through the same class: they get the kernel."""
    assert on_kernel(AutoModelForCausalLM.from_pretrained(factorized, trust_remote_code=True))


def test_save_pretrained_writes_the_same_tensors(factorized, tmp_path):
    model = lowrank.load_pretrained(factorized)
    model.save_pretrained(tmp_path / "again")
    assert on_kernel(model)
    again = lowrank.load_pretrained(tmp_path / "again", decode_layout=False)
    state, reloaded = model.state_dict(), again.state_dict()
    assert state.keys() == reloaded.keys()
    assert all(torch.equal(state[k], reloaded[k]) for k in state)


def test_eval_runs_a_dense_baseline_on_the_kernel_as_it_does_a_factorized_model(wide_dir, factorized):
    """`lowrank eval --baseline` times both models: a dense baseline on F.linear would flatter the factorized one."""
    from lowrank.evaluation.subjects import load_subject

    for source in (wide_dir, factorized):
        assert on_kernel(load_subject(source).model), source


def test_decode_layout_on_a_dense_model_and_back(wide_dir):
    model = AutoModelForCausalLM.from_pretrained(wide_dir)
    before, count = greedy(model), len(linears(model))
    assert lowrank.decode_layout(model) == count > 0
    assert lowrank.decode_layout(model) == 0  # already on it
    assert on_kernel(model) and isinstance(model.lm_head, nn.Linear)
    assert torch.equal(greedy(model), before)
    assert lowrank.decode_layout(model, enable=False) == count
    assert all(type(m) is nn.Linear for m in linears(model).values())


def test_a_linear_with_its_own_forward_is_left_alone():
    """A quantized linear or an adapter layer subclasses nn.Linear with a forward that must keep running."""

    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.ModuleList([nn.Linear(4, 4), Scaled(4, 4)])
    assert lowrank.decode_layout(model) == 1
    assert type(model[1]) is Scaled and isinstance(model[0], DecodeKernel)


def test_peft_adapters_run_on_the_kernel(factorized, mm_calls):
    """A LoRA on every linear: its base layers keep the kernel, and one token's logits match F.linear's."""
    peft = pytest.importorskip("peft")
    logits = {}
    for kernel in (True, False):
        torch.manual_seed(0)  # the same adapter weights both times
        model = peft.get_peft_model(lowrank.load_pretrained(factorized, decode_layout=kernel),
                                    peft.LoraConfig(target_modules="all-linear", r=4, init_lora_weights=False))
        bases = [m.base_layer for m in model.modules() if hasattr(m, "lora_A")]
        assert bases and all(isinstance(b, DecodeKernel) == kernel for b in bases if "weight" in b._parameters)
        calls = len(mm_calls)
        with torch.no_grad():
            logits[kernel] = model(ids(length=1)).logits
        assert (len(mm_calls) > calls) == kernel
    assert torch.allclose(logits[True], logits[False], atol=1e-5)


def test_torch_compile_traces_f_linear_through_the_kernel():
    """torch.compile sees F.linear: no global switch, no graph break, even with fullgraph=True."""
    compiled = torch.compile(lambda x, w: decode_linear(x, w), backend="eager", fullgraph=True)
    for dtype in (BF16, torch.float32):
        x, weight = torch.randn(1, 384, dtype=dtype), torch.randn(512, 384, dtype=dtype)
        assert torch.equal(compiled(x, weight), F.linear(x, weight))
