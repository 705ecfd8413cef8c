"""vLLM modules for factorized projections, with their tensor-parallel split (imported only inside vLLM).

A factorized projection W (out x in) is stored as up (out x r) @ down (r x in). How each factor is split over TP
ranks follows from where the layer's input and output live in vLLM's Megatron-style layout:

- Column-parallel layers (q/k/v, gate/up): the input x is replicated on every rank, each rank owns a slice of
  the output rows. So `down` is REPLICATED (every rank computes the full r-vector z = down x, r*in flops, small)
  and `up` is split by OUTPUT rows like the dense weight was (rank t computes y_t = up_t z). k and v follow
  QKVParallelLinear's head split: with fewer KV heads than ranks, a head's rows are replicated on
  tp / num_kv_heads ranks, i.e. the up factor of k/v is sharded over num_kv_heads groups, not over tp.
- Row-parallel layers (o_proj, down_proj): the input arrives split along its features (x_t on rank t), and the
  output must be the full vector on every rank. So `down` is split by INPUT columns (rank t computes the partial
  z_t = down[:, cols_t] x_t) and all-reduced: z = sum_t z_t, an all-reduce of r numbers per token instead of the
  dense layer's `out`; `up` is then REPLICATED (y = up z + b on every rank, the bias added once per rank, as
  vLLM's RowParallelLinear adds it after its reduce).

tests/serving runs TP = 1 and TP = 2 (two CPU processes; a Llama with one KV head per rank and a Qwen2 whose single
KV head is replicated on both): the same tokens as transformers, log-probabilities within 1e-4.

Layers that read the same input (q/k/v, gate/up) run as ONE GEMM over x (the members' downs, replicated, and the
dense members' local rows, stacked), then one GEMM per up: one read of x, fewer kernel launches.
"""

from dataclasses import dataclass

import torch
from torch import nn
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear


@dataclass(frozen=True)
class Member:
    """One projection of a fused column-parallel group: its checkpoint name (q_proj), output size, rank (None:
    dense), bias, and for k/v the number of shards of its rows (num_kv_heads when that is fewer than tp)."""

    name: str
    out_size: int
    rank: int | None
    bias: bool
    shards: int | None = None


def _shard(shards):
    """(tp_rank, tp_size) to split rows into `shards` groups, each replicated on tp / shards ranks."""
    tp_size, tp_rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
    if shards is None or shards >= tp_size:
        return None, None
    return tp_rank // (tp_size // shards), shards


def _local(shards):
    """(tp_rank, tp_size) by which a dense member's rows are split on this rank (k/v: see _shard)."""
    tp_rank, tp_size = _shard(shards)
    if tp_size is None:
        return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    return tp_rank, tp_size


def _load(param, tensor):
    param.weight_loader(param, tensor)


def _product(layer, x):
    """layer(x)'s output for one of the plugin's linear layers (replicated, column-parallel without gather,
    row-parallel). On CPU vLLM keeps the kernel it chose for the weight at load in `cpu_linear`; calling it skips
    the module call, forward and quant-method layers, which a factorized model pays on every extra call (keep 0.8:
    205 oneDNN calls a decode step against dense's 121) when vLLM runs eagerly (bench/vllm_call_cost.py).
    Elsewhere, and for a row-parallel layer at TP > 1 (its forward all-reduces): the module call."""
    linear = getattr(layer, "cpu_linear", None)
    if linear is None or (isinstance(layer, RowParallelLinear) and layer.tp_size > 1):
        return layer(x)[0]
    return linear(x, layer.weight, layer.bias)


