"""Data-parallel training, when a trainer runs in one of several processes that torchrun started
(``scripts/train``): which rank this process is, the model call wrapped in DistributedDataParallel so the
trained parameters' gradients are averaged across ranks, and the step's loss averaged for the log.
Rank 0 alone writes files. With one process (in the server) every function here is a no-op."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch


def shard() -> tuple[int, int]:
    """(rank, number of processes); (0, 1) outside torch.distributed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def writes() -> bool:
    """Whether this process writes the run's files (rank 0)."""
    return shard()[0] == 0


def inputs_ready() -> None:
    """Rank 0, about to train, has run the nodes before the trainer (the dataset's encoding, written to its
    cache): the other ranks, waiting for this (scripts/train), now run them and read the cache."""
    rank, world = shard()
    if world > 1 and rank == 0:
        import torch.distributed as dist

        dist.barrier()


class _ModelCall(torch.nn.Module):
    """The trained LoRA networks as one module for DistributedDataParallel, called as the trainer's
    ``denoise``: DDP averages the gradients of exactly these parameters (the frozen base is not in it)."""

    def __init__(self, call: Callable, trained: list[torch.nn.Module]) -> None:
        super().__init__()
        self.call = call
        self.trained = torch.nn.ModuleList(trained)

    def forward(self, x_in: torch.Tensor, sigma: torch.Tensor, rows: list) -> torch.Tensor:
        return self.call(x_in, sigma, rows)


def parallel(call: Callable, *trained: torch.nn.Module | None) -> Callable:
    """``call`` with gradient averaging across ranks (DDP) when there are several, else ``call`` itself.
    DDP broadcasts rank 0's starting weights, so every rank starts alike even from a resumed state."""
    if shard()[1] == 1:
        return call
    from torch.nn.parallel import DistributedDataParallel

    module = _ModelCall(call, [m for m in trained if m is not None])
    with warnings.catch_warnings():  # torch 2.14 renames broadcast_buffers; the old name still means this
        warnings.simplefilter("ignore", FutureWarning)
        # No buffers to broadcast, so a forward on rank 0 alone (the validation loss) needs no other rank.
        return DistributedDataParallel(module, broadcast_buffers=False)


def mean_across() -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The average of a tensor over the ranks (the step's loss), or None with one process."""
    found = across()
    return found.mean if found is not None else None


class _Across:
    """torch.distributed's collectives as the head trainer's ``Across`` (core/head_train.py). Its step
    makes two model calls (features, then the head), so the gradients are averaged after backward with
    one all_reduce of them all (what DistributedDataParallel's reducer does, without its overlap)."""

    def __init__(self, world: int) -> None:
        self.world = world

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        value = value.detach().clone()
        dist.all_reduce(value)
        return value / self.world

    def average_grads(self, params: list[torch.nn.Parameter]) -> None:
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        at = 0
        for p, g in zip(params, grads, strict=True):
            p.grad = flat[at:at + g.numel()].view_as(g).to(p.dtype)
            at += g.numel()

    def gather(self, part: torch.Tensor, total: int) -> torch.Tensor:
        import torch.distributed as dist

        sizes = [len(chunk) for chunk in torch.tensor_split(torch.arange(total), self.world)]
        padded = part.new_zeros((max(sizes), *part.shape[1:]))  # all_gather needs one size on every rank
        padded[:len(part)] = part
        out = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(out, padded)
        return torch.cat([o[:n] for o, n in zip(out, sizes, strict=True)])


def across() -> _Across | None:
    """The head trainer's exchanges between processes, or None with one process."""
    world = shard()[1]
    return _Across(world) if world > 1 else None
