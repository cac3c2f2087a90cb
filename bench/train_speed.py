"""Seconds per training step: SupercondTrainLoRA vs ComfyUI's TrainLoraNode vs the bare forward +
backward of the same UNet, side by side in one process (same model, latents, rank, batch, dtype).
A fourth row, the bare forward + backward with the LoRA attached and no trainer around it, splits
the gap into the LoRA's own compute and the trainer's overhead.

    python bench/train_speed.py [--steps 4] [--repeats 3] [--size 256] [--rank 8] [--profile]

Each trainer's fixed costs (weight copies, LoRA set-up, file writes, the loss plot) would blur a
short run, so a step's cost is the difference of a 2n-step and an n-step run, divided by n; the
runs are interleaved across trainers and repeated, and the median is reported. Peak memory is the
CUDA peak on a GPU, else the process's peak RSS above its level before the 2n-step run (sampled),
the model already loaded: weight copies, LoRA, activations, gradients and optimizer state.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from _common import PeakRSS, header, import_pack, setup_logging

log = logging.getLogger("supercond.bench")
CKPT = "supercond_sd15_tiny.safetensors"


def measure(fn: Callable[[Any, int], None], model: Any, steps: int) -> tuple[float, float]:
    """(seconds for `steps` steps, peak MiB above the start) of one run on an already loaded model."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t = time.perf_counter()
        fn(model, steps)
        torch.cuda.synchronize()
        return time.perf_counter() - t, (torch.cuda.max_memory_allocated() - base) / 2**20
    with PeakRSS() as peak:
        t = time.perf_counter()
        fn(model, steps)
        dt = time.perf_counter() - t
    return dt, peak.peak_mb


def main() -> None:
    setup_logging()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4, help="n: runs of n and 2n steps are differenced")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--profile", action="store_true", help="also print torch.profiler's top ops of ours")
    args = ap.parse_args()
    import_pack()
    from supercond.tools import paths
    from supercond.tools.inprocess import ensure_fixtures, setup_comfy_imports

    comfyui = paths.find_comfyui()
    setup_comfy_imports(comfyui)
    models = ensure_fixtures(comfyui)
    import comfy.model_management as mm
    import folder_paths
    import nodes
    from comfy_extras.nodes_train import TrainLoraNode

    from supercond.core.lora import LoRANetwork
    from supercond.nodes import family as fm
    from supercond.nodes.train import model as tm
    from supercond.nodes.train.lora import SupercondTrainLoRA

    folder_paths.add_model_folder_path("checkpoints", str(models / "checkpoints"))
    folder_paths.folder_names_and_paths["loras"] = ([tempfile.mkdtemp()], folder_paths.supported_pt_extensions)
    _, clip, _ = nodes.CheckpointLoaderSimple().load_checkpoint(CKPT)
    cond = nodes.CLIPTextEncode().encode(clip, "a red disc")[0]
    lat = {"samples": torch.randn(1, 4, args.size // 8, args.size // 8, generator=torch.Generator().manual_seed(0))}

    def fresh():  # every run trains a freshly loaded model, so no run sees another's patches
        return nodes.CheckpointLoaderSimple().load_checkpoint(CKPT)[0]

    def ours(model, steps: int) -> None:
        SupercondTrainLoRA.execute(model, lat, cond, steps, 1e-4, args.rank, float(args.rank), 1, 1, "auto",
                                   "none", 5.0, 0.0, "uniform", 0.0, 0.0, 0, 0.0, 0, False, "constant", 0, 1.0,
                                   0, f"bench/s{steps}_{time.time_ns()}", False)

    def comfy_node(model, steps: int) -> None:
        TrainLoraNode().train(model, lat, cond, 1, 1, steps, 1e-4, args.rank, "AdamW", "MSE", 0, "fp32", "fp32",
                              "LoRA", False, "[None]")

    def bare_run(model, steps: int, with_lora: bool) -> None:
        with torch.inference_mode(False), torch.enable_grad():
            mp = model.clone()
            mm.load_models_gpu([mp], force_full_load=True)
            dev = mp.load_device
            tm.materialize_weights(mp.model.diffusion_model)
            den = fm.ModelCall(mp, dev)
            ctx = [{"cross_attn": cond[0][0].to(dev)}]
            x = lat["samples"].to(dev, copy=True)
            s = torch.tensor([1.0], device=dev)
            net = LoRANetwork(fm.lora_layers(mp, "bench"), args.rank, float(args.rank), torch.Generator().manual_seed(0), dev)
            with net.attached() if with_lora else nullcontext():
                if not with_lora:
                    x.requires_grad_(True)  # input grad: every layer backpropagates
                for _ in range(steps):
                    den(x, s, ctx).pow(2).mean().backward()
                    x.grad = None
                    net.zero_grad(set_to_none=True)

    def bare(model, steps: int) -> None:
        bare_run(model, steps, with_lora=False)

    def bare_lora(model, steps: int) -> None:  # the LoRA's own cost, without any trainer around it
        bare_run(model, steps, with_lora=True)

    trainers = {"ComfyUI TrainLoraNode": comfy_node, "bare forward+backward": bare,
                "bare + LoRA fwd+bwd": bare_lora, "SupercondTrainLoRA": ours}
    per_step: dict[str, list[float]] = {k: [] for k in trainers}
    peak: dict[str, float] = dict.fromkeys(trainers, 0.0)
    n = args.steps
    with torch.inference_mode():  # as ComfyUI runs nodes
        for fn in trainers.values():
            fn(fresh(), 1)  # warm-up: first loads, allocator, thread pools
        for rep in range(args.repeats):
            for name, fn in trainers.items():
                t1, _ = measure(fn, fresh(), n)
                t2, mem = measure(fn, fresh(), 2 * n)
                per_step[name].append((t2 - t1) / n)
                peak[name] = max(peak[name], mem)
                log.info("repeat %d %-22s n=%d: %.2f s, 2n: %.2f s -> %.3f s/step", rep, name, n, t1, t2,
                         per_step[name][-1])
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                ours(fresh(), 2 * n)
            log.info(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))

    med = {k: statistics.median(v) for k, v in per_step.items()}
    base = med["bare forward+backward"]
    mem_kind = "CUDA peak" if torch.cuda.is_available() else "peak RSS growth"
    log.info(header(f"LoRA training speed: SD1.x fixture, {args.size} px, batch 1, rank {args.rank}, fp32, "
                    f"device {mm.get_torch_device()}; s/step = (t(2n) - t(n)) / n, n = {n}, median of "
                    f"{args.repeats}"))
    log.info(f"| {'trainer':24} | {'s/step':>8} | {'range':>13} | {'x bare':>7} | {'x TrainLoraNode':>15} | "
             f"{mem_kind + ' MiB':>20} |")
    log.info(f"|{'-' * 26}|{'-' * 10}|{'-' * 15}|{'-' * 9}|{'-' * 17}|{'-' * 22}|")
    for name in trainers:
        lo, hi = min(per_step[name]), max(per_step[name])
        log.info(f"| {name:24} | {med[name]:8.3f} | {lo:5.3f}-{hi:5.3f}   | {med[name] / base:7.2f} | "
                 f"{med[name] / med['ComfyUI TrainLoraNode']:15.2f} | {peak[name]:20.0f} |")


if __name__ == "__main__":
    main()
