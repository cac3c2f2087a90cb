"""Does ``scripts/train --shard-base`` work on each family? For every fixture family, two gloo processes
load the model with ComfyUI's loaders, attach a LoRA on all of the trainer's layers (up matrices random, so
it contributes), run one training call (the adapter's model call, forward and backward) on the whole model,
then shard the model with nodes/train/sharding.shard_base and run the same call through ``Lockstep``. The
table gives the weights a rank holds, how far the sharded output and the LoRA gradients are from the
unsharded ones, and the call's time both ways.

    python bench/shard_families.py [--families sd15,sd3,sdxl,flux,chroma,qwen_image,wan21]

A family fails here when its code reaches a block's weights outside that block's forward (PyTorch's
"mixed torch.Tensor and DTensor"); CI shards only the SD1.x fixture (tests/test_train_distributed.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, header, import_pack

log = logging.getLogger("supercond.bench")
FAMILIES = ("sd15", "sd3", "sdxl", "flux", "chroma", "qwen_image", "wan21")
SIZE = 64


def latent(name: str, channels: int):
    import torch

    s = SIZE // 8
    shape = {"wan21": (1, 16, 2, s, s), "qwen_image": (1, 16, 1, s, s)}.get(name, (1, channels, s, s))
    return torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.5


def rank_main(name: str, out: Path) -> None:
    """One of the two processes: the family's call unsharded, then sharded; rank 0 writes the figures."""
    import_pack()
    from supercond.tools.inprocess import ensure_fixtures, setup_comfy_imports
    from supercond.tools.paths import find_comfyui

    comfyui = find_comfyui()
    setup_comfy_imports(comfyui)
    import torch
    import torch.distributed as dist

    from supercond.core.lora import LoRANetwork
    from supercond.nodes import family as fm
    from supercond.nodes.train import model as tm
    from supercond.nodes.train import sharding
    from supercond.nodes.train.lora_run import conds_from
    from supercond.tools.fixture_models.check import encode, load
    from supercond.tools.fixture_models.registry import FAMILIES as SPECS

    dist.init_process_group("gloo")
    os.environ[sharding.ENV] = "1"  # what scripts/train --shard-base sets in each rank
    model, clip, _ = load(name, ensure_fixtures(comfyui))
    rows = conds_from(encode(clip, "a red cube on a table"))[0][:1]
    mp = model.clone()
    with torch.inference_mode(False), torch.enable_grad(), tm.autograd_weights(mp.model.diffusion_model):
        mp.patch_model(device_to=mp.offload_device)
        dm = mp.model.diffusion_model
        net = LoRANetwork(fm.lora_layers(mp, "bench", "all"), 4, 4.0, torch.Generator().manual_seed(1))
        with torch.no_grad():
            for _, mod in net.named_loras():
                mod.up.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
        x = fm.latent_in(mp, latent(name, SPECS[name].latent_channels))
        sigmas = mp.get_model_object("model_sampling").sigmas
        sigma = sigmas[len(sigmas) // 2].reshape(1)
        call = fm.ModelCall(mp, torch.device("cpu"))

        def step(run) -> tuple[torch.Tensor, list[torch.Tensor], float]:
            net.zero_grad(set_to_none=True)
            t = time.perf_counter()
            with net.attached(), tm.trainable(mp):
                y = run(x, sigma, rows)
                y.float().square().mean().backward()
            grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in net.parameters()]
            return y.detach(), grads, time.perf_counter() - t

        step(call)  # warm-up: the first call of a process allocates and tunes
        whole, grads, t_whole = step(call)
        found = {"family": name, "ok": False}
        try:
            held, total = sharding.shard_base(dm, torch.device("cpu"), fm.family_of(mp, "bench").inplace_residual)
            step(sharding.Lockstep(call))  # FSDP sets itself up on its first call
            sharded, sgrads, t_sharded = step(sharding.Lockstep(call))
            found.update(ok=True, held=held, total=total, blocks=len(tm.blocks(dm)), t_whole=t_whole,
                         t_sharded=t_sharded, out=float((sharded - whole).abs().max() / whole.abs().max()),
                         grad=max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
                                  for a, b in zip(sgrads, grads, strict=True)))
        except Exception as e:  # the figure to report: what PyTorch or the model said
            found["error"] = f"{type(e).__name__}: {str(e)[:160]}"
    if dist.get_rank() == 0:
        out.write_text(json.dumps(found))
    dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--families", default=",".join(FAMILIES))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = ["| family | blocks | MiB held by a rank / whole | output, max rel. difference | LoRA gradients, max rel. "
            "difference | call s, whole / sharded |", "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="supercond_shard_") as tmp:
        for name in args.families.split(","):
            out = Path(tmp) / f"{name}.json"
            r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", __file__,
                                "--rank", name, str(out)], capture_output=True, text=True, timeout=1800,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
            if not out.exists():
                rows.append(f"| {name} | failed: exit code {r.returncode} | | | | |")
                log.info("%s failed:\n%s", name, r.stderr[-2000:])
                continue
            f = json.loads(out.read_text())
            if not f["ok"]:
                rows.append(f"| {name} | failed: {f['error']} | | | | |")
            else:
                rows.append(f"| {name} | {f['blocks']} | {f['held'] / 2**20:.1f} / {f['total'] / 2**20:.1f} | "
                            f"{f['out']:.1e} | {f['grad']:.1e} | {f['t_whole']:.2f} / {f['t_sharded']:.2f} |")
            log.info("%s", rows[-1])
    text = "\n".join([header("--shard-base on every family: one training call, 2 gloo processes"), "",
                      f"Fixture families at {SIZE} px, a rank-4 LoRA on all of the trainer's layers, one prompt; "
                      "each way (whole, then sharded) the second call is timed.", "", *rows]) + "\n"
    sys.stdout.write(text)
    results = REPO / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "shard_families.md").write_text(text)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--rank"]:
        rank_main(sys.argv[2], Path(sys.argv[3]))
    else:
        sys.exit(main())
