"""torch.distributed, detected from the environment `torchrun` sets: one code path from one CPU to many nodes.

`setup()` joins the process group when `WORLD_SIZE` > 1 (NCCL on CUDA, gloo on CPU) and otherwise returns a
single-process context, so the training loops never branch on how they were launched. Rank 0 does all file
I/O and owns the progress bar. Gradients are synchronised by DDP or FSDP2 (`fully_shard`), never by hand.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Sampler


@dataclass(frozen=True)
class Dist:
    """Where this process sits: `rank` of `world` processes, on `device`."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """True on rank 0, the process that writes files, logs and shows progress."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def setup(device: str | torch.device = "cpu") -> Dist:
    """The process group of a `torchrun` launch (joined on first call), or a single process.

    Under torchrun (WORLD_SIZE > 1) a CUDA `device` becomes `cuda:LOCAL_RANK` and the backend is NCCL;
    a CPU device uses gloo. Raises ValueError when torchrun asks for more CUDA processes than this node
    has GPUs.
    """
    device = torch.device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(0, 1, device)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local} but this node has {torch.cuda.device_count()} GPUs: "
                             f"use --nproc_per_node <= the GPU count")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), device)


def teardown() -> None:
    """Leave the process group (if any), so every rank exits cleanly.

    Cyclic garbage (DDP reducers, FSDP state and autograd graphs that hold the group) is collected first,
    while the interpreter is fully alive, so that destroying the group really frees it. Otherwise the last
    references can die during interpreter shutdown, where freeing them from gloo's C++ threads aborts the
    process ("terminate called without an active exception", exit -6) after a run that otherwise succeeded.
    No barrier: a rank that failed must not wait for ranks that are still in a collective.
    """
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def mean(values: Tensor, ctx: Dist) -> Tensor:
    """The average of `values` (any shape, float) over all ranks; the identity in one process."""
    if not ctx.active:
        return values
    values = values.detach().clone()
    dist.all_reduce(values, dist.ReduceOp.SUM)
    return values / ctx.world


def total(values: Tensor, ctx: Dist) -> Tensor:
    """The sum of `values` over all ranks, in place and returned (counts, flags)."""
    if ctx.active:
        dist.all_reduce(values, dist.ReduceOp.SUM)
    return values


def largest(value: int, ctx: Dist) -> int:
    """The largest `value` over all ranks, so that all ranks take the same branch (stop, save)."""
    if not ctx.active:
        return value
    t = torch.tensor([value], dtype=torch.long, device=ctx.device)
    dist.all_reduce(t, dist.ReduceOp.MAX)
    return int(t.item())


def barrier(ctx: Dist) -> None:
    if ctx.active:
        dist.barrier()


def broadcast(tensor: Tensor, ctx: Dist) -> None:
    """Copy rank 0's `tensor` to every rank, in place."""
    if ctx.active:
        dist.broadcast(tensor, 0)


class EpochBatchSampler(Sampler[list[int]]):
    """Endless global batches of dataset indices, this rank's share of each.

    Epoch e is a permutation of `n` seeded by (seed, e); each epoch yields n // batch_size global batches
    (the partial last one is dropped) and rank r gets the r-th contiguous `batch_size / world` slice. Every
    rank therefore sees the same number of batches whatever n is (no rank waits on another at the end of an
    epoch), the global batch does not depend on the number of processes, and starting at `start_step`
    skips exactly the batches already seen, so a resumed run reads the same data as an uninterrupted one,
    also with a different number of processes.

    Raises ValueError when n < batch_size or batch_size is not a multiple of world.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int = 0, rank: int = 0, world: int = 1):
        if n < batch_size:
            raise ValueError(f"dataset has {n} items, fewer than one batch of {batch_size}")
        if batch_size % world:
            raise ValueError(f"batch_size {batch_size} is not a multiple of the {world} processes")
        self.n, self.batch_size, self.seed, self.start_step = n, batch_size, seed, start_step
        self.rank, self.world = rank, world

    def __iter__(self) -> Iterator[list[int]]:
        per_epoch, share = self.n // self.batch_size, self.batch_size // self.world
        epoch, skip = divmod(self.start_step, per_epoch)
        while True:
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            for i in range(skip, per_epoch):
                start = i * self.batch_size + self.rank * share
                yield perm[start:start + share].tolist()
            epoch, skip = epoch + 1, 0


def from_main(obj: Any, ctx: Dist) -> Any:
    """Rank 0's `obj` (anything picklable) on every rank, so that all ranks take rank 0's decision."""
    if not ctx.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_main(obj: Any, ctx: Dist) -> list[Any] | None:
    """Rank 0 receives the list of every rank's `obj` (in rank order); other ranks get None."""
    if not ctx.active:
        return [obj]
    out = [None] * ctx.world if ctx.main else None
    dist.gather_object(obj, out, dst=0)
    return out


def parallel(model: nn.Module, ctx: Dist, shard: Sequence[nn.Module] = ()) -> nn.Module:
    """The module a training loop calls. One process: `model`. Under torchrun: a DDP replica, or with `shard`
    (the model's blocks) FSDP2 `fully_shard` on each block and then on the root, in place (parameters become
    sharded DTensors), returning `model`."""
    if not ctx.active:
        return model
    if shard:
        from torch.distributed.fsdp import fully_shard
        for block in shard:
            fully_shard(block)
        fully_shard(model)
        return model
    return DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)


def local(x: Tensor) -> Tensor:
    """A plain tensor from a result that may be a DTensor (a gradient norm under FSDP)."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x
