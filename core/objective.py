"""The diffusion training objective in ComfyUI's sigma terms (research/trainer.md, section 5).

- eps / v (ComfyUI's discrete VP models, written VE): ``x_in = x0 + sigma*eps``, SNR = 1/sigma^2;
  eps target ``eps``, v target ``(eps - sigma*x0)/sqrt(sigma^2+1)`` (= alpha*eps - s*x0 in VP terms).
- flow (rectified flow, ComfyUI CONST, sigma = t): ``x_in = t*eps + (1-t)*x0``, target ``eps - x0``,
  SNR = ((1-t)/t)^2.

The model's x0 estimate is turned into the chosen parameterisation with the same affine maps
ComfyUI's ``calculate_denoised`` uses, so the loss is in native space whatever the model outputs.
With input perturbation ``x_in`` is built from ``eps + gamma*xi`` while the target keeps ``eps``.
"""

from __future__ import annotations

import math

import torch

PREDICTIONS: tuple[str, ...] = ("eps", "v", "flow")
WEIGHTINGS: tuple[str, ...] = ("none", "min_snr", "debiased")
SNR_CLAMP = 1000.0  # kohya clamps SNR for the debiased weight (sd-scripts PR #889)


class ObjectiveError(ValueError):
    """Bad objective settings: the message says what was wrong."""


def _check(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ObjectiveError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def _col(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigma.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def noisy_input(prediction: str, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """What the model sees (ComfyUI's ``noise_scaling``)."""
    _check(prediction)
    s = _col(sigma, x0)
    if prediction == "flow":
        return s * noise + (1.0 - s) * x0
    return x0 + s * noise


def native_target(prediction: str, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    _check(prediction)
    if prediction == "eps":
        return noise
    if prediction == "v":
        s = _col(sigma, x0)
        return (noise - s * x0) / torch.sqrt(s * s + 1.0)
    return noise - x0


def native_prediction(prediction: str, x_in: torch.Tensor, x0_hat: torch.Tensor,
                      sigma: torch.Tensor) -> torch.Tensor:
    """The eps / v / flow prediction implied by an x0 estimate at input ``x_in``."""
    _check(prediction)
    s = _col(sigma, x_in)
    if prediction == "v":
        return (x_in / (s * s + 1.0) - x0_hat) * torch.sqrt(s * s + 1.0) / s
    return (x_in - x0_hat) / s


def snr(prediction: str, sigma: torch.Tensor) -> torch.Tensor:
    _check(prediction)
    s = sigma.to(torch.float32)
    if prediction == "flow":
        return ((1.0 - s) / s) ** 2
    return 1.0 / (s * s)


def loss_weight(weighting: str, prediction: str, sigma: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    """Per-sample weight on the native-space MSE ([B]).

    min_snr (Hang et al.): x0-space weight min(SNR, gamma), i.e. min(1, gamma/SNR) on eps,
    min(SNR, gamma)/(SNR+1) on v, t^2 min(SNR, gamma) = min((1-t)^2, gamma t^2) on flow.
    debiased (Yu et al.): x0-space weight sqrt(SNR), SNR clamped at 1000, i.e. 1/sqrt(SNR) on eps
    (kohya), sqrt(SNR)/(SNR+1) on v (the exact translation; kohya uses 1/(SNR+1), OneTrainer
    1/sqrt(SNR+1)), t^2 sqrt(SNR) on flow: t(1-t) for t above ~0.031, where SNR stays under the clamp.
    """
    _check(prediction)
    if weighting == "none":
        return torch.ones_like(sigma, dtype=torch.float32)
    r = snr(prediction, sigma)
    t = sigma.to(torch.float32)
    if weighting == "min_snr":
        if gamma <= 0 or not math.isfinite(gamma):
            raise ObjectiveError(f"min_snr_gamma must be a finite number > 0, got {gamma}")
        m = torch.minimum(r, torch.full_like(r, gamma))
        if prediction == "eps":
            return m / r
        if prediction == "v":
            return m / (r + 1.0)
        return t * t * m
    if weighting == "debiased":
        rc = r.clamp(max=SNR_CLAMP)
        if prediction == "eps":
            return 1.0 / torch.sqrt(rc)
        if prediction == "v":
            return torch.sqrt(rc) / (rc + 1.0)
        return t * t * torch.sqrt(rc)  # = t(1 - t) until SNR reaches the clamp (t below ~0.031)
    raise ObjectiveError(f"loss_weighting must be one of {WEIGHTINGS}, got {weighting!r}")


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """mean_b( w_b * mean((pred_b - target_b)^2 * mask_b) ), in float32. ``mask`` [B, 1, h, w] (masked
    loss, broadcast over channels and frames) weights each position as kohya's masked loss does: the mean
    stays over all positions, so a half-masked image counts half."""
    err = (pred.float() - target.float()).pow(2)
    if mask is not None:
        m = mask.to(err.device, err.dtype)
        if err.dim() == 5:  # video latents [B, C, T, h, w]: one mask for every frame
            m = m.unsqueeze(2)
        err = err * m
    per = err.flatten(1).mean(dim=1)
    return (per * weight.to(per.device)).mean()


def lr_factor(schedule: str, step: int, total: int, warmup: int) -> float:
    """Multiplier on the learning rate at optimizer step ``step`` (0-based): linear warmup, then
    constant or cosine decay to 0 at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        span = max(1, total - warmup)
        progress = min(1.0, (step - warmup) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ObjectiveError(f"lr_schedule must be constant or cosine, got {schedule!r}")
