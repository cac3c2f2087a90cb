"""Conditioning perturbation on the SD1.x fixture: sampling overhead and diversity.

    python bench/perturb_sampling.py [--size 256] [--steps 10] [--repeats 5] [--seeds 16]

1. Overhead: seconds per sampling run with each node vs without, interleaved in one process
   (A B C D A B C D ...) so machine noise hits every variant alike; median and ratio to none.
   Target: <= 2 % overhead.
2. Diversity: mean pairwise L2 distance between the final latents of N seeds of one prompt,
   with and without CADS and CEP. The fixture has random weights, so this measures how much the
   perturbation spreads the sampler's output, not image quality.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch
from _common import header, import_pack, save_figure, setup_logging

log = logging.getLogger("supercond.bench.perturb")


def load_sd15():
    import_pack()
    from supercond.tools import paths
    from supercond.tools.inprocess import ensure_fixtures, setup_comfy_imports

    comfyui = paths.find_comfyui()
    if comfyui is None:
        raise SystemExit("ComfyUI not found: set COMFYUI_PATH")
    models = ensure_fixtures(comfyui)
    setup_comfy_imports(comfyui)
    import folder_paths
    import nodes

    folder_paths.add_model_folder_path("checkpoints", str(models / "checkpoints"))
    model, clip, _ = nodes.CheckpointLoaderSimple().load_checkpoint("supercond_sd15_tiny.safetensors")
    pos = nodes.CLIPTextEncode().encode(clip, "a lighthouse on a cliff at sunset")[0]
    neg = nodes.CLIPTextEncode().encode(clip, "")[0]
    return model, pos, neg


def variants(model, pos):
    from supercond.nodes.perturb.nodes import SupercondCADS, SupercondCEP, SupercondPerturbConditioning

    cep = SupercondCEP.execute(model, 1.0, "uniform", "paper", "tokens", "positive", "every_step", 0).result[0]
    cads = SupercondCADS.execute(model, 0.6, 0.9, 0.25, 1.0, "tokens", "positive", "sigma", 0).result[0]
    static = SupercondPerturbConditioning.execute(pos, 1.0, "uniform", "paper", "tokens", 0).result[0]
    return {"none": (model, pos), "PerturbConditioning": (model, static), "CEP": (cep, pos), "CADS": (cads, pos)}


def run(model, pos, neg, seed: int, steps: int, size: int) -> torch.Tensor:
    import nodes

    latent = {"samples": torch.zeros(1, 4, size // 8, size // 8)}
    return nodes.common_ksampler(model, seed, steps, 7.0, "euler", "normal", pos, neg, latent)[0]["samples"]


def overhead(vs: dict, neg, steps: int, size: int, repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in vs}
    for m, p in vs.values():  # warm-up: model load, allocator
        run(m, p, neg, 0, 2, size)
    for r in range(repeats):
        for name, (m, p) in vs.items():
            t0 = time.perf_counter()
            run(m, p, neg, r, steps, size)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def hook_cost(model, pos, rows: int = 2, calls: int = 200) -> dict[str, float]:
    """Seconds the CEP / CADS wrapper adds per model call, timed alone on real conds: the
    overhead without the machine noise of whole sampling runs."""
    import comfy.conds

    from supercond.nodes.perturb import hook

    entry = {"model_conds": {"c_crossattn": comfy.conds.CONDCrossAttn(pos[0][0])},
             "pooled_output": pos[0][1].get("pooled_output")}
    configs = {"CEP": hook.CEPConfig(1.0, "uniform", "paper", "tokens", "positive", "every_step"),
               "CADS": hook.CADSConfig(0.6, 0.9, 0.25, 1.0, "tokens", "positive", "sigma")}
    ms = model.get_model_object("model_sampling")
    out = {}
    for name, cfg in configs.items():
        h = hook.PerturbHook(cfg)
        state = hook.RunState(seed=0, sample_sigmas=torch.tensor([14.6, 7.0, 0.0]), model_sampling=ms)
        t0 = time.perf_counter()
        for call in range(calls):
            fn = h._perturb_fn(state, call, 7.0 if call % 2 else 14.6)  # CADS active and past tau2
            if fn is not None:
                hook.perturb_entry(entry, cfg.apply_to, rows, lambda t, part, f=fn: f(t, (0, 0, part)))
        out[name] = (time.perf_counter() - t0) / calls
    return out


def diversity(vs: dict, neg, steps: int, size: int, seeds: int) -> dict[str, float]:
    out = {}
    for name, (m, p) in vs.items():
        lat = torch.stack([run(m, p, neg, s, steps, size).flatten() for s in range(seeds)])
        out[name] = torch.pdist(lat).mean().item()
    return out


def main() -> None:
    setup_logging()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=16)
    ap.add_argument("--div-steps", type=int, default=6, help="sampling steps of the diversity runs")
    args = ap.parse_args()

    model, pos, neg = load_sd15()
    vs = variants(model, pos)
    log.info(header(f"conditioning perturbation on the SD1.x fixture, {args.size}px, {args.steps} steps, cfg 7, euler"))
    med = overhead(vs, neg, args.steps, args.size, args.repeats)
    cost = hook_cost(model, pos)
    div = diversity(vs, neg, args.div_steps, args.size, args.seeds) if args.seeds else {k: float("nan") for k in vs}
    base = med["none"]
    log.info(f"{'variant':<22}{'s/run (median)':>16}{'overhead':>10}{'diversity':>12}{'vs none':>9}")
    for name in vs:
        log.info(f"{name:<22}{med[name]:>16.3f}{(med[name] / base - 1) * 100:>+9.1f}%"
                 f"{div[name]:>12.2f}{div[name] / div['none']:>8.2f}x")
    step = base / args.steps
    for name, c in cost.items():
        log.info(f"{name} wrapper alone: {c * 1e3:.2f} ms per model call = {c / step * 100:.3f}% of a step "
                 f"({step:.3f} s, cfg batch 2)")
    log.info(f"# median of {args.repeats} interleaved runs; diversity = mean pairwise L2 of final latents over "
             f"{args.seeds} seeds ({args.div_steps} steps)")
    if args.seeds:
        _plot(med, div)


def _plot(med: dict, div: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    names = list(med)
    axes[0].bar(names, [(med[n] / med["none"] - 1) * 100 for n in names])
    axes[0].axhline(2, color="red", ls="--", label="2% target")
    axes[0].set_ylabel("overhead vs none (%)")
    axes[0].legend()
    axes[1].bar(names, [div[n] for n in names])
    axes[1].set_ylabel("mean pairwise latent distance")
    for ax in axes:
        ax.tick_params(axis="x", rotation=20)
    log.info(f"plot: {save_figure(fig, 'perturb_sampling.png')}")


if __name__ == "__main__":
    main()
