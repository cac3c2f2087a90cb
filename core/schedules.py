"""Noise-schedule fixes: timestep spacings, zero terminal SNR, first-step noise correction and
epsilon scaling. Pure torch, no ComfyUI.

Coordinates follow ComfyUI's samplers. ``kind`` names the geometry of the noisy sample x:
- ``"ve"`` (eps, v, x0 and EDM models): x = D + sigma * eps, D the denoised estimate;
- ``"flow"`` (rectified flow / CONST: SD3, Flux, ...): x = (1 - sigma) * D + sigma * eps.
Every correction is written as "take the model's implied noise eps_hat out of (x, D), change it,
put it back", so one formula serves eps, v and flow models.
"""

from __future__ import annotations

import math

import torch

SPACINGS: tuple[str, ...] = ("trailing", "leading", "linspace", "karras", "exponential")
TABLE_SPACINGS: tuple[str, ...] = ("trailing", "leading", "linspace")
FIRST_SIGMA_POLICIES: tuple[str, ...] = ("as_scheduled", "set", "cap")
KINDS: tuple[str, ...] = ("ve", "flow")

# ComfyUI's clamp of the terminal alpha_bar (comfy/model_sampling.py) so sigma_max stays finite
# (4518.76 on SD's schedule): keeping it makes our schedules match models patched with zsnr=True.
ZTSNR_TERMINAL_ALPHA_BAR = 4.8973451890853435e-08


class ScheduleError(ValueError):
    """Bad input to a schedule function: the message says what was wrong."""


# -- spacings ----------------------------------------------------------------------------------


def spacing_timesteps(spacing: str, steps: int, num_timesteps: int = 1000) -> torch.Tensor:
    """Descending 0-indexed model timesteps for ``steps`` sampling steps (Lin et al. 2023, Table 2).

    trailing: round(arange(T, 0, -T/S)) - 1 -> 999, 899, ..., 99 (T=1000, S=10; ComfyUI's "simple" when
              S divides T: simple floors where this rounds)
    leading:  arange(S) * (T//S) + 1, flipped -> 901, 801, ..., 1 (SD's DDIM, steps_offset 1; ComfyUI's
              "ddim_uniform" through BasicScheduler at every S from 1 to 100, measured on 0.3.64); never
              starts at the noisiest timestep
    linspace: round(linspace(T-1, 0, S)) -> 999, 888, ..., 0 (iDDPM)
    """
    _check_steps(steps)
    T = int(num_timesteps)
    if steps > T:
        raise ScheduleError(f"steps ({steps}) cannot exceed the model's {T} timesteps for {spacing} spacing")
    if spacing == "trailing":
        t = torch.round(torch.arange(T, 0, -T / steps, dtype=torch.float64)) - 1
    elif spacing == "leading":
        stride = T // steps
        offset = min(1, T - 1 - (steps - 1) * stride)  # SD's +1, unless it would run past T-1
        t = torch.arange(steps, dtype=torch.float64).flip(0) * stride + offset
    elif spacing == "linspace":
        t = torch.round(torch.linspace(T - 1, 0, steps, dtype=torch.float64))
    else:
        raise ScheduleError(f"spacing {spacing!r} is not a timestep spacing; use one of {TABLE_SPACINGS}")
    return t[:steps].long().clamp(0, T - 1)


def table_sigmas(sigma_table: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Sigmas at the given timesteps of a per-timestep table (index t -> sigma), plus a final 0."""
    sig = sigma_table.detach().double().cpu()[timesteps]
    return torch.cat([sig, sig.new_zeros(1)]).float()


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022), as k-diffusion's get_sigmas_karras, plus a final 0."""
    _check_steps(steps)
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sig = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sig, sig.new_zeros(1)]).float()


