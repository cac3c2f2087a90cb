"""Conditioning perturbation: CEP (Chen et al., NeurIPS 2024) and CADS (Sadat et al., ICLR 2024).

One engine for both the static CONDITIONING node and the sampling-time MODEL hooks. Everything
takes an explicit ``torch.Generator`` so callers never touch the global RNG.

Conventions
- A token tensor has shape [B, T, D]; a pooled tensor [B, P]. ``segments`` splits the last axis
  into encoder segments (SDXL's cross-attention is CLIP-L 768 | CLIP-G 1280); each segment is
  scaled by its own width. Which segments a model's embeddings have is the caller's knowledge
  (the model adapter in nodes/); without ``segments`` the whole axis is one segment.
- Exact zeros are padding (SD3 pads CLIP features with zeros, ConditioningZeroOut is all
  zeros): they are never perturbed, and they do not count towards the width ``d``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

Distribution = Literal["uniform", "gaussian"]
ScaleMode = Literal["paper", "relative"]

DISTRIBUTIONS: tuple[str, ...] = ("uniform", "gaussian")
SCALE_MODES: tuple[str, ...] = ("paper", "relative")

class PerturbError(ValueError):
    """Bad input to a perturbation: the message says what was wrong and what to do."""


def check_finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        raise PerturbError(
            f"{what} contains NaN or Inf values; fix the node that produced it "
            "(e.g. a text encoder run in a dtype it overflows in) before perturbing it."
        )


def unit_noise(
    shape: Sequence[int], distribution: str, generator: torch.Generator
) -> torch.Tensor:
    """Noise of unit amplitude on CPU in float32: U(-1, 1) or N(0, 1).

    Drawn on CPU so the same seed gives the same noise on every device.
    """
    if distribution == "uniform":
        return torch.rand(tuple(shape), generator=generator, dtype=torch.float32) * 2.0 - 1.0
    if distribution == "gaussian":
        return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)
    raise PerturbError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")


def cep_amplitude(
    segment: torch.Tensor, gamma: float, scale: str
) -> torch.Tensor:
    """Per-token CEP amplitude a (broadcastable to ``segment``).

    ``paper``: a = gamma / sqrt(d), d the token's non-padding width (the paper's Eq. 8; uniform
    noise is U(-a, a), gaussian noise has standard deviation a, as in every implementation).
    ``relative``: a = gamma * rms / sqrt(d), with rms the RMS of the non-padding entries of this
    sample's segment, so gamma means the same on encoders whose embeddings are not unit-RMS.
    """
    nonzero = segment != 0
    d = nonzero.sum(dim=-1, keepdim=True).clamp(min=1).to(torch.float32)
    amp = gamma / torch.sqrt(d)
    if scale == "relative":
        seg = segment.to(torch.float32)
        count = nonzero.flatten(1).sum(dim=1).clamp(min=1)
        rms = torch.sqrt((seg * seg).flatten(1).sum(dim=1) / count)
        amp = amp * rms.view(-1, *([1] * (segment.dim() - 1)))
    elif scale != "paper":
        raise PerturbError(f"scale must be one of {SCALE_MODES}, got {scale!r}")
    return amp


def cep_delta(
    x: torch.Tensor,
    gamma: float,
    distribution: str,
    scale: str,
    generator: torch.Generator,
    segments: Sequence[int] | None = None,
) -> torch.Tensor:
    """The CEP perturbation for ``x`` ([B, ..., D]), same shape, float32 on ``x``'s device.

    Padding (exact zeros) gets zero perturbation. A distinct draw per batch row follows from
    drawing the whole tensor at once.
    """
    if gamma < 0 or not math.isfinite(gamma):
        raise PerturbError(f"gamma must be a finite number >= 0, got {gamma}")
    check_finite(x, "the conditioning")
    width = x.shape[-1]
    segments = tuple(segments) if segments else (width,)
    if sum(segments) != width:
        raise PerturbError(f"segments {segments} do not add up to the feature width {width}")
    noise = unit_noise(x.shape, distribution, generator).to(x.device)
    parts = []
    start = 0
    for w in segments:
        seg = x[..., start : start + w]
        amp = cep_amplitude(seg, gamma, scale)
        parts.append(noise[..., start : start + w] * amp * (seg != 0))
        start += w
    return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]


def apply_cep(
    x: torch.Tensor,
    gamma: float,
    distribution: str,
    scale: str,
    generator: torch.Generator,
    segments: Sequence[int] | None = None,
) -> torch.Tensor:
    """x + delta, in x's dtype. gamma == 0 returns x itself (an exact no-op)."""
    if gamma == 0:
        return x
    delta = cep_delta(x, gamma, distribution, scale, generator, segments)
    return (x.to(torch.float32) + delta).to(x.dtype)


def cads_gamma(t: float, tau1: float, tau2: float) -> float:
    """CADS annealing weight g(t): 1 for t <= tau1, 0 for t >= tau2, linear between.

    t is the sampling time in [0, 1]: 1 at the first (noisiest) step, 0 at the clean end.
    """
    if not tau1 < tau2:
        raise PerturbError(f"tau1 must be smaller than tau2, got tau1={tau1}, tau2={tau2}")
    if t <= tau1:
        return 1.0
    if t >= tau2:
        return 0.0
    return (tau2 - t) / (tau2 - tau1)


def apply_cads(
    y: torch.Tensor,
    g: float,
    noise_scale: float,
    psi: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """CADS on y ([B, ...]): y' = sqrt(g) y + s sqrt(1-g) n, then rescaled to y's per-sample
    mean and std and mixed with weight psi. g == 1 returns y itself (an exact no-op).

    Padding (exact zeros) is left untouched and excluded from the statistics.
    """
    if g >= 1.0:
        return y
    check_finite(y, "the conditioning")
    yf = y.to(torch.float32)
    keep = (yf != 0).to(torch.float32)
    n = unit_noise(y.shape, "gaussian", generator).to(y.device)
    noisy = (math.sqrt(g) * yf + noise_scale * math.sqrt(1.0 - g) * n) * keep
    if psi > 0:
        mean_in, std_in = _masked_stats(yf, keep)
        mean_out, std_out = _masked_stats(noisy, keep)
        rescaled = ((noisy - mean_out) / std_out.clamp(min=1e-12) * std_in + mean_in) * keep
        noisy = psi * rescaled + (1.0 - psi) * noisy
    return noisy.to(y.dtype)


def _masked_stats(x: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample scalar mean and std over the kept entries, shaped to broadcast against x."""
    dims = tuple(range(1, x.dim()))
    count = keep.sum(dim=dims, keepdim=True).clamp(min=1)
    mean = (x * keep).sum(dim=dims, keepdim=True) / count
    var = (((x - mean) * keep) ** 2).sum(dim=dims, keepdim=True) / count
    return mean, var.sqrt()


def cep_noise_to_signal(amplitude: float, distribution: str, signal_rms: float) -> float:
    """RMS of CEP noise of amplitude a, relative to the signal's RMS."""
    noise_rms = amplitude / math.sqrt(3.0) if distribution == "uniform" else amplitude
    return noise_rms / max(signal_rms, 1e-12)


def cads_noise_to_signal(g: float, noise_scale: float, signal_rms: float) -> float:
    """RMS of the CADS noise term relative to the RMS of the (scaled) signal term."""
    if g <= 0:
        return math.inf
    return noise_scale * math.sqrt(1.0 - g) / (math.sqrt(g) * max(signal_rms, 1e-12))

