"""--shard-base's lockstep (nodes/train/sharding.py): two gloo processes shard a small frozen block model
(blocks that add to their input in place, as Flux's do) with the pack's shard_base and call it through
Lockstep with rows that batch into different numbers of model calls on each rank. Every all-gather needs both ranks, so a rank making fewer calls would hang (the group's
timeout turns that into a failure). The outputs and the input gradients equal the unsharded model's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from supercond.tools.paths import PACK_DIR

pytestmark = pytest.mark.comfy

WORKER = r'''
import datetime, importlib.util, json, os, sys
from pathlib import Path

repo, comfyui, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
spec = importlib.util.spec_from_file_location("supercond", repo / "__init__.py", submodule_search_locations=[str(repo)])
module = importlib.util.module_from_spec(spec)
sys.modules["supercond"] = module
spec.loader.exec_module(module)
from supercond.tools.inprocess import setup_comfy_imports

setup_comfy_imports(comfyui)
import copy
import torch
import torch.distributed as dist
from torch import nn
from supercond.nodes import family as fm
from supercond.nodes.train import sharding

dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=20))
os.environ[sharding.ENV] = "1"  # what scripts/train --shard-base sets in each rank
rank = dist.get_rank()


class Residual(nn.Module):
    """Adds to its input in place, as Flux's and Chroma's blocks do (``txt += ...``)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x):
        x += torch.tanh(self.lin(x))
        return x


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Residual() for _ in range(3)])
        self.out = nn.Linear(6, 6)

    def forward(self, x):
        for b in self.blocks:
            x = b(x * 1.0)
        return self.out(x)


class Call:
    """Rows with the same letter share a model call (as ComfyUI batches rows whose conds concatenate)."""

    def __init__(self, model):
        self.model, self.calls, self.rows = model, 0, 0

    def batches(self, x, rows, calls=None):
        groups = {}
        for i, r in enumerate(rows):
            groups.setdefault(r, []).append(i)
        return [(g, {}) for g in fm.split_to(list(groups.values()), calls or 0)]

    run = fm.ModelCall.run  # the adapter's own: each batch through apply, the rows back in order

    def apply(self, x, sigma, kw):
        self.calls += 1
        self.rows += len(x)
        return self.model(x) * sigma[:, None]


torch.manual_seed(0)
model = Toy().requires_grad_(False)
whole = copy.deepcopy(model)
held, total = sharding.shard_base(model, torch.device("cpu"), inplace_residual=True)
call = Call(model)
lockstep = sharding.Lockstep(call)
# per case: this rank's rows (rank 0, rank 1)
cases = [(["a", "b"], ["a", "a"]), (["a", "b", "c"], ["a"]), (["a"], ["b"])]
result = {"held": held, "total": total, "cases": []}
for mine in (c[rank] for c in cases):
    lift = nn.Parameter(torch.linspace(0.5, 1.5, 6))
    x = torch.randn(len(mine), 6, generator=torch.Generator().manual_seed(len(mine)))
    sigma = torch.linspace(1, 2, len(mine))
    before, rows_before = call.calls, call.rows
    y = lockstep(x * lift, sigma, mine)
    y.square().sum().backward()
    ref_lift = nn.Parameter(lift.detach().clone())
    ref = whole(x * ref_lift) * sigma[:, None]
    ref.square().sum().backward()
    result["cases"].append({"calls": call.calls - before, "rows": call.rows - rows_before,
                            "out": float((y - ref).abs().max()),
                            "grad": float((lift.grad - ref_lift.grad).abs().max())})
(out / f"rank{rank}.json").write_text(json.dumps(result))
dist.destroy_process_group()
'''


def test_ranks_whose_rows_batch_differently_make_the_same_calls_on_a_sharded_base(comfy, comfyui, tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(worker),
                        str(PACK_DIR), str(comfyui), str(tmp_path)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in (0, 1)]
    for got in ranks:
        assert got["held"] * 2 == got["total"]  # each rank keeps half of every weight
    # calls: 2 groups vs 1 of two rows (split: no row computed twice), 3 vs 1 row (two calls weighted 0), 1 vs 1
    assert [c["calls"] for c in ranks[0]["cases"]] == [c["calls"] for c in ranks[1]["cases"]] == [2, 3, 1]
    assert [c["rows"] for c in ranks[1]["cases"]] == [2, 3, 1]
    for got in ranks:
        for case in got["cases"]:
            assert case["out"] < 1e-6 and case["grad"] < 1e-5, case  # float32 summation order