def exponential_sigmas(steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Uniform in log sigma from sigma_max to sigma_min, plus a final 0."""
    _check_steps(steps)
    sig = torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=torch.float64).exp()
    return torch.cat([sig, sig.new_zeros(1)]).float()


def _check_steps(steps: int) -> None:
    if int(steps) < 1:
        raise ScheduleError(f"steps must be at least 1, got {steps}")


# -- zero terminal SNR -------------------------------------------------------------------------


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Lin et al. (2023) Algorithm 1 on alpha_bar: keep sqrt(alpha_bar) at the first timestep, move
    the last one to exactly 0, rescale linearly in between. Returns the new alpha_bar."""
    s = alphas_cumprod.double().sqrt()
    s0, sT = s[0].clone(), s[-1].clone()
    s = (s - sT) * (s0 / (s0 - sT))
    return (s * s).to(alphas_cumprod.dtype)


def zero_terminal_snr_sigma_table(sigma_table: torch.Tensor,
                                  terminal_alpha_bar: float = ZTSNR_TERMINAL_ALPHA_BAR) -> torch.Tensor:
    """The same rescaling on a VE sigma table (sigma^2 = (1 - ab)/ab), with the terminal alpha_bar
    clamped as ComfyUI does (sigma_max 4518.76 on SD's schedule, not infinity)."""
    ab = 1.0 / (sigma_table.double() ** 2 + 1.0)
    ab = rescale_zero_terminal_snr(ab)
    ab[-1] = terminal_alpha_bar
    return ((1.0 - ab) / ab).sqrt().to(sigma_table.dtype)


def snr(sigmas: torch.Tensor, kind: str = "ve") -> torch.Tensor:
    """Signal-to-noise ratio alpha^2/s^2 of each sigma: 1/sigma^2 (ve) or ((1-sigma)/sigma)^2 (flow)."""
    s = sigmas.double()
    if kind == "flow":
        return ((1.0 - s) / s) ** 2
    _check_kind(kind)
    return 1.0 / (s * s)


def apply_first_sigma(sigmas: torch.Tensor, policy: str, value: float) -> torch.Tensor:
    """First-sigma policy: as_scheduled (unchanged), set (sigmas[0] = value, as SetFirstSigma) or cap
    (sigmas[0] = min(sigmas[0], value)). The result must still decrease."""
    if policy == "as_scheduled":
        return sigmas
    if policy not in FIRST_SIGMA_POLICIES:
        raise ScheduleError(f"first_sigma must be one of {FIRST_SIGMA_POLICIES}, got {policy!r}")
    if not value > 0 or not math.isfinite(value):
        raise ScheduleError(f"first_sigma_value must be a finite number > 0, got {value}")
    out = sigmas.clone()
    out[0] = value if policy == "set" else min(float(sigmas[0]), value)
    if len(out) > 1 and not float(out[0]) > float(out[1]):
        raise ScheduleError(
            f"first_sigma_value {value} is not above the second sigma {float(out[1]):.4g}; the schedule "
            "would not decrease. Use a larger value or fewer steps.")
    return out


# -- noise correction and epsilon scaling ------------------------------------------------------


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ScheduleError(f"kind must be one of {KINDS}, got {kind!r}")


def implied_noise(kind: str, x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """The unit noise eps_hat the sampler sees in x given D: (x - D)/sigma, or (x - (1-sigma) D)/sigma for flow."""
    _check_kind(kind)
    if kind == "flow":
        return (x - (1.0 - sigma) * denoised) / sigma
    return (x - denoised) / sigma


def renoise(kind: str, denoised: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """The noisy sample at sigma built from D and unit noise (inverse of ``implied_noise``)."""
    _check_kind(kind)
    if kind == "flow":
        return (1.0 - sigma) * denoised + sigma * noise
    return denoised + sigma * noise


def noise_correction_step(kind: str, x: torch.Tensor, denoised: torch.Tensor, true_noise: torch.Tensor,
                          sigma: float, sigma_next: float, strength: float = 1.0) -> torch.Tensor:
    """First-step noise correction after Imagine Flash (Kohler et al. 2024), as a DDIM/Euler step: our
    reconstruction from descriptions of the paper (its own equation was not available to check).

    Plain: x_next = renoise(D, eps_hat, sigma_next). Corrected: the true initial unit noise replaces
    eps_hat (strength blends linearly: 0 = plain step, 1 = full correction); D stays the model's.
    """
    if not 0.0 <= strength <= 1.0:
        raise ScheduleError(f"strength must be in [0, 1], got {strength}")
    eps_hat = implied_noise(kind, x, denoised, sigma)
    used = eps_hat + strength * (true_noise - eps_hat) if strength != 1.0 else true_noise
    return renoise(kind, denoised, used, sigma_next)


def epsilon_lambda(t: float, k: float, b: float) -> float:
    """Ning et al. (2023) lambda_t = k t + b, t the sampling time in [0, 1] (1 = pure noise)."""
    lam = k * t + b
    if not lam > 0:
        raise ScheduleError(f"lambda_t = k*t + b must stay > 0; got {lam} at t={t} (k={k}, b={b})")
    return lam


def epsilon_scale(kind: str, x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor | float,
                  lam: float) -> torch.Tensor:
    """Epsilon scaling (Ning et al. 2023): the D' whose implied noise at this x is eps_hat / lam.

    ve:   D' = x - (x - D)/lam
    flow: D' = (x - sigma * eps_hat/lam) / (1 - sigma); undefined at sigma = 1 (callers skip it)
    """
    if lam == 1.0:
        return denoised
    if kind == "flow":
        return (x - sigma * implied_noise(kind, x, denoised, sigma) / lam) / (1.0 - sigma)
    _check_kind(kind)
    return x - (x - denoised) / lam
