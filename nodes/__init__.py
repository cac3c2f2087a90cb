"""ComfyUI glue: V3 nodes, one sub-package per capability (its nodes and hooks side by side), the
model-family adapter and a few shared helpers, registered through comfy_entrypoint."""

from __future__ import annotations

import logging

from comfy_api.v0_0_2 import ComfyExtension, io

from . import selfcheck
from .perturb import nodes as perturb
from .schedules import fit as schedule_fit
from .schedules import nodes as schedules
from .singlepass import nodes as singlepass
from .train import dataset, head, lora

log = logging.getLogger("supercond")


class SupercondExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        found = [*perturb.NODES, *schedules.NODES, *schedule_fit.NODES, *singlepass.NODES, *dataset.NODES,
                 *lora.NODES, *head.NODES]
        selfcheck.check(found)  # a node this ComfyUI cannot run is kept, and says why when queued
        return found


async def comfy_entrypoint() -> SupercondExtension:
    return SupercondExtension()
