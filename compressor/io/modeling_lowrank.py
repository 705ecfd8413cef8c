"""Factorized linear layers, and the Hugging Face classes that load lowrank checkpoints.

This file depends on torch and transformers only. `lowrank compress` copies it verbatim into every checkpoint
it writes, so `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` (and `lm_eval --model hf`)
works where lowrank is not installed; lowrank imports the very same file for `lowrank.load_pretrained`.
Consumers need transformers 4.46 or later (loaded and generated with 4.46.3, 4.51.3 and 4.57.1 as well as 5.x:
tests/test_old_transformers.py); lowrank itself needs 5.x. The tokenizer files are whatever the source's
tokenizer wrote: one saved by transformers 5 names a class (TokenizersBackend) that 4.x does not know.

A factorized linear `X` keeps its name and holds two children, `X.down` (r x in) and `X.up` (out x r, with
the bias), so y = up(down(x)). The model classes are made on demand for any architecture: the checkpoint's
`auto_map` names e.g. `modeling_lowrank.LowRankLlamaForCausalLM`, which this module builds as a subclass of
transformers' `LlamaForCausalLM` that swaps the modules listed in `config.lowrank["ranks"]` after __init__.
A fused layer factorized per output slice (`config.lowrank["sliced"]`: slice names, rows, ranks) becomes a
SlicedLowRankLinear: one stacked `X.down`, and `X.up.q`, `X.up.k`, ... per slice.

long: every checkpoint gets this one file alone (no lowrank beside it), so it cannot be split into modules.
"""

import os
import shutil

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers

DECODE_MAX_ROWS = 16  # decode_linear: more rows gain nothing over F.linear (its docstring)
DECODE_MIN_WEIGHT = 100_000  # decode_linear: smaller weights lose to its extra ops (its docstring)
NATIVE_MAX_ROWS = 2  # native_linear: bfloat16 rows beyond this lose to oneDNN (its docstring)
FORMAT_VERSION = 3  # 2: lowrank["sliced"] (per-slice fused layers); 3: lowrank["shared"] (shared-basis experts)
# transformers 5 renamed PretrainedConfig; the older name keeps this file loadable by transformers 4.x consumers
CONFIG_BASE = getattr(transformers, "PreTrainedConfig", None) or transformers.PretrainedConfig
MODEL_TYPE_PREFIX = "lowrank_"
CLASS_PREFIX = "LowRank"


