"""Sampling progress of a sigma, for any ComfyUI model sampling (eps, v, flow, EDM).

Schedules here are functions of the sampling time t in [0, 1] (1 = pure noise). For discrete
models t is timestep/999, for flow models the unshifted time: both are 1 - percent, where
``model_sampling.percent_to_sigma(percent) == sigma``. We invert that by bisection instead of
reading ``timestep(sigma) / 999``, which is wrong for Flux-style models (timestep == sigma).
"""

from __future__ import annotations

from typing import Any

import torch

TIME_BASES: tuple[str, ...] = ("sigma", "step")


def time_from_sigma(model_sampling: Any, sigma: float, iterations: int = 40) -> float:
    lo, hi = 0.0, 1.0  # percent; percent_to_sigma decreases from lo to hi
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if float(model_sampling.percent_to_sigma(mid)) > sigma:
            lo = mid
        else:
            hi = mid
    return 1.0 - 0.5 * (lo + hi)


def time_from_step(sample_sigmas: torch.Tensor, sigma: float) -> float:
    """1 - i/N for the schedule step nearest to sigma (second-order samplers evaluate between
    steps; they get the nearest step's time)."""
    sig = sample_sigmas.detach().float().cpu()
    steps = max(len(sig) - 1, 1)
    i = int(torch.argmin((sig[:-1] - sigma).abs()).item()) if len(sig) > 1 else 0
    return 1.0 - i / steps


def sampling_time(model_sampling: Any, sample_sigmas: torch.Tensor | None, sigma: float, base: str) -> float:
    if base == "step" and sample_sigmas is not None:
        return time_from_step(sample_sigmas, sigma)
    return time_from_sigma(model_sampling, sigma)
