"""Grouped downs (`lowrank.group_downs`, on by default at load): the layers of an input group (q/k/v, gate/up) run
their first GEMMs (a factorized layer's down, a dense layer's weight) as one. Values, names, modules and files
must not change; only the number of GEMMs, and where the grouped weights live."""

import pytest
import torch
import torch.nn.functional as F
from test_decode_layout import factorized, greedy, ids, wide_dir  # noqa: F401 (fixtures)
from transformers import AutoModelForCausalLM

import lowrank
from lowrank.io.modeling_lowrank import NATIVE_MAX_ROWS, DecodeKernel, GroupedInput, LowRankLinear, group_downs


@pytest.fixture
def gemms(monkeypatch):
    """Counts GEMM calls: F.linear and torch.mm (decode_linear's own path)."""
    calls, linear, mm = [], F.linear, torch.mm
    monkeypatch.setattr(F, "linear", lambda *a, **k: calls.append(1) or linear(*a, **k))
    monkeypatch.setattr(torch, "mm", lambda *a, **k: calls.append(1) or mm(*a, **k))
    return calls


def groups(model):
    return list({id(m.input_group): m.input_group for m in model.modules() if isinstance(m, GroupedInput)}.values())


def logits(model, batch):
    with torch.no_grad():
        return model(batch).logits


def storages(model):
    """{storage pointer: bytes} of the model's parameters."""
    return {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}


def test_a_loaded_checkpoint_is_grouped_and_computes_the_same_with_fewer_gemms(factorized, gemms):
    grouped, plain = lowrank.load_pretrained(factorized), lowrank.load_pretrained(factorized, group_downs=False)
    found = groups(grouped)
    assert found and not groups(plain)
    assert all(any(isinstance(m, LowRankLinear) for m in g.members) for g in found)
    assert any(not isinstance(m, LowRankLinear) for g in found for m in g.members)  # dense members stack too
    saved = sum(len(g.members) - 1 for g in found)
    for batch, fewer in ((ids(length=1), saved), (ids(samples=2, length=3), saved), (ids(samples=3), 0)):
        start = len(gemms)  # 1 and 6 rows: the kernel's path, grouped; 36 rows: F.linear's, each member alone
        reference = logits(plain, batch)
        middle = len(gemms)
        assert torch.allclose(logits(grouped, batch), reference, atol=1e-5)
        assert (middle - start) - (len(gemms) - middle) == fewer
    assert all(g.enabled and g.state is None for g in found)  # every part served, nothing held
    assert torch.equal(greedy(grouped), greedy(plain))


def test_the_grouped_weights_are_views_of_one_stack_with_no_second_copy(factorized):
    grouped, plain = lowrank.load_pretrained(factorized), lowrank.load_pretrained(factorized, group_downs=False)
    logits(grouped, ids(length=1))
    for group in groups(grouped):
        stack, offset = group.stack, 0
        for weight in group.weights():
            assert weight.data_ptr() == stack.data_ptr() + offset * stack.element_size()
            offset += weight.numel()
    assert sum(storages(grouped).values()) == sum(storages(plain).values())


def test_writes_and_dtype_changes_reach_the_grouped_gemm(factorized):
    """In-place writes land in the stack; .to() gives the parameters new storage, which is stacked again."""
    grouped, plain = lowrank.load_pretrained(factorized), lowrank.load_pretrained(factorized, group_downs=False)
    logits(grouped, ids(length=1))
    members = {m: n for n, m in grouped.named_modules() if isinstance(m, GroupedInput)}
    factor = next(n for m, n in members.items() if isinstance(m, LowRankLinear)) + ".down.weight"
    dense = next(n for m, n in members.items() if not isinstance(m, LowRankLinear)) + ".weight"
    for model in (grouped, plain):
        with torch.no_grad():
            model.get_parameter(factor).mul_(-2)
            model.get_parameter(dense).add_(0.5)
    assert torch.allclose(logits(grouped, ids(length=1)), logits(plain, ids(length=1)), atol=1e-5)
    old = {id(g): g.stack.data_ptr() for g in groups(grouped)}
    for dtype in (torch.float64, torch.float32):  # float64 is off the kernel's path: each member alone
        grouped.to(dtype)
        plain.to(dtype)
        assert torch.allclose(logits(grouped, ids(length=1)), logits(plain, ids(length=1)), atol=1e-5)
        if dtype == torch.float64:  # the float32 stack is let go, not kept beside the new weights
            assert all(g.stack is None for g in groups(grouped))
    for group in groups(grouped):  # new storage, stacked again: the weights are views of the new stack
        assert group.stack.data_ptr() != old[id(group)] and group.weights()[0].data_ptr() == group.stack.data_ptr()


