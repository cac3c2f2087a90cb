"""``scripts/train --shard-base``: the frozen diffusion model split across the ranks with FSDP2 (torch's
``fully_shard``), for a base that does not fit one GPU. Each block of the model (model.blocks: the UNet's
ResBlocks and attention layers, a DiT's blocks) and the rest of it (the root) become FSDP units: a rank
keeps 1/N of each unit's weights and all-gathers a unit's whole weights only while that unit runs
(forward, and again in backward for the input gradients), then frees them. What is trained (the
LoRA, a head's copied layers) stays whole on every rank and its gradients are averaged as without
sharding.

All-gathers are collective: every rank must run the same model calls in the same order. So with a
sharded base every rank makes as many calls per micro-batch as the rank that needs most
(``agreed_batches``), and the validation loss and sample previews run on every rank (rank 0 writes).

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


def load(mp: Any) -> None:
    """A MODEL (ModelPatcher) made ready to train: loaded whole on its device, or, when the base is to be
    sharded, patched in the CPU's memory (shard_base then moves only this rank's share to the device)."""
    import comfy.model_management as mm

    if requested():
        mp.patch_model(device_to=mp.offload_device)
    else:
        mm.load_models_gpu([mp], force_full_load=True)


def shard_base(root: nn.Module, device: torch.device, inplace_residual: bool = False) -> tuple[int, int]:
    """Shard ``root`` (its blocks, then the rest) over every rank; returns (bytes this rank holds, bytes
    of the whole model). Its weights must stay frozen: what is trained lives outside it (a LoRA's
    matrices, a head's copy of the last layers). ``inplace_residual`` (Flux, Chroma: a block adds to
    its input in place): each block gets copies of its inputs, since FSDP hands a block views that
    autograd forbids changing in place."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    total = sum(p.numel() * p.element_size() for p in root.parameters())
    # A group of its own: the all-gathers never queue behind DDP's gradient all-reduce on the default one.
    mesh = DeviceMesh.from_group(dist.new_group(), device.type)
    blocks = tm.blocks(root)
    for block in blocks:
        fully_shard(block, mesh=mesh)
        if inplace_residual:  # after FSDP's own pre-forward hook (it prepends), so its views are copied
            block.register_forward_pre_hook(_copied_inputs, with_kwargs=True)
    fully_shard(root, mesh=mesh)
    held = sum(p.to_local().numel() * p.element_size() for p in root.parameters())
    log.info("supercond: base sharded over %d processes in %d blocks and the rest: this rank holds %.2f of "
             "its %.2f MiB of weights", mesh.size(), len(blocks), held / 2**20, total / 2**20)
    return held, total


def _copied_inputs(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    copy = lambda v: v.clone() if isinstance(v, torch.Tensor) and v.is_floating_point() else v  # noqa: E731
    return tuple(copy(a) for a in args), {k: copy(v) for k, v in kwargs.items()}


def agreed_batches(call: Any, x_in: torch.Tensor, rows: list) -> tuple[list, int]:
    """``call.batches(x_in, rows)`` (fm.ModelCall); with a sharded base, as many calls as the rank that
    needs most: the batches (split if this rank's rows batch into fewer calls) and how many calls are
    still missing (fewer rows than calls), for ``with_idle_calls``. Without one: the batches and 0."""
    batches = call.batches(x_in, rows)
    if not requested():
        return batches, 0
    import torch.distributed as dist

    most = torch.tensor([len(batches)], device=x_in.device)  # nccl: on the GPU
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    calls = int(most)
    if len(batches) < calls:
        batches = call.batches(x_in, rows, calls=calls)
    return batches, calls - len(batches)


def with_idle_calls(out: torch.Tensor, call: Any, x_in: torch.Tensor, sigma: torch.Tensor, batches: list,
                    missing: int) -> torch.Tensor:
    """``out`` plus 0 times ``missing`` more calls of the first batch: their forward and backward
    all-gather with the other ranks' calls and change nothing."""
    g, kwargs = batches[0]
    for _ in range(missing):
        out = out + 0 * call.apply(x_in[g], sigma[g], kwargs).sum()
    return out


class Lockstep:
    """A model call (fm.ModelCall) making the same number of calls on every rank (``agreed_batches``)."""

    def __init__(self, call: Any) -> None:
        self.call = call

    def __call__(self, x_in: torch.Tensor, sigma: torch.Tensor, rows: list) -> torch.Tensor:
        batches, missing = agreed_batches(self.call, x_in, rows)
        return with_idle_calls(self.call.run(x_in, sigma, batches), self.call, x_in, sigma, batches, missing)
