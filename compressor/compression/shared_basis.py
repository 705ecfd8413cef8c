"""`--experts shared-basis`: the experts of one MoE layer share one factor of each expert matrix (issue 17 item 4;
D²-MoE, MoE-SVD, Sub-MoE's "basis sharing").

    gate_up_proj  every expert reads the same hidden states: a shared INPUT basis B [r, H], W_e ~= U_e B.
                  B spans the top-r right singular vectors of the stacked whitened weights [W_1 S; ...; W_E S],
                  S S^T the layer's pooled Gram (the experts' Grams summed: token-weighted); then each U_e is the
                  least-squares fit under that expert's own damped Gram, U_e = W_e G_e B^T (B G_e B^T)^-1.
                  The forward runs B once on every token before routing (one GEMM instead of E).
    down_proj     each expert reads its own activations, but all write the hidden state: a shared OUTPUT basis
                  A [H, r], W_e ~= A C_e. A = the top-r eigenvectors of sum_e W_e G_e W_e^T and C_e = A^T W_e,
                  which is the exact optimum of sum_e ||(W_e - A C_e) X_e||^2 for orthonormal A.

Ranks: the experts' own ranks (the --ratio rule or the allocation, per expert) set the group's parameter budget,
sum_e r_e (m + n); the shared rank is the largest r whose r*(shared side) + E*r*(own side) fits in it, so the
budget counts the basis once. The report gives the basis' parameters to expert 0 of the group (info["shared"]
says so): the totals are exact. Statistics are float64, the fit float64, the factors cast to the stored dtype.
"""

import torch

from ..core.ranks import factor_params
from ..io.modeling_lowrank import Projection, SharedBasisLinear, UnpackedExperts, linear_shape
from .targets import dense_weight, replace_module

SIDES = {"gate_up_proj": "in", "down_proj": "out"}  # which factor is shared, per expert tensor


def shared_groups(block, names):
    """{(experts module rel name, tensor): [(name, rel) of expert 0..E-1]} for the expert tensors of `names`
    (name -> rel) whose E experts are all targets: only a whole layer of experts can share a basis."""
    groups = {}
    for name, rel in names.items():
        parent, _, index = rel.rpartition(".")
        module, _, tensor = parent.rpartition(".")
        if tensor in SIDES and index.isdigit() and isinstance(block.get_submodule(module), UnpackedExperts):
            groups.setdefault((module, tensor), {})[int(index)] = (name, rel)
    whole = {}
    for (module, tensor), members in groups.items():
        experts = len(getattr(block.get_submodule(module), tensor))
        if sorted(members) == list(range(experts)) and experts > 1:
            whole[(module, tensor)] = [members[e] for e in range(experts)]
    return whole


