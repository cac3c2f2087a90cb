"""Seconds per training step: SupercondTrainLoRA vs ComfyUI's TrainLoraNode vs the bare forward +
backward of the same UNet, side by side in one process (same model, latents, rank, batch, dtype).

    python bench/train_speed.py [--steps 6] [--size 256] [--rank 8]

Peak memory is the CUDA peak on a GPU and the process's peak RSS growth on a CPU (ru_maxrss).
"""

from __future__ import annotations

import argparse
import logging
import resource
import tempfile
import time

import torch
from _common import header, import_pack, setup_logging

log = logging.getLogger("supercond.bench")


def peak_reset() -> float:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return 0.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_mib(start: float) -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - start


def main() -> None:
    setup_logging()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--rank", type=int, default=8)
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

    from supercond.nodes import train_model as tm
    from supercond.nodes.train import SupercondTrainLoRA

    folder_paths.add_model_folder_path("checkpoints", str(models / "checkpoints"))
    tmp = tempfile.mkdtemp()
    folder_paths.folder_names_and_paths["loras"] = ([tmp], folder_paths.supported_pt_extensions)
    model, clip, _ = nodes.CheckpointLoaderSimple().load_checkpoint("supercond_sd15_tiny.safetensors")
    cond = nodes.CLIPTextEncode().encode(clip, "a red disc")[0]
    lat = {"samples": torch.randn(1, 4, args.size // 8, args.size // 8, generator=torch.Generator().manual_seed(0))}
    rows = []

    def timed(name, fn, steps):
        nonlocal model
        model = nodes.CheckpointLoaderSimple().load_checkpoint("supercond_sd15_tiny.safetensors")[0]  # fresh each
        fn(1)  # warm-up (allocations, first load)
        start = peak_reset()
        t = time.perf_counter()
        fn(steps)
        dt = (time.perf_counter() - t) / steps
        rows.append((name, dt, peak_mib(start)))

    def ours(steps):
        SupercondTrainLoRA.execute(model, lat, cond, steps, 1e-4, args.rank, float(args.rank), 1, 1, "auto", "none",
                                   5.0, 0.0, "uniform", 0.0, 0.0, 0, 0.0, 0, False, "constant", 0, 1.0, 0,
                                   f"bench/s{steps}_{time.time_ns()}", False)

    def comfy_node(steps):
        TrainLoraNode().train(model, lat, cond, 1, 1, steps, 1e-4, args.rank, "AdamW", "MSE", 0, "fp32", "fp32",
                              "LoRA", False, "[None]")

    def bare(steps):
        with torch.inference_mode(False), torch.enable_grad():
            mp = model.clone()
            mm.load_models_gpu([mp], force_full_load=True)
            dev = mp.load_device
            tm.materialize_weights(mp.model.diffusion_model)
            den = tm.denoiser(mp, dev)
            ctx = {"cross_attn": cond[0][0].to(dev)}
            x = lat["samples"].to(dev).requires_grad_(True)  # grad w.r.t. the input: every layer backpropagates
            s = torch.tensor([1.0], device=dev)
            for _ in range(steps):
                den(x, s, ctx).pow(2).mean().backward()
                x.grad = None

    with torch.inference_mode():  # as ComfyUI runs nodes
        for name, fn in (("ComfyUI TrainLoraNode", comfy_node), ("bare forward+backward", bare),
                         ("SupercondTrainLoRA", ours)):
            timed(name, fn, args.steps)
    base = rows[1][1]
    log.info(header(f"LoRA training speed: SD1.x fixture, {args.size} px, batch 1, rank {args.rank}, fp32, "
                 f"{args.steps} steps, device {mm.get_torch_device()}"))
    log.info(f"| {'trainer':24} | {'s/step':>8} | {'x bare':>7} | {'peak MiB':>9} |")
    log.info(f"|{'-' * 26}|{'-' * 10}|{'-' * 9}|{'-' * 11}|")
    for name, dt, mem in rows:
        log.info(f"| {name:24} | {dt:8.3f} | {dt / base:7.2f} | {mem:9.0f} |")


if __name__ == "__main__":
    main()
