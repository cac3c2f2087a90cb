"""``scripts/train --shard-base``: the frozen diffusion model split across the ranks with FSDP2 (torch's
``fully_shard``), for a base that does not fit one GPU. Each block of the model (model.blocks: the UNet's
ResBlocks and attention layers, a DiT's blocks) and the rest of it (the root) become FSDP units: a rank
keeps 1/N of each unit's weights and all-gathers a unit's whole weights only while that unit runs
(forward, and again in backward for the input gradients), then frees them. The LoRA stays whole on
every rank and its gradients are averaged by DistributedDataParallel as without sharding.

All-gathers are collective: every rank must run the same model calls in the same order. So with a
sharded base every rank makes as many calls per micro-batch as the rank that needs most (``Lockstep``),
and the validation loss and sample previews run on every rank (rank 0 writes).

Only in a rank process (``SUPERCOND_SHARD_BASE``, set by scripts/train): the model is left sharded when
the rank exits, so a model in the server is never sharded."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from . import distributed
from . import model as tm

log = logging.getLogger("supercond")
ENV = "SUPERCOND_SHARD_BASE"  # tools/train_cli.py sets it in each rank for --shard-base


def requested() -> bool:
    """Whether this process shards the base (a rank of a run started with --shard-base, 2 or more ranks)."""
    return os.environ.get(ENV) == "1" and distributed.shard()[1] > 1


def shard_base(root: nn.Module, device: torch.device) -> tuple[int, int]:
    """Shard ``root`` (its blocks, then the rest) over every rank; returns (bytes this rank holds, bytes
    of the whole model). The weights must stay frozen: only the LoRA is trained."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    total = sum(p.numel() * p.element_size() for p in root.parameters())
    # A group of its own: the all-gathers never queue behind DDP's gradient all-reduce on the default one.
    mesh = DeviceMesh.from_group(dist.new_group(), device.type)
    blocks = tm.blocks(root)
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(root, mesh=mesh)
    held = sum(p.to_local().numel() * p.element_size() for p in root.parameters())
    log.info("supercond: base sharded over %d processes in %d blocks and the rest: this rank holds %.2f of "
             "its %.2f MiB of weights", mesh.size(), len(blocks), held / 2**20, total / 2**20)
    return held, total


class Lockstep:
    """A model call (fm.ModelCall) making the same number of calls on every rank: the rank whose rows
    batch into fewer calls splits its batches, and, with fewer rows than calls, repeats its first call
    with its output weighted 0 (so that call's backward all-gathers too)."""

    def __init__(self, call: Any) -> None:
        self.call = call

    def __call__(self, x_in: torch.Tensor, sigma: torch.Tensor, rows: list) -> torch.Tensor:
        import torch.distributed as dist

        from .. import family as fm

        batches = self.call.batches(x_in, rows)
        most = torch.tensor([len(batches)], device=x_in.device)  # nccl: on the GPU
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        calls = int(most)
        if len(batches) < calls:
            batches = self.call.batches(x_in, rows, calls=calls)
        outs = [self.call.apply(x_in[g], sigma[g], kw) for g, kw in batches]
        for _ in range(calls - len(batches)):
            g, kw = batches[0]
            outs[0] = outs[0] + 0 * self.call.apply(x_in[g], sigma[g], kw)
        return fm.restore_order(torch.cat(outs), [g for g, _ in batches])