def test_off_the_kernel_no_group_is_made(factorized, gemms):
    """Grouping measured no gain on F.linear, and its per-call check a cost (BENCHMARKS.md "Grouped downs"): a
    model loaded without the kernel, or in float16 (which the kernel leaves to F.linear), gets no group."""
    assert not groups(lowrank.load_pretrained(factorized, decode_layout=False))
    assert not groups(lowrank.load_pretrained(factorized, dtype=torch.float16))
    model = lowrank.load_pretrained(factorized, decode_layout=False)
    assert group_downs(model) == 0
    lowrank.decode_layout(model)
    assert group_downs(model) > 0  # on the kernel now


def test_a_bfloat16_model_is_grouped_beyond_the_native_rows(factorized, gemms):
    """bfloat16 decode steps group from NATIVE_MAX_ROWS + 1 rows on (oneDNN), not below (torch's own GEMV, where
    grouping measured slower: modeling_lowrank.group_rows), and compute the same either way."""
    grouped = lowrank.load_pretrained(factorized, dtype=torch.bfloat16)
    plain = lowrank.load_pretrained(factorized, dtype=torch.bfloat16, group_downs=False)
    found = groups(grouped)
    assert found and not groups(plain)
    saved = sum(len(g.members) - 1 for g in found)
    for batch, fewer in ((ids(length=1), 0), (ids(length=NATIVE_MAX_ROWS), 0),
                         (ids(samples=NATIVE_MAX_ROWS + 1, length=1), saved), (ids(samples=16, length=1), saved)):
        start = len(gemms)
        reference = logits(plain, batch)
        middle = len(gemms)
        assert torch.allclose(logits(grouped, batch).float(), reference.float(), atol=2e-2)
        assert (middle - start) - (len(gemms) - middle) == fewer
    assert all(g.stack.dtype == torch.bfloat16 for g in found)


def test_a_grouped_model_moved_off_the_kernels_path_runs_each_member_alone(factorized, gemms):
    grouped, plain = lowrank.load_pretrained(factorized), lowrank.load_pretrained(factorized, group_downs=False)
    for model in (grouped, plain):
        lowrank.decode_layout(model, enable=False)
    counts = []
    for model in (grouped, plain):
        start = len(gemms)
        logits(model, ids(length=1))
        counts.append(len(gemms) - start)
    assert counts[0] == counts[1] and groups(grouped) and all(g.stack is None for g in groups(grouped))


def test_training_the_members_takes_their_own_gemms(factorized):
    """Gradients of the members' weights need their own GEMMs: with grad on, the group steps aside."""
    grads = {}
    for grouping in (True, False):
        model = lowrank.load_pretrained(factorized, group_downs=grouping)
        model(ids(length=4)).logits.square().mean().backward()  # 4 rows: the kernel's path
        grads[grouping] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        if grouping:
            assert all(g.state is None for g in groups(model))
    assert grads[True].keys() == grads[False].keys() and grads[True]
    assert all(torch.allclose(grads[True][n], grads[False][n], atol=1e-6) for n in grads[True])


def test_members_called_with_different_inputs_switch_their_group_off(factorized):
    """Cross-attention's k/v read other states than q: the group must never hand out a part of the wrong input."""
    model = lowrank.load_pretrained(factorized)
    attn = model.model.layers[0].self_attn
    first, second = torch.randn(1, 1, attn.q_proj.in_features), torch.randn(1, 1, attn.q_proj.in_features)
    with torch.no_grad():
        q, k, v = attn.q_proj(first), attn.k_proj(second), attn.v_proj(second)
        assert not attn.q_proj.input_group.enabled  # for good: computing q's parts for k and v would be waste
        group_downs(model, enable=False)
        assert torch.allclose(q, attn.q_proj(first), atol=1e-6)
        assert torch.allclose(k, attn.k_proj(second), atol=1e-6) and torch.allclose(v, attn.v_proj(second), atol=1e-6)


def test_an_input_changed_in_place_is_not_served_from_the_group(factorized):
    model = lowrank.load_pretrained(factorized)
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 1, attn.q_proj.in_features)
    with torch.no_grad():
        attn.q_proj(x)
        x.mul_(3)
        k = attn.k_proj(x)
        group_downs(model, enable=False)
        assert torch.allclose(k, attn.k_proj(x), atol=1e-5)


def test_peft_adapters_on_grouped_members_keep_the_grouping(factorized, gemms):
    peft = pytest.importorskip("peft")
    outs, counts = {}, {}
    for grouping in (True, False):
        torch.manual_seed(0)
        model = peft.get_peft_model(lowrank.load_pretrained(factorized, group_downs=grouping),
                                    peft.LoraConfig(target_modules=["q_proj", "v_proj", "gate_proj"], r=4,
                                                    init_lora_weights=False))
        start = len(gemms)
        outs[grouping] = logits(model, ids(length=1))
        counts[grouping] = len(gemms) - start
        assert any(isinstance(getattr(m, "base_layer", None), GroupedInput) for m in model.modules()) == grouping
    assert torch.allclose(outs[True], outs[False], atol=1e-5)
    assert counts[True] < counts[False]


