"""Many processes (`torchrun --nproc-per-node N -m lowrank compress ...`), llm-compressor's multi-GPU design:

- the calibration batches are dealt out to the ranks; each runs its own through every block;
- each block's partial statistics are gathered to one owner rank per input group (groups bin-packed by the
  size of their Gram matrix), which merges them exactly (see stats.ExactSum: the same bytes as one process)
  and decomposes that group's layers;
- the owners broadcast the factors, every rank swaps them in and propagates its own batches; rank 0 writes.

The backend is NCCL on CUDA and gloo on CPU, so the same code runs on this machine's CPUs in the tests.
"""

import os

import torch
import torch.distributed as torch_dist

from ..errors import UsageError


class Distributed:
    def __init__(self, rank, world):
        self.rank, self.world = rank, world

    @property
    def main(self):
        return self.rank == 0

    def my_batches(self, count):
        """Indices of the calibration batches this rank runs."""
        return list(range(self.rank, count, self.world))

    def owners(self, groups):
        """Owner rank of each input group: biggest Gram first, to the least loaded rank (deterministic)."""
        load = [0] * self.world
        owner = {}
        for index in sorted(range(len(groups)), key=lambda i: (-groups[i].stats.gram_size, i)):
            rank = min(range(self.world), key=lambda r: (load[r], r))
            owner[index] = rank
            load[rank] += groups[index].stats.gram_size
        return owner

    def reduce_groups(self, groups):
        """Gather every group's partial statistics to its owner, which merges them. Returns {group index: owner}."""
        owner = self.owners(groups)
        for index, group in enumerate(groups):
            dst, received = owner[index], []
            for tensor in group.stats.parts():
                gathered = [torch.empty_like(tensor) for _ in range(self.world)] if self.rank == dst else None
                torch_dist.gather(tensor.contiguous(), gathered, dst=dst)
                received.append(gathered)
            if self.rank == dst:
                others = [[part[rank] for part in received] for rank in range(self.world) if rank != self.rank]
                group.stats.merge_parts(others)
        return owner

    def broadcast_layer(self, layer, src):
        # every factor and bias (a per-slice layer has one up per slice); the biases are equal already
        for tensor in layer.parameters():
            torch_dist.broadcast(tensor.data, src=src)

    def gather_objects(self, value):
        gathered = [None] * self.world if self.main else None
        torch_dist.gather_object(value, gathered, dst=0)
        return gathered

    def broadcast_object(self, value):
        box = [value]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self):
        torch_dist.barrier()


def from_environment(device):
    """The distributed context when started by torchrun (WORLD_SIZE > 1), else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    if not torch_dist.is_available():
        raise UsageError("this torch build has no torch.distributed; run a single process")
    if not torch_dist.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        torch_dist.init_process_group(backend=backend)
    if str(device).startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return Distributed(torch_dist.get_rank(), torch_dist.get_world_size())