class Projection(nn.Module):
    """One factor of a factorized layer: y = x W^T + b.

    Deliberately not an nn.Linear: tools that act on every nn.Linear (PEFT's "all-linear", quantizers) must see
    the factorized layer as one linear layer, not as three.
    """

    def __init__(self, in_features, out_features, bias=False, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class FactorizedWeight(torch.Tensor):
    """The dense product up @ down, handed to code that reads `layer.weight` (PEFT reads its shape and dtype).

    It is a computed value, so writing to it could only be lost silently: in-place updates raise instead,
    which is what stops `merge_and_unload()` from dropping an adapter without a word.
    """

    _WRITES = {"__set__", "__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "set_", "copy_"}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in cls._WRITES or (name.endswith("_") and not name.startswith("_")):
            raise RuntimeError(
                "this layer is factorized (lowrank): its .weight is the read-only product up @ down, so it "
                "cannot be changed in place. Keep a LoRA adapter unmerged, or merge it into a dense copy: "
                "`lowrank densify CHECKPOINT -o DENSE` (lowrank.densify), then merge there."
            )
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


class LowRankLinear(nn.Linear):
    """A linear layer stored as two factors: y = up(down(x)), rank r.

    It subclasses nn.Linear (with no weight parameter of its own) so that PEFT and other tools that target
    linear layers treat it as the linear layer it replaces: an adapter on it sees the layer's input.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device: "torch.device | str | None" = None, dtype: "torch.dtype | None" = None) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = Projection(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = Projection(rank, out_features, bias=bias, device=device, dtype=dtype)

    @property
    def weight(self):
        with torch.no_grad():
            dense = self.up.weight @ self.down.weight
        return dense.as_subclass(FactorizedWeight)

    @property
    def bias(self):
        return self.up.bias

    def forward(self, x):
        return self.up(self.down(x))

    def extra_repr(self):
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.up.bias is not None}"
        )


class SliceBias(nn.Module):
    """The bias of a slice kept dense inside a SlicedLowRankLinear (its rows are rows of the shared `down`)."""

    def __init__(self, out_features, device=None, dtype=None):
        super().__init__()
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))

    def forward(self, x):
        return x + self.bias


def interleave(parts, groups, dim=-1):
    """Concatenate the slices' outputs (or weights, dim=0) back into the fused layer's row order: contiguous
    slices one after the other, or, with `groups` > 1 (GPT-NeoX, Bloom: head after head, each head's q, k, v
    rows side by side), group by group. Views and one concatenation: no index tensor to store or to move."""
    if groups == 1:
        return torch.cat(parts, dim)
    dim = dim % parts[0].dim()
    return torch.cat([p.unflatten(dim, (groups, -1)) for p in parts], dim + 1).flatten(dim, dim + 1)


class SlicedLowRankLinear(nn.Linear):
    """A fused linear layer (q, k, v or gate, up as rows of one matrix) stored per output slice, each with its
    own rank: why is in lowrank's compression/fused.py (measured: the allocation keeps the small k and v nearly
    dense and cuts q, which one rank per fused matrix cannot express).

    One `down` [sum of widths, in] holds the slices' down factors stacked (one GEMM, one read of the input); a
    slice kept dense contributes its weight rows there directly (width = its rows). `up[name]` is the slice's
    up factor [rows, rank] with its bias, or, for a dense slice, only its bias. The output is the slices'
    outputs in the fused layer's row order. Like LowRankLinear it is ONE linear to PEFT: `.weight` is the
    read-only dense product, `.bias` the fused bias.
    """

    def __init__(self, in_features: int, out_features: int, slices, sizes, ranks, groups: int = 1,
                 bias: bool = True, device=None, dtype=None) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.groups = in_features, out_features, int(groups)
        self.slices, self.sizes = tuple(slices), tuple(int(s) for s in sizes)
        self.ranks = tuple(None if r is None else int(r) for r in ranks)
        if self.groups * sum(self.sizes) != out_features or not len(self.slices) == len(self.sizes) == len(self.ranks):
            raise ValueError(f"slices {self.slices} of {self.sizes} rows x {groups} groups do not make "
                             f"{out_features} rows")
        self.widths = tuple(self.groups * size if rank is None else rank for size, rank in zip(self.sizes, self.ranks))
        self.rank = sum(self.widths)
        self.down = Projection(in_features, self.rank, bias=False, device=device, dtype=dtype)
        self.up = nn.ModuleDict()
        for name, size, rank in zip(self.slices, self.sizes, self.ranks):
            if rank is not None:
                self.up[name] = Projection(rank, self.groups * size, bias=bias, device=device, dtype=dtype)
            elif bias:
                self.up[name] = SliceBias(self.groups * size, device=device, dtype=dtype)
        self.has_bias = bias

    def slice_weights(self):
        """Each slice's (rows x in) weight, in slice order (a dense slice's are its rows of `down`)."""
        out = []
        for name, part in zip(self.slices, self.down.weight.split(self.widths)):
            up = self.up[name] if name in self.up else None
            out.append(up.weight @ part if isinstance(up, Projection) else part)
        return out

    @property
    def weight(self):
        with torch.no_grad():
            dense = interleave(self.slice_weights(), self.groups, dim=0)
        return dense.as_subclass(FactorizedWeight)

    @property
    def bias(self):
        if not self.has_bias:
            return None
        return interleave([self.up[name].bias for name in self.slices], self.groups)

    def forward(self, x):
        parts = self.down(x).split(self.widths, -1)
        outs = [self.up[name](part) if name in self.up else part for name, part in zip(self.slices, parts)]
        return interleave(outs, self.groups)

    def spec(self):
        """What config.json records in lowrank["sliced"] for this layer, from which it is rebuilt."""
        return {"slices": list(self.slices), "sizes": list(self.sizes), "groups": self.groups,
                "ranks": list(self.ranks)}

    def extra_repr(self):
        parts = ", ".join(f"{name}={'dense' if rank is None else rank}" for name, rank in zip(self.slices, self.ranks))
        return (f"in_features={self.in_features}, out_features={self.out_features}, ranks=({parts}), "
                f"groups={self.groups}, bias={self.has_bias}")


def linear_shape(module):
    """(out_features, in_features, has_bias) of an nn.Linear or a GPT-2 style Conv1D (weight stored in x out)."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features, module.bias is not None
    if type(module).__name__ == "Conv1D":
        return module.weight.shape[1], module.weight.shape[0], module.bias is not None
    raise TypeError(f"{type(module).__name__} is not a linear layer")


def resolve_module_name(model, name):
    """Map a module name of the original architecture onto `model`, which may be its base model or a head model."""
    prefix = getattr(model, "base_model_prefix", "")
    candidates = [name]
    if prefix and name.startswith(prefix + "."):
        candidates.append(name[len(prefix) + 1 :])
    elif prefix:
        candidates.append(f"{prefix}.{name}")
    for candidate in candidates:
        try:
            model.get_submodule(candidate)
            return candidate
        except AttributeError:
            continue
    return None


def _replace_linear(model, name, kind, build):
    """Swap the linear layer `name` (resolved on `model`) for build(in, out, has_bias, like=a parameter of it),
    unless it is already a `kind`; the one place that rewrites the model's modules."""
    target = resolve_module_name(model, name)
    if target is None:
        return  # e.g. the LM head of a causal LM, when loading only its base model
    parent_name, _, child_name = target.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child_name)
    if not isinstance(old, kind):
        out_features, in_features, has_bias = linear_shape(old)
        setattr(parent, child_name, build(in_features, out_features, has_bias, next(old.parameters())))


def factorize_modules(model, ranks):
    """Replace each named linear by an empty LowRankLinear of the given rank (weights are loaded afterwards)."""
    for name, rank in ranks.items():
        _replace_linear(model, name, LowRankLinear, lambda i, o, bias, like, rank=rank: LowRankLinear(
            i, o, int(rank), bias=bias, device=like.device, dtype=like.dtype))