def test_save_pretrained_writes_the_ungrouped_tensors(factorized, tmp_path):
    from safetensors.torch import load_file

    grouped, plain = lowrank.load_pretrained(factorized), lowrank.load_pretrained(factorized, group_downs=False)
    logits(grouped, ids(length=1))  # stacked
    grouped.save_pretrained(tmp_path / "grouped")
    plain.save_pretrained(tmp_path / "plain")
    a, b = load_file(tmp_path / "grouped" / "model.safetensors"), load_file(tmp_path / "plain" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert groups(grouped) and all(g.stack is not None for g in groups(grouped))  # saving left it grouped


def test_ungrouping_and_the_kernel_switch_compose(factorized):
    model = lowrank.load_pretrained(factorized)
    reference, count = logits(model, ids(length=1)), len(groups(model))
    members = [m for g in groups(model) for m in g.members]
    assert lowrank.decode_layout(model, enable=False) > 0
    assert all(isinstance(m, GroupedInput) and not isinstance(getattr(m, "down", m), DecodeKernel) for m in members)
    assert torch.allclose(logits(model, ids(length=1)), reference, atol=1e-5)
    lowrank.decode_layout(model)
    assert all(isinstance(m, GroupedInput) and isinstance(getattr(m, "down", m), DecodeKernel) for m in members)
    assert group_downs(model) == 0  # already grouped
    assert group_downs(model, enable=False) == count
    assert not any(isinstance(m, GroupedInput) for m in model.modules())
    assert all(isinstance(getattr(m, "down", m), DecodeKernel) for m in members)  # the kernel stays
    pointers = [p.untyped_storage().data_ptr() for p in model.parameters()]
    assert len(set(pointers)) == len(pointers)  # each weight its own storage again
    assert torch.allclose(logits(model, ids(length=1)), reference, atol=1e-5)


def test_the_bundled_file_groups_too_and_dense_models_are_left_alone(factorized, wide_dir):
    """trust_remote_code users (lm_eval's hf backend) load through the same class; a group of dense layers alone
    gained nothing when measured, so none is made."""
    assert groups(AutoModelForCausalLM.from_pretrained(factorized, trust_remote_code=True))
    assert group_downs(AutoModelForCausalLM.from_pretrained(wide_dir)) == 0


def test_members_with_biases_and_a_member_left_out():
    """Qwen2's q/k/v carry biases: a dense member's bias is added to its part, a factorized one's by its up. A
    member with a forward of its own (a quantized layer) stays out of the group."""
    from torch import nn

    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    torch.manual_seed(0)
    attn = nn.Module()
    attn.q_proj, attn.k_proj = LowRankLinear(64, 64, 8, bias=True), nn.Linear(64, 32, bias=True)
    attn.v_proj = Scaled(64, 32)
    for parameter in attn.parameters():
        nn.init.normal_(parameter)
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        before = [m(x) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
        assert lowrank.decode_layout(attn) == 3 and group_downs(attn) == 1
        assert type(attn.v_proj) is Scaled and attn.q_proj.input_group.members == [attn.q_proj, attn.k_proj]
        after = [m(x) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
    assert attn.q_proj.input_group.stack is not None  # the grouped path ran
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(before, after))


def test_inference_mode_runs_each_member_alone_and_leaves_the_weights_normal(factorized, gemms):
    """Under torch.inference_mode x has no version counter, and a stack made there would turn the parameters into
    inference tensors (then load_state_dict and optimizers fail outside it): the members run alone."""
    grouped, plain = lowrank.load_pretrained(factorized), lowrank.load_pretrained(factorized, group_downs=False)
    counts, outs = [], []
    for model in (grouped, plain):
        start = len(gemms)
        with torch.inference_mode():
            outs.append(model(ids(length=1)).logits.clone())
        counts.append(len(gemms) - start)
    assert counts[0] == counts[1] and torch.allclose(outs[0], outs[1], atol=1e-5)
    assert not any(p.is_inference() for p in grouped.parameters())
    grouped.load_state_dict(plain.state_dict())  # in place, into the (not yet made) stack's weights
    logits(grouped, ids(length=1))  # now stacked, outside inference mode
    with torch.inference_mode():
        assert torch.allclose(grouped(ids(length=1)).logits, outs[1], atol=1e-5)
    assert not any(p.is_inference() for p in grouped.parameters())
    grouped.load_state_dict(plain.state_dict())
    assert torch.allclose(logits(grouped, ids(length=1)), outs[1], atol=1e-5)
