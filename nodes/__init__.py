"""ComfyUI glue: V3 nodes, one module per capability, registered through comfy_entrypoint."""

from __future__ import annotations

import logging

from comfy_api.v0_0_2 import ComfyExtension, io

from . import dataset, perturb, schedules, singlepass, train, train_head

log = logging.getLogger("supercond")


class SupercondExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*perturb.NODES, *schedules.NODES, *singlepass.NODES, *dataset.NODES, *train.NODES,
                *train_head.NODES]


async def comfy_entrypoint() -> SupercondExtension:
    return SupercondExtension()