def slice_modules(model, sliced):
    """Replace each named fused linear by an empty SlicedLowRankLinear built from its config.lowrank["sliced"] entry."""
    for name, spec in sliced.items():
        _replace_linear(model, name, SlicedLowRankLinear, lambda i, o, bias, like, spec=spec: SlicedLowRankLinear(
            i, o, spec["slices"], spec["sizes"], spec["ranks"], spec.get("groups", 1), bias=bias, device=like.device,
            dtype=like.dtype))


# ---- mixture-of-experts ------------------------------------------------------------------------------------------
# transformers 5 keeps a layer's routed experts as 3-D parameters (`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I],
# transposed in gpt-oss) behind `use_experts_implementation`. lowrank "unpacks" such a module: each 3-D tensor
# becomes a ModuleList of E nn.Linear (`experts.gate_up_proj.3`), which lowrank then factorizes like any linear
# layer, each expert with its own rank (a list layout: no padding to a common rank, and per-expert ranks from the
# allocation cost nothing). The module keeps its class's routing interface, attributes and `_apply_gate`; only
# its forward is replaced by the same per-expert loop over the experts the router hit. `config.lowrank["experts"]`
# lists the unpacked modules, which a checkpoint rebuilds before its factorized layers are swapped in.

EXPERT_TENSORS = ("gate_up_proj", "down_proj")
_mixed_classes: dict = {}  # (mixin, class) -> the class with the mixin in front, made once
_prefixes: dict = {}  # mixin -> the prefix of its classes' names


def mixed_class(mixin, cls, prefix):
    """`cls` with `mixin` first in its bases, named prefix + its name (UnpackedQwen3MoeExperts, DecodeLinear)."""
    if (mixin, cls) not in _mixed_classes:
        _mixed_classes[mixin, cls] = type(prefix + cls.__name__, (mixin, cls), {"__module__": __name__})
        _prefixes[mixin] = prefix
    return _mixed_classes[mixin, cls]


def unmixed_class(cls, mixin):
    """`cls` without `mixin`, keeping the mixins mixed_class put around it (GroupedDecodeLinear -> GroupedLinear)."""
    outer, inner = cls.__bases__
    return inner if outer is mixin else mixed_class(outer, unmixed_class(inner, mixin), _prefixes[outer])


def is_packed_experts(module):
    """A transformers experts module with a gate (3-D gate_up_proj and down_proj) that a forward here reproduces:
    the top-k interface of `use_experts_implementation`, or Llama 4's routed copies (_routes_copies)."""
    params = getattr(module, "_parameters", {})
    known = _routes_copies(module) or (
        hasattr(module, "is_transposed") and getattr(module, "has_gate", False)
        and not getattr(module, "has_post_expert_norm", False) and hasattr(module, "_apply_gate"))
    return known and all(params.get(t) is not None and params[t].dim() == 3 for t in EXPERT_TENSORS)


def _routes_copies(module):
    """Llama 4's experts: forward(x) reads E copies of the tokens, each scaled by its router score (0 where not
    routed), and stores its tensors as [E, in, out] (gate_up [E, H, 2I], gate first)."""
    return hasattr(module, "expert_dim") and hasattr(module, "act_fn") and not hasattr(module, "is_transposed")


def experts_transposed(module):
    """Whether the 3-D expert tensors are stored [E, in, out], the transpose of a linear layer's weight."""
    return getattr(module, "is_transposed", True)  # Llama 4 has no flag: its tensors are [E, in, out]