class FactorizedColumnGroup(nn.Module):
    """Stands in for a fused column-parallel projection (qkv_proj, gate_up_proj) when at least one member is
    factorized: returns (the members' local output shards concatenated, in member order, None), as the fused
    layer did, so vLLM's attention and MLP code runs unchanged.

    One GEMM reads x for the whole group: its rows are each factorized member's down (replicated on every rank)
    and each dense member's local shard of rows, in member order. A dense member's output is then its slice of
    that product; a factorized member's slice is its code, which its up (column-parallel) maps to the output.
    Dense members kept as their own layers cost a call each: at keep 0.5 SmolLM2 keeps k and v dense in 24 of 30
    layers, and a batch-1 oneDNN call costs 15-20 us before it reads a byte (bench/vllm_gemm_floor.py's small
    shapes), so stacking them takes a decode step from 315 calls to 266 (keep 0.8: 267 to 205; BENCHMARKS.md
    "vLLM: one GEMM per group")."""

    def __init__(self, input_size, members, prefix=""):
        super().__init__()
        self.names = [member.name for member in members]
        self.spans = {}  # member -> (first row in the stacked GEMM, rows, (tp_rank, tp_size) of a dense member)
        start = 0
        for member in members:
            split = None if member.rank else _local(member.shards)
            rows = member.rank or member.out_size // split[1]
            self.spans[member.name] = (start, rows, split)
            start += rows
        self.sizes = [self.spans[name][1] for name in self.names]
        dense_bias = any(member.bias and not member.rank for member in members)
        self.down = ReplicatedLinear(input_size, start, bias=dense_bias, prefix=f"{prefix}.down")
        if dense_bias:
            self.down.bias.data.zero_()  # the code rows have no bias: a factorized member's is on its up
        self.ups = nn.ModuleDict()
        for member in members:
            if member.rank:
                tp_rank, tp_size = _shard(member.shards)
                self.ups[member.name] = ColumnParallelLinear(
                    member.rank, member.out_size, bias=member.bias, gather_output=False,
                    prefix=f"{prefix}.{member.name}", tp_rank=tp_rank, tp_size=tp_size)

    def forward(self, x):
        # A part is a column slice (rows strided, last dim contiguous): oneDNN and vLLM's other CPU kernels read it
        # in place, as fast as a copy would be read, without the copy (bench/vllm_call_cost.py).
        parts = _product(self.down, x).split(self.sizes, dim=-1)
        outputs = [_product(self.ups[name], part) if name in self.ups else part
                   for name, part in zip(self.names, parts)]
        return torch.cat(outputs, dim=-1), None

    def load(self, member, kind, tensor):
        """Load one checkpoint tensor of `member` ("down.weight", "up.weight", "up.bias" when factorized;
        "weight", "bias" when dense); returns the parameter name it filled, relative to this module."""
        factorized = member in self.ups
        start, rows, split = self.spans[member]
        if kind == ("down.weight" if factorized else "weight"):
            width = self.down.input_size
            full = rows if factorized else rows * split[1]
            if tuple(tensor.shape) != (full, width):
                raise ValueError(f"{member}.{kind} has shape {tuple(tensor.shape)}, the config gives {(full, width)}")
            local = tensor if factorized else tensor.narrow(0, split[0] * rows, rows)
            self.down.weight.data[start: start + rows].copy_(local)
            return "down.weight"
        if kind == "bias" and not factorized and self.down.bias is not None:
            self.down.bias.data[start: start + rows].copy_(tensor.narrow(0, split[0] * rows, rows))
            return "down.bias"
        if factorized and kind in ("up.weight", "up.bias"):
            attr = kind.rpartition(".")[2]
            _load(getattr(self.ups[member], attr), tensor)
            return f"ups.{member}.{attr}"
        raise ValueError(f"unexpected tensor {member}.{kind}: config.json says this projection is "
                         f"{'factorized' if factorized else 'dense'}")


class FactorizedRow(nn.Module):
    """Stands in for a row-parallel projection (o_proj, down_proj) stored as factors: down split by input
    columns and all-reduced, up replicated (see the module docstring). Returns (y, None) like RowParallelLinear."""

    def __init__(self, input_size, output_size, rank, bias, prefix=""):
        super().__init__()
        self.down = RowParallelLinear(input_size, rank, bias=False, input_is_parallel=True, reduce_results=True,
                                      prefix=f"{prefix}.down")
        self.up = ReplicatedLinear(rank, output_size, bias=bias, prefix=f"{prefix}.up")

    def forward(self, x):
        return _product(self.up, _product(self.down, x)), None

    def load(self, member, kind, tensor):
        if kind not in ("down.weight", "up.weight", "up.bias"):
            raise ValueError(f"unexpected tensor {member}.{kind}: config.json says this projection is factorized")
        factor, attr = kind.split(".")
        _load(getattr(getattr(self, factor), attr), tensor)
        return kind
