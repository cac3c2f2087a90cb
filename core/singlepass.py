"""Single-pass guidance arithmetic in plain torch: which step a sigma belongs to, splitting a
doubled-channel output, and re-blending per-entry unconditional chunks by area and mask
(the same accumulation ComfyUI applies to the conditional ones)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch


def step_index(sample_sigmas: torch.Tensor, sigma: float) -> int:
    """The schedule step a model evaluation at ``sigma`` belongs to: i where
    sigmas[i] >= sigma > sigmas[i+1] (second-order samplers evaluate between steps)."""
    sig = sample_sigmas.detach().float().cpu()[:-1]
    if sig.numel() == 0:
        return 0
    return max(int((sig >= sigma * (1 - 1e-6)).sum().item()) - 1, 0)


def split_doubled(out: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A two-head output with 2C channels (madebyollin's layout: cond first) -> (cond, uncond)."""
    if out.shape[1] != 2 * channels:
        raise ValueError(f"expected {2 * channels} output channels (two heads of {channels}), got {out.shape[1]}")
    return out[:, :channels], out[:, channels:]


def blend(like: torch.Tensor, parts: Iterable[tuple[torch.Tensor, torch.Tensor, Sequence[int] | None]]
          ) -> torch.Tensor:
    """Sum of ``chunk * mult`` over the parts, each over its area, divided by the summed mult.

    ``area`` is ComfyUI's [sizes..., offsets...] over the spatial dims, or None for the full
    latent; the order of operations matches comfy.samplers._calc_cond_batch, so a single
    full-area part comes back bit-identical.
    """
    out = torch.zeros_like(like)
    counts = torch.ones_like(like) * 1e-37
    for chunk, mult, area in parts:
        if area is None:
            out += chunk * mult
            counts += mult
            continue
        o, c = out, counts
        dims = len(area) // 2
        for i in range(dims):
            o = o.narrow(i + 2, area[i + dims], area[i])
            c = c.narrow(i + 2, area[i + dims], area[i])
        o += chunk * mult
        c += mult
    return out / counts