class UnpackedExperts:
    """Mixin for an experts class whose 3-D tensors were unpacked into ModuleLists of per-expert linear layers.

    The routing weight multiplies each expert's output; where the down projection has no bias it is applied to
    that projection's input instead (the same product, since the layer is linear). So a statistics hook on
    `down_proj[e]` sees the input as weighted by the router: the output error it weighs is the error the block
    output sees."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        experts = len(self.down_proj)
        with torch.no_grad():
            hit = [e for e in torch.unique(top_k_index).tolist() if 0 <= e < experts]
        basis = getattr(self, "gate_up_proj_basis", None)  # a shared input basis: one GEMM for every token
        source = hidden_states if basis is None else basis(hidden_states)
        for e in hit:
            tokens, position = torch.where(top_k_index == e)
            gate_up = self.gate_up_proj[e]
            h = self._apply_gate(gate_up(source[tokens]) if basis is None else gate_up.from_basis(source[tokens]))
            weight = top_k_weights[tokens, position, None]
            down = self.down_proj[e]
            y = down((h * weight).to(h.dtype)) if down.bias is None else down(h) * weight
            out.index_add_(0, tokens, y.to(out.dtype))
        return out


class UnpackedRoutedCopies(UnpackedExperts):
    """Llama 4's experts unpacked. Its forward is handed E copies of the tokens, each already multiplied by its
    router score, which is 0 for the experts a token is not routed to; each expert runs on its routed tokens
    only (an unrouted one gives exactly 0 through the bias-free gate/up and down), so its statistics count the
    tokens its router sent, weighted as the model weighs them."""

    def forward(self, hidden_states):
        x = hidden_states.view(len(self.down_proj), -1, hidden_states.shape[-1])
        out = x.new_zeros(*x.shape[:2], self.down_proj[0].out_features)
        for e in range(x.shape[0]):
            with torch.no_grad():
                tokens = torch.where(x[e].abs().amax(-1) > 0)[0]
            gate, up = self.gate_up_proj[e](x[e, tokens]).chunk(2, dim=-1)
            out[e, tokens] = self.down_proj[e](up * self.act_fn(gate))
        return out.view(-1, out.shape[-1])


class SharedBasisLinear(nn.Linear):
    """One expert's matrix as a product with a factor that every expert of its layer shares (`--experts
    shared-basis`, config.lowrank["shared"]): side "in" W_e = up_e @ basis (basis [r, in]), side "out" W_e =
    basis @ down_e (basis [out, r]). The basis is a Projection registered once on the experts module, as
    `<tensor>_basis`, and only referenced here: the checkpoint stores it once, and no tied-weights machinery
    is involved (a missing tensor would be silently re-initialized). The bias is the expert's own."""

    def __init__(self, basis, side, in_features, out_features, bias=False, device=None, dtype=None):
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.side = in_features, out_features, side
        self.rank = basis.out_features if side == "in" else basis.in_features
        object.__setattr__(self, "basis", basis)  # not a child module: stored under the experts module only
        if side == "in":
            self.up = Projection(self.rank, out_features, device=device, dtype=dtype)
        else:
            self.down = Projection(in_features, self.rank, device=device, dtype=dtype)
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None

    def factors(self):
        return (self.up, self.basis) if self.side == "in" else (self.basis, self.down)

    @property
    def weight(self):
        up, down = self.factors()
        with torch.no_grad():
            return (up.weight @ down.weight).as_subclass(FactorizedWeight)

    def from_basis(self, z):
        """The output from the basis' output z = basis(x) (side "in"), computed once for all the experts."""
        y = self.up(z)
        return y if self.bias is None else y + self.bias

    def forward(self, x):
        up, down = self.factors()
        return self.from_basis(down(x)) if self.side == "in" else (
            up(down(x)) if self.bias is None else up(down(x)) + self.bias)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, " \
               f"shared={self.side}, bias={self.bias is not None}"


def share_modules(model, shared):
    """Rebuild, empty, the shared-basis experts of config.lowrank["shared"] ({experts module: {tensor: {"side",
    "rank"}}}) on unpacked experts modules; the weights are loaded afterwards."""
    for name, tensors in shared.items():
        target = resolve_module_name(model, name)
        if target is None:
            continue
        module = model.get_submodule(target)
        for tensor, spec in tensors.items():
            linears, side, rank = getattr(module, tensor), spec["side"], int(spec["rank"])
            like = next(linears[0].parameters())
            n, m = linears[0].in_features, linears[0].out_features
            basis = Projection(n, rank, device=like.device, dtype=like.dtype) if side == "in" else \
                Projection(rank, m, device=like.device, dtype=like.dtype)
            setattr(module, tensor + "_basis", basis)
            for e, old in enumerate(linears):
                linears[e] = SharedBasisLinear(basis, side, n, m, bias=old.bias is not None, device=like.device,
                                               dtype=like.dtype)


def unpacked_class(cls, copies=False):
    return mixed_class(UnpackedRoutedCopies if copies else UnpackedExperts, cls, "Unpacked")


def unpack_experts(module):
    """Turn a packed experts module into its unpacked form, in place (the weights are copied per expert; on the
    meta device only the shapes are made). Returns the module."""
    for name in EXPERT_TENSORS:
        param = module._parameters.pop(name)
        bias = module._parameters.pop(name + "_bias", None)
        linears = nn.ModuleList()
        for e in range(param.shape[0]):
            weight = param[e].T if experts_transposed(module) else param[e]
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=param.device,
                               dtype=param.dtype)
            if param.device.type != "meta":
                with torch.no_grad():
                    linear.weight.copy_(weight)
                    if bias is not None:
                        linear.bias.copy_(bias[e])
            linears.append(linear)
        setattr(module, name, linears)
    module.__class__ = unpacked_class(type(module), _routes_copies(module))
    return module


def pack_experts(module):
    """The inverse of unpack_experts, factorized experts multiplied out: the module the original class expects."""
    base = next(cls for cls in type(module).__mro__[1:] if not issubclass(cls, UnpackedExperts))
    for name in EXPERT_TENSORS:
        linears = module._modules.pop(name)
        weights = torch.stack([linear.weight.detach().clone() for linear in linears])
        module.register_parameter(name, nn.Parameter(weights.transpose(1, 2) if experts_transposed(module) else weights))
        if linears[0].bias is not None:
            module.register_parameter(name + "_bias",
                                      nn.Parameter(torch.stack([linear.bias.detach() for linear in linears])))
    module.__class__ = base
    return module


def unpack_named_experts(model, names):
    """Unpack the experts modules named in a checkpoint's `lowrank.experts` list (module names of the original
    architecture, resolved on `model` as the factorized layers are)."""
    for name in names:
        target = resolve_module_name(model, name)
        if target is not None and is_packed_experts(model.get_submodule(target)):
            unpack_experts(model.get_submodule(target))


def _cpu_autocast():
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch before 2.4, which a consumer of the bundled file may have
        return torch.is_autocast_cpu_enabled()


# Whether torch.compile is tracing (torch 2.3 and later; never, before): it should see F.linear, not the kernel's
# tricks or a global switch. Looked up once: decode_linear asks on every call.
_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)
DECODE_DTYPES = (torch.float32, torch.bfloat16)  # the dtypes decode_linear has a path for (its docstring)


def decode_rows(x):
    """x's rows if decode_linear may take its own path for it (float32 or bfloat16 on CPU, 1-16 rows, no autocast),
    else 0."""
    rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
    if (0 < rows <= DECODE_MAX_ROWS and x.dtype in DECODE_DTYPES and x.device.type == "cpu"
            and not _cpu_autocast()):
        return rows  # autocast casts F.linear's bias too: under it, its rules apply whole
    return 0


def decode_linear(x, weight, bias=None):
    """F.linear(x, weight, bias), computed on a faster CPU path when x has a decode step's few rows.

    Why, float32: on CPU (MKL), F.linear over a few rows is the slow path. One row goes to a GEMV and a few rows
    to a GEMM whose short side is the output's rows; on this machine both stream a weight at 7-14 GB/s. The same
    product taken as weight @ x^T, with one row doubled so that it is a GEMM of two columns and not a GEMV, streams
    at 24-26 GB/s. Times against F.linear, each weight streamed from memory (bench/decode_kernel.py, BENCHMARKS.md
    "Decode kernel"): one row 0.35-0.51x for 1536 x 576, 576 x 1536, 576 x 576 and the 49,152 x 576 LM head,
    0.70x for 192 x 576, 0.36-0.61x for up factors (1536 x r, 576 x r), 0.57-0.90x for down factors (r x 576,
    r x 1536); 2-4 rows 0.23-0.84x; 8 rows 0.37-0.81x, but 1.14-1.45x for 256 x 576 and the weights with 1536
    inputs; 16 rows 0.83-1.16x; from 32 rows on it stops paying (0.90-1.12x), hence DECODE_MAX_ROWS. Under
    DECODE_MIN_WEIGHT elements its extra ops (a copy in, a copy out, 1-2 us each) cost what it saves (576 x 128,
    128 x 576: 1.0x), so those keep F.linear. Over whole models (SmolLM2, batch 1): dense 1.77x, keep 0.5 1.87x
    against F.linear.
    bfloat16 takes another path (native_linear, up to NATIVE_MAX_ROWS rows): there the trick above is slower than
    F.linear (0.86-1.54x, mostly above 1), and F.linear's own cost is elsewhere.
    """
    if _compiling():  # first: torch.compile would otherwise guard (and recompile) on the row tests below
        return F.linear(x, weight, bias)
    # Then the cheapest test: bfloat16 beyond NATIVE_MAX_ROWS (batched decode) ends on F.linear, and every check
    # before that is Python paid on each of a step's ~210 calls (bench/grouped_downs.py: "dense, kernel" against
    # "dense, F.linear" at batch 4-16 in bfloat16 is that Python alone).
    shape, bf16 = x.shape, x.dtype == torch.bfloat16
    rows = x.numel() // shape[-1] if shape and shape[-1] else 0
    if (not 0 < rows <= (NATIVE_MAX_ROWS if bf16 else DECODE_MAX_ROWS) or not decode_rows(x)
            or weight.dtype != x.dtype or weight.device.type != "cpu"):
        return F.linear(x, weight, bias)
    if bf16:
        return native_linear(x, weight, bias)
    if weight.numel() < DECODE_MIN_WEIGHT or not weight.is_contiguous():
        return F.linear(x, weight, bias)
    flat = x.reshape(rows, x.shape[-1])
    if rows == 1:  # two columns: a GEMM, where one would be a GEMV; the fewest ops (each costs 1-2 us here)
        out = torch.mm(weight, torch.cat((flat, flat)).t()).select(1, 0)
        out = out.contiguous() if bias is None else out + bias
    else:
        out = torch.mm(weight, flat.contiguous().t()).t().contiguous()
        if bias is not None:
            out += bias
    return out.view(*x.shape[:-1], weight.shape[0])


def native_linear(x, weight, bias=None):
    """F.linear(x, weight, bias) on torch's own CPU kernels, with oneDNN switched off for the call: for bfloat16
    rows up to NATIVE_MAX_ROWS.

    Why: for bfloat16 on a CPU with AVX512, F.linear goes to oneDNN's matmul, which reorders the plain weight
    into its blocked layout on every call: a second pass over the weight. torch's own bfloat16 GEMV reads it once
    (accumulating in float32). Against F.linear, each weight streamed from memory, one run (bench/decode_kernel.py
    --dtype bfloat16, BENCHMARKS.md "Eager transformers in bfloat16"; its "native" and "decode_linear" columns
    time the same product at 1-2 rows and differ by up to 1.7x, the bench's noise): one row 0.35-0.71x over
    SmolLM2's shapes and factors, LM head included (decode_linear column); two rows 0.30-0.92x; from four rows on
    it loses (0.42-2.24x at four, 1.04-5.2x at sixteen: it takes one pass over the weight per row). oneDNN over a
    weight reordered once (inductor's CPU path) is mostly 0.4-0.9x F.linear at 1-32 rows, but needs a second copy
    of every weight, which an in-place write through `.data` (PEFT's merge makes one) would leave stale; so it is
    not used. Measured with torch 2.13 only.
    The switch is process-wide: torch reaches its own bfloat16 GEMV no other way (aten::mv goes to oneDNN too).
    It is turned back on at once, by the call that turned it off. With one thread, a user who switched oneDNN off
    keeps it off. Other threads running torch meanwhile get torch's own kernels for those microseconds: the same
    products, rounded alike but not bit for bit, slower for large ones, and a thread that sets the switch itself
    in that window can see its setting undone. A server running other work beside a bfloat16 model in threads
    should load the model with decode_layout=False. Under torch.compile, F.linear is traced instead.
    """
    if not torch._C._get_mkldnn_enabled():
        return F.linear(x, weight, bias)
    torch._C._set_mkldnn_enabled(False)
    try:
        return F.linear(x, weight, bias)
    finally:
        torch._C._set_mkldnn_enabled(True)


class DecodeKernel:
    """Mixed into a linear module's class by decode_layout: the module's forward runs decode_linear."""

    def forward(self, x):
        return decode_linear(x, self.weight, self.bias)


def decode_layout(model: nn.Module, enable: bool = True) -> int:
    """Run every linear layer of `model` (nn.Linear, and the factors of factorized layers) through decode_linear,
    the faster CPU path for a decode step's few rows; returns how many modules changed. `enable=False` puts
    F.linear back. The name is older than the mechanism: up to the twenty-first session this stored wide
    weights column-major, which the kernel beats at every row count (BENCHMARKS.md "Decode kernel").

    Only each module's class changes (to a subclass: isinstance checks, PEFT's among them, still hold): weights,
    values, names, ties and files do not. Modules whose class has a forward of its own (a quantized linear, an
    adapter layer) are left alone. decode_linear decides per call, so a model moved to a dtype other than float32
    and bfloat16, or to another device, afterwards falls back to F.linear by itself.
    """
    changed = 0
    for module in model.modules():
        grouped = isinstance(module, GroupedInput)  # the kernel goes beneath the group's forward
        cls = unmixed_class(type(module), GroupedInput) if grouped else type(module)
        if not enable and issubclass(cls, DecodeKernel):
            cls = unmixed_class(cls, DecodeKernel)
        elif enable and cls.forward in (nn.Linear.forward, Projection.forward) and "weight" in module._parameters:
            cls = mixed_class(DecodeKernel, cls, "Decode")
        else:
            continue
        module.__class__ = mixed_class(GroupedInput, cls, "Grouped") if grouped else cls
        changed += 1
    return changed


# ---- layers that read one input ----------------------------------------------------------------------------------
# Sibling layers that read the same input: transformers calls them one by one (q_proj(x), k_proj(x), v_proj(x)).
INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"), ("w1", "w3"))


def _first(member):
    """The module that makes a member's first GEMM: a factorized layer's down, a dense layer itself."""
    return member.down if isinstance(member, LowRankLinear) else member


def group_rows(x):
    """x's rows if its input group runs one stacked GEMM for it (InputGroup), else 0: on the decode kernel's path,
    but for bfloat16 only beyond NATIVE_MAX_ROWS. Paired over whole SmolLM2 decode steps in bfloat16 (keep 0.8 and
    keep 0.5, bench/grouped_downs.py --dtype bfloat16), grouping measured 0.975-0.981x at batch 1, where the members
    run on torch's GEMV, and 1.020-1.042x at batch 4-16, where they run on oneDNN (1.001-1.011x since the kernel's
    own checks cost less there: BENCHMARKS.md "Batched bfloat16 decode")."""
    if _compiling():
        return 0
    shape = x.shape
    if x.dtype == torch.bfloat16 and shape and x.numel() <= NATIVE_MAX_ROWS * shape[-1]:
        return 0  # the cheapest test first: at batch 1 it is the group's only work on each member's call
    return decode_rows(x)


class InputGroup:
    """The members of one input group (q/k/v or gate/up, at least one factorized) run their first GEMMs as one.

    Why: a factorized layer makes two GEMMs where the dense one made one, and each call costs some microseconds
    beside its arithmetic (a module call, the kernel's copies). One GEMM over the stacked first factors (a factorized
    member's down, a dense member's whole weight, as the vLLM plugin stacks them) makes one call in place of two or
    three. The arithmetic does not shrink: MKL takes as long over the stack as over its parts. So the gain is
    small, and only where those costs weigh: on the decode kernel's path (group_rows; bfloat16: see there), where
    a float32 SmolLM2 decode step runs 1.013-1.025x faster at batch 1 (keep 0.8 and keep 0.5, two runs) and
    0.998-1.029x at batch 4-16 (paired over 200-400 steps, bench/grouped_downs.py, BENCHMARKS.md "Grouped
    downs"). On F.linear the same grouping measured 0.98x at batch 1, and a 512-token prefill 0.99-1.00x: there
    the members run alone. A group of dense layers only is not made: it has no extra call to pay back.

    The stacked weight is the storage: the members' parameters become views of its row blocks (no second copy;
    in-place writes, load_state_dict's and an optimizer's, reach it). If they stop being its views (`.to()`,
    `param.data = ...`), the next call on the kernel's path stacks them again, and any other call lets the old
    stack go once the first member's weight is no longer its view (until then it lives on through that view).
    The first member called with a new input computes every member's part; the others take theirs while
    the input is the same tensor, unchanged (its version counter), and the parts are dropped once all were served.
    A member called with another input while parts wait (cross-attention's k/v read the encoder's states; a layer
    a model skips; two threads sharing the model) switches the group off for good: each member then runs alone.
    Members also run alone while the weights need gradients (their gradients need their own GEMMs) and under
    torch.inference_mode (x has no version counter there). Not checked: a write to the weights between two
    members' calls on the same input, which no forward pass makes.
    """

    def __init__(self, members):
        self.members, self.enabled = members, True
        self.owners = [_first(m) for m in members]  # the modules whose `weight` is stacked
        self.everyone = frozenset(range(len(members)))
        self.stack, self.pointers, self.widths, self.state = None, None, None, None  # state: (input, version,
        # parts, indices still waiting)

    def weights(self):
        return [owner._parameters["weight"] for owner in self.owners]  # read each time: a load may swap them

    def restack(self, weights):
        """Stack the members' weights and make them views of the stack; False if they cannot be stacked."""
        if len({(w.dtype, w.device, w.shape[1:]) for w in weights}) > 1 or weights[0].device.type == "meta":
            return False
        with torch.no_grad():
            self.stack = torch.cat([w.detach() for w in weights])
        self.widths = [w.shape[0] for w in weights]
        for weight, view in zip(weights, self.stack.split(self.widths)):
            weight.data = view
        self.pointers = [w.data_ptr() for w in weights]
        return True

    def part(self, member, x):
        """`member`'s share of the stacked GEMM over x, or None: the member runs alone (as it does off the kernel's
        path, where grouping measured no gain: see the class docstring)."""
        index = self.members.index(member) if self.enabled and group_rows(x) else None
        if index is None or not isinstance(self.owners[index], DecodeKernel) or (
                torch.is_inference_mode_enabled() or x.is_inference()):
            # off the kernel's path; or under inference mode, where x has no version counter to check and a stack
            # made there would turn the parameters into inference tensors. Let go of a stack no longer in use: if
            # the first weight is still its view, the stack lives on through it anyway (one check, not one a member).
            if self.stack is not None and self.owners[0]._parameters["weight"].data_ptr() != self.pointers[0]:
                self.stack = self.pointers = self.state = None
            return None
        weights = None
        if torch.is_grad_enabled():
            weights = self.weights()
            if any(w.requires_grad for w in weights):
                return None
        state = self.state  # one read: a consistent snapshot
        if state is not None and state[0] is x and state[1] == x._version:
            waiting = state[3] - {index}
            self.state = (*state[:3], waiting) if waiting else None
            return state[2][index]
        weights = weights or self.weights()
        # parts still waiting for another input: the members do not share theirs
        if state is not None or not ([w.data_ptr() for w in weights] == self.pointers or self.restack(weights)):
            self.enabled, self.state = False, None
            return None
        parts = decode_linear(x, self.stack).split(self.widths, -1)
        self.state = (x, x._version, parts, self.everyone - {index})
        return parts[index]

    def release(self):
        """Give each member's weight its own storage again."""
        for weight in self.weights() if self.stack is not None else []:
            weight.data = weight.data.clone()
        self.stack = self.pointers = self.state = None


class GroupedInput:
    """Mixed into an input group member's class by group_downs: its first GEMM comes from the group's."""

    input_group: InputGroup

    def forward(self, x):
        part = self.input_group.part(self, x)
        if part is None:
            return super().forward(x)
        if isinstance(self, LowRankLinear):
            return self._modules["up"](part)
        bias = self._parameters["bias"]
        return part if bias is None else part + bias


def _group_member(module):
    """The layer a group can take (a PEFT layer's base layer), or None. It must be a factorized layer or a plain
    linear one, on the decode kernel with float32 or bfloat16 CPU weights: elsewhere a group would never act, and
    its check on every call cost a model on F.linear 0.3-1.2% (BENCHMARKS.md "Grouped downs")."""
    module = getattr(module, "base_layer", module)
    plain = unmixed_class(type(module), GroupedInput) if isinstance(module, GroupedInput) else type(module)
    if not isinstance(module, LowRankLinear) and not (
            plain.forward is DecodeKernel.forward and "weight" in module._parameters):
        return None
    first = _first(module)
    weight = first._parameters.get("weight")
    if (not isinstance(first, DecodeKernel) or weight is None or weight.dtype not in DECODE_DTYPES
            or weight.device.type != "cpu" or any(hasattr(p, "_hf_hook") for p in [module, *module.children()])):
        return None  # (accelerate's hooks move the weights on every call)
    return module


def group_downs(model: nn.Module, enable: bool = True) -> int:
    """Run the first GEMMs of each input group of `model` (q/k/v, gate/up: INPUT_GROUPS) as one GEMM, where at
    least one member is factorized (InputGroup says why and how); returns how many groups changed. `enable=False`
    gives each member its own forward and its own storage back. It takes layers on the decode kernel with float32
    or bfloat16 CPU weights only (decode_layout first; after moving a model to one of those on CPU, call it again).

    Names, values and modules stay: PEFT sees the same layers, and an adapter on a member keeps the grouping (its
    base layer is called with the same input). save_pretrained writes the same files; safetensors' save_file
    refuses tensors that share storage, so call group_downs(model, enable=False) before it.
    """
    if not enable:
        groups = {id(m.input_group): m.input_group for m in model.modules() if isinstance(m, GroupedInput)}
        for group in groups.values():
            group.release()
            for member in group.members:
                member.__class__ = unmixed_class(type(member), GroupedInput)
                del member.input_group
        return len(groups)
    changed = 0
    for parent in list(model.modules()):
        for names in INPUT_GROUPS:
            found = [parent._modules[name] for name in names if parent._modules.get(name) is not None]
            members = [m for m in map(_group_member, found) if m is not None]
            if (len(members) < 2 or not any(isinstance(m, LowRankLinear) for m in members)
                    or len({m.in_features for m in members}) > 1 or any(isinstance(m, GroupedInput) for m in members)):
                continue
            group = InputGroup(members)
            for member in members:
                member.__class__ = mixed_class(GroupedInput, type(member), "Grouped")
                member.input_group = group
            changed += 1
    return changed


def _init_factors(model, module):
    from transformers import initialization as init

    std = getattr(model.config, "initializer_range", None) or 0.02
    if isinstance(module, SharedBasisLinear):  # the shared basis too, until loaded (init skips loaded tensors)
        for part in module.factors():
            init.normal_(part.weight, mean=0.0, std=std)
        if module.bias is not None:
            init.zeros_(module.bias)
        return
    init.normal_(module.down.weight, mean=0.0, std=std)
    for up in (module.up.values() if isinstance(module, SlicedLowRankLinear) else [module.up]):
        if isinstance(up, Projection):
            init.normal_(up.weight, mean=0.0, std=std)
        if up.bias is not None:
            init.zeros_(up.bias)


_classes: dict = {}  # name -> generated class, so that each is made once
_decode_layout, _group_downs = decode_layout, group_downs  # the names the classes' from_pretrained arguments hide


def _make_config_class(base):
    model_type = MODEL_TYPE_PREFIX + base.model_type
    return type(CLASS_PREFIX + base.__name__, (base,), {"model_type": model_type, "__module__": __name__})


def _make_model_class(base, config_class):
    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        block = getattr(config, "lowrank", None) or {}
        unpack_named_experts(self, block.get("experts", []))
        factorize_modules(self, block.get("ranks", {}))
        slice_modules(self, block.get("sliced", {}))
        share_modules(self, block.get("shared", {}))

    def _init_weights(self, module):
        if isinstance(module, (LowRankLinear, SlicedLowRankLinear, SharedBasisLinear)):
            _init_factors(self, module)
        elif not isinstance(module, (Projection, SliceBias, UnpackedExperts)):  # an unpacked module's linears init themselves
            base._init_weights(self, module)

    @classmethod
    def from_pretrained(cls, *args, decode_layout=True, group_downs=True, **kwargs):
        # On by default: both change the linear modules' classes (and where the grouped weights live), no values.
        model = base.from_pretrained.__func__(cls, *args, **kwargs)
        if decode_layout:
            _decode_layout(model)
        if group_downs:
            _group_downs(model)
        return model

    def save_pretrained(self, save_directory, *args, **kwargs):
        base.save_pretrained(self, save_directory, *args, **kwargs)
        # The checkpoint must stay loadable without lowrank: ship this file with it.
        target = os.path.join(save_directory, "modeling_lowrank.py")
        if os.path.abspath(__file__) != os.path.abspath(target):
            shutil.copyfile(__file__, target)

    namespace = {
        "config_class": config_class,
        "__init__": __init__,
        "_init_weights": _init_weights,
        "from_pretrained": from_pretrained,
        "save_pretrained": save_pretrained,
        "__module__": __name__,
    }
    return type(CLASS_PREFIX + base.__name__, (base,), namespace)


def lowrank_class(name):
    """The class called `name` ("LowRank" + a transformers class name), made once and cached."""
    if name in _classes:
        return _classes[name]
    base_name = name[len(CLASS_PREFIX) :] if name.startswith(CLASS_PREFIX) else None
    base = getattr(transformers, base_name, None) if base_name else None
    if base is None or not isinstance(base, type):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if issubclass(base, CONFIG_BASE):
        cls = _make_config_class(base)
    elif issubclass(base, transformers.PreTrainedModel):
        cls = _make_model_class(base, lowrank_class(CLASS_PREFIX + base.config_class.__name__))
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    _classes[name] = cls
    return cls


def __getattr__(name):
    # transformers resolves auto_map entries with getattr(module, name): classes are made on first use.
    if name.startswith(CLASS_PREFIX):
        return lowrank_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