def group_rank(side, m, n, experts, own_ranks):
    """The shared rank that spends the experts' own budget sum_e r_e (m + n) (a dense expert: m n), at most the
    basis' width; None when every expert stays dense."""
    if all(rank is None for rank in own_ranks):
        return None
    budget = sum(factor_params(m, n, rank) for rank in own_ranks)
    per_rank = (n + experts * m) if side == "in" else (m + experts * n)
    return max(1, min(budget // per_rank, n if side == "in" else m))


def _damped(gram, damp):
    gram = gram.to(torch.float64).clone()
    torch.diagonal(gram).add_(damp * max(float(torch.diagonal(gram).mean()), 0.0) + 1e-30)
    return gram


def _fix_signs(vectors):
    """Columns with their largest entry positive: eigenvectors are defined up to sign (byte-identical reruns)."""
    index = vectors.abs().argmax(0)
    signs = torch.sign(vectors[index, torch.arange(vectors.shape[1], device=vectors.device)])
    signs[signs == 0] = 1
    return vectors * signs


def fit_input_basis(weights, grams, rank, damp):
    """(B [r, n] with unit rows, [U_e [m, r]]) for W_e ~= U_e B: B from the pooled whitening, U_e by least squares
    under each expert's damped Gram (the float64 fit, see the module doc)."""
    from ..core.decompose import whitening

    pooled = whitening(sum(g.to(torch.float64) for g in grams), damp)
    stacked = 0
    for w in weights:
        whitened = pooled.times_right(w.to(torch.float64))  # W_e S
        stacked = stacked + whitened.T @ whitened
    _, vectors = torch.linalg.eigh(stacked)
    top = _fix_signs(vectors.flip(1)[:, :rank])  # top-r right singular vectors of [W_1 S; ...; W_E S]
    basis = pooled.times_right_inv(top.T)  # V_r^T S^-1: the row space those directions read
    basis = basis / basis.norm(dim=1, keepdim=True).clamp_min(1e-30)
    ups = []
    for w, gram in zip(weights, grams):
        g = _damped(gram, damp)
        lhs = basis @ g @ basis.T
        ups.append(torch.linalg.solve(lhs, basis @ g @ w.to(torch.float64).T).T)
    return basis, ups


def fit_output_basis(weights, grams, rank, damp):
    """(A [m, r] orthonormal, [C_e [r, n]]) for W_e ~= A C_e: A the top-r eigenvectors of sum_e W_e G_e W_e^T."""
    energy = 0
    for w, gram in zip(weights, grams):
        w = w.to(torch.float64)
        energy = energy + w @ _damped(gram, damp) @ w.T
    _, vectors = torch.linalg.eigh(energy)
    basis = _fix_signs(vectors.flip(1)[:, :rank])
    return basis, [basis.T @ w.to(torch.float64) for w in weights]


@torch.no_grad()
def decompose_shared(block, names, collector, config, rank_for, stored, result):
    """Factorize every whole layer of expert tensors of `names` with a shared basis, in place. Returns (results,
    the names left for the per-layer path). layers.py hands in its rank rule `rank_for(config, name, m, n)` and
    its `result` class (LayerResult), so that this module does not import it back."""
    from ..core.decompose import output_error

    results, left = [], dict(names)
    for (module_rel, tensor), members in shared_groups(block, names).items():
        module = block.get_submodule(module_rel)
        m, n, has_bias = linear_shape(getattr(module, tensor)[0])
        side = SIDES[tensor]
        rank = group_rank(side, m, n, len(members), [rank_for(config, name, m, n)[0] for name, _ in members])
        if rank is None:
            continue  # every expert dense: the per-layer path keeps them so, with its reason
        weights = [dense_weight(block.get_submodule(rel)) for _, rel in members]
        stats = [collector.stats_of(name) for name, _ in members]
        grams = [s.gram for s in stats]
        fit = fit_input_basis if side == "in" else fit_output_basis
        basis_value, owns = fit(weights, grams, rank, config.damp)
        dtype, device = weights[0].dtype, weights[0].device

        def cast(t, dtype=dtype):  # through the stored dtype first, so the fit's error is the one written
            return (t.to(stored) if stored is not None else t).to(dtype)
        basis = Projection(n, rank, device=device, dtype=dtype) if side == "in" else \
            Projection(rank, m, device=device, dtype=dtype)
        basis.weight.copy_(cast(basis_value))
        setattr(module, tensor + "_basis", basis)
        prefix = members[0][0][: -len(members[0][1])] + module_rel
        for e, ((name, rel), own, weight, gram) in enumerate(zip(members, owns, weights, grams)):
            layer = SharedBasisLinear(basis, side, n, m, bias=has_bias, device=device, dtype=dtype)
            (layer.up if side == "in" else layer.down).weight.copy_(cast(own))
            if has_bias:
                layer.bias.copy_(block.get_submodule(rel).bias.detach())
            err, ref = output_error(weight, layer.weight.as_subclass(torch.Tensor), gram)
            rel_error = (err / ref) ** 0.5 if ref > 0 else 0.0
            own_params = m * rank if side == "in" else rank * n
            shared = {"module": prefix, "tensor": tensor, "side": side, "rank": rank, "experts": len(members),
                      "basis_params": basis.weight.numel(), "basis_counted_here": e == 0}
            after = own_params + (basis.weight.numel() if e == 0 else 0)
            results.append(result(name, m, n, rank, m * n, after, 1.0 - rel_error**2, 1.0 - rel_error**2,
                                       rel_error, info={"damp": config.damp, "shared": shared}))
            replace_module(block, rel, layer)
            left.pop(name)
        for name, _ in members:
            if not any(collector.stats_of(other) is collector.stats_of(name) for other in left):
                collector.release(name)
    return results, left


def stored_shared(layers):
    """config.json's lowrank["shared"]: {experts module: {tensor: {"side", "rank"}}} from the layer results."""
    spec = {}
    for layer in layers:
        shared = layer.info.get("shared")
        if shared:
            spec.setdefault(shared["module"], {})[shared["tensor"]] = {"side": shared["side"], "rank": shared["rank"]}
    return spec
