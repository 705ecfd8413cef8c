"""How much of a model the requested ratio can act on: every parameter counted once, as targeted or as staying
dense with the reason why.

`--ratio` is the fraction of the *targeted* parameters kept. On a dense transformer the targets are ~90% of the
model, so "targeted layers: kept 50%" is close to what the model keeps. On a model whose weights mostly sit in
tensors that are not targets (mixture-of-experts layers whose experts are 3-D tensors, when they are not
targeted), the same line would read as success while the model keeps almost everything: this module is what lets
the summary and the report say so, with numbers.
"""

from dataclasses import dataclass, field

from .targets import block_lists, is_linear, is_router, stack_names

# why each kind of parameter stays dense (the report's wording)
REASONS = {
    "outside": "embeddings, LM head and final norm: outside the repeated blocks, never targeted",
    "stacks": "other stacks of blocks (a vision tower, a second tower...): not among the stacks --blocks names",
    "excluded": "linear layers left out by --targets / --ignore",
    "experts": "expert tensors (3-D) left out by --targets / --ignore, or in a layout lowrank cannot unpack",
    "router": "routers (the expert gate) stay dense: they decide the routing",
    "matrices": "block matrices that are not linear layers (not targetable)",
    "vectors": "norms, biases and other 1-D tensors",
}
# kinds that the user did not choose and that hold enough parameters to matter: said as a warning
UNCHOSEN = ("experts", "matrices", "stacks")


@dataclass
class Coverage:
    total: int  # every parameter of the model, tied copies once
    targeted: int  # parameters of the targeted tensors (what --ratio applies to)
    dense: dict = field(default_factory=dict)  # kind -> parameters that stay dense
    other_stacks: list = field(default_factory=list)  # stacks of blocks outside --blocks (they stay dense)

    @property
    def targeted_fraction(self):
        return self.targeted / self.total if self.total else 0.0

    def as_dict(self):
        """The report's `coverage` section."""
        return {
            "params_total": self.total,
            "targeted": {"params": self.targeted, "fraction": round(self.targeted_fraction, 6)},
            "not_targeted": [
                {"kind": kind, "params": params, "fraction": round(params / self.total, 6), "why": REASONS[kind]}
                for kind, params in sorted(self.dense.items(), key=lambda item: -item[1]) if params
            ],
        }

    def warning(self, ratio):
        """A sentence when parameters the user did not exclude stay dense in amounts that matter (>= 5% of the
        model), saying how much of the model the ratio can reach; None otherwise."""
        unchosen = {kind: self.dense.get(kind, 0) for kind in UNCHOSEN}
        missed = sum(unchosen.values())
        if not self.total or missed < 0.05 * self.total:
            return None
        parts = ", ".join(f"{REASONS[kind]} ({params / self.total:.1%})" for kind, params in unchosen.items() if params)
        floor = 1 - self.targeted_fraction * (1 - ratio)
        return (f"--ratio {ratio:g} applies to the targeted layers, which hold only {self.targeted_fraction:.1%} of "
                f"this model's parameters: the model keeps at least {floor:.1%}. Not targeted: {parts}")


def _kind(param_name, param, module_name, module, inside, block_linears, other_stacks):
    if not param_name.startswith(inside):
        return "stacks" if any(param_name.startswith(stack + ".") for stack in other_stacks) else "outside"
    if param.dim() >= 2 and is_router(module_name, module):
        return "router"
    if module_name in block_linears:
        return "excluded" if param.dim() >= 2 else "vectors"
    if param.dim() >= 3:
        return "experts"
    if param.dim() <= 1:
        return "vectors"
    return "matrices"


def measure_coverage(model, blocks_name, targets, tied=()):
    """Coverage of `model` for `targets` (block index -> target names, as select_targets gives): a target names a
    linear layer (its weight is targeted, its bias stays) or directly a parameter (a 3-D expert tensor).
    `tied`: parameter names that are copies of another (counted once)."""
    target_names = {name for names in targets.values() for name in names}
    modules = dict(model.named_modules())
    inside = tuple(name + "." for name in stack_names(blocks_name))  # an encoder-decoder: both of its stacks
    block_linears = {name for name, module in modules.items() if name.startswith(inside) and is_linear(module)}
    other_stacks = [name for name, _ in block_lists(model) if name + "." not in inside]
    targeted, dense, total = 0, {}, 0
    seen = set()
    for module_name, module in modules.items():
        for short, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{short}" if module_name else short
            if name in tied or id(param) in seen:
                continue
            seen.add(id(param))
            total += param.numel()
            if name in target_names or (module_name in target_names and short == "weight"):
                targeted += param.numel()
                continue
            kind = _kind(name, param, module_name, module, inside, block_linears, other_stacks)
            dense[kind] = dense.get(kind, 0) + param.numel()
    return Coverage(total, targeted, dense, other_stacks)
