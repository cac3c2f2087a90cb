"""MODEL patches for the schedule fixes, through ComfyUI's keyed wrappers (they stack with other
packs' wrappers and reach every sampler that takes a MODEL: KSampler, SamplerCustom(Advanced),
detailers).

- Noise correction: a SAMPLER_SAMPLE wrapper. It sees the raw unit noise, the latent and the
  schedule, runs the first step itself through the guider (so CFG and every other patch apply),
  then hands the rest of the schedule to the sampler with the noise that reproduces its x1.
- Epsilon scaling: a PREDICT_NOISE wrapper on the guided (post-CFG) denoised output.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from ...core import schedules as sched
from .. import family as fm
from ..errors import InputError
from ..model_time import time_from_sigma

log = logging.getLogger("supercond.schedules")

NC_KEY = "supercond.noise_correction"
ES_KEY = "supercond.epsilon_scaling"


def prediction_kind(model_sampling: Any) -> str:
    """eps | v | x0 | edm | flow (the model adapter's reading of ComfyUI's model_sampling class);
    InputError for anything else. Every kind but flow lives in ComfyUI's x = x0 + sigma n geometry."""
    kind = fm.prediction(model_sampling)
    if kind not in ("eps", "v", "x0", "edm", "flow"):
        raise InputError(
            f"this MODEL's sampling type ({type(model_sampling).__name__}, {kind}) is neither eps, v-prediction, "
            "x0, EDM nor rectified flow; Supercond's schedule patches cannot serve it.")
    return kind


def geometry(kind: str) -> str:
    return "flow" if kind == "flow" else "ve"


def check_model(model: Any) -> tuple[Any, str]:
    if not hasattr(model, "add_wrapper_with_key"):
        raise InputError(f"expected a ComfyUI MODEL (ModelPatcher), got {type(model).__name__}")
    ms = model.get_model_object("model_sampling")
    return ms, prediction_kind(ms)


def _is_zsnr(ms: Any) -> bool:
    return bool(getattr(ms, "zsnr", False))


# -- noise correction ----------------------------------------------------------------------------


@dataclass(frozen=True)
class NoiseCorrection:
    strength: float

    def skip_reason(self, ms: Any, kind: str, sampler: Any, guider: Any, sigmas: torch.Tensor,
                    noise: torch.Tensor, denoise_mask: Any) -> str | None:
        """Why this run is left alone (None: correct it)."""
        import comfy.samplers

        if not isinstance(sampler, comfy.samplers.KSAMPLER):
            return f"sampler {type(sampler).__name__} is not a KSAMPLER"
        if len(sigmas) < 3:
            return "fewer than 2 steps: the first step already lands on the final sigma"
        if denoise_mask is not None:
            return "inpainting (a noise mask) is left alone"
        if not sampler.max_denoise(guider, sigmas):
            return "the run does not start from pure noise (denoise < 1 or a later start step)"
        if not torch.count_nonzero(noise):
            return "the noise is all zeros (add_noise off)"
        if kind == "flow" and float(sigmas[0]) >= 1.0:
            return "flow model starting at sigma 1: x_T is the noise, the correction is the plain step"
        if kind == "v" and _is_zsnr(ms):
            return "zero-terminal-SNR v-prediction: the implied noise at sigma_max already is the noise"
        return None

    def sampler_sample(self, executor, guider, sigmas, extra_args, callback, noise, latent_image,
                       denoise_mask, disable_pbar):
        sampler = executor.class_obj
        ms = guider.inner_model.model_sampling
        kind = prediction_kind(ms)
        why = self.skip_reason(ms, kind, sampler, guider, sigmas, noise, denoise_mask)
        if why:
            log.debug("noise correction skipped: %s", why)
            return executor(guider, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)
        geo = geometry(kind)
        s0, s1 = sigmas[0], sigmas[1]
        x = ms.noise_scaling(s0, noise, latent_image, True)  # exactly what KSAMPLER.sample would start from
        s_in = x.new_ones([x.shape[0]])
        # No autograd, like k-diffusion's samplers: a grad-enabled caller would otherwise keep the
        # first call's graph alive through the corrected noise for the whole run.
        with torch.no_grad():
            denoised = guider(x, s0 * s_in, model_options=extra_args.get("model_options", {}),
                              seed=extra_args.get("seed"))
        x1 = sched.noise_correction_step(geo, x, denoised, noise.to(x.dtype), s0, s1, self.strength)
        total = len(sigmas) - 1
        if callback is not None:
            callback(0, denoised, x, total)
            inner_cb = callback

            def callback(i, d, xx, _t):  # the rest of the run reports steps 1..N of N
                return inner_cb(i + 1, d, xx, total)
        zero = torch.zeros_like(x1)
        # noise' such that the sampler's noise_scaling(s1, noise', latent) == x1 (it is affine in noise)
        base = ms.noise_scaling(s1, zero, latent_image, False)
        new_noise = (x1 - base) / s1
        return executor(guider, sigmas[1:], extra_args, callback, new_noise, latent_image, denoise_mask, disable_pbar)


def patch_noise_correction(model: Any, strength: float) -> Any:
    import comfy.patcher_extension as pe

    check_model(model)
    m = model.clone()
    m.add_wrapper_with_key(pe.WrappersMP.SAMPLER_SAMPLE, NC_KEY, NoiseCorrection(strength).sampler_sample)
    return m


# -- epsilon scaling -----------------------------------------------------------------------------


@dataclass
class EpsilonScaling:
    """The PREDICT_NOISE wrapper. One object serves every clone of the patched MODEL, and a clone may
    sample with other sampling settings (a ModelSamplingSD3 shift, zsnr): so nothing is cached on it,
    each call maps its sigma to time through the model_sampling it runs with (a 40-step bisection, far
    below a model call)."""

    k: float
    b: float

    def lam(self, ms: Any, sigma: float) -> float:
        if self.k == 0:
            return sched.epsilon_lambda(0.0, 0.0, self.b)
        return sched.epsilon_lambda(time_from_sigma(ms, sigma), self.k, self.b)

    def exempt(self, ms: Any, kind: str, sigma: float) -> bool:
        """Where eps_hat -> x0 is singular (alpha = 0): flow at sigma 1, a ZTSNR model at sigma_max."""
        if kind == "flow":
            return sigma >= 1.0
        return _is_zsnr(ms) and sigma >= float(ms.sigma_max) * (1 - 1e-5)

    def predict_noise(self, executor, x, timestep, model_options={}, seed=None):  # noqa: B006 (ComfyUI's signature)
        denoised = executor(x, timestep, model_options, seed)
        ms = executor.class_obj.inner_model.model_sampling
        kind = prediction_kind(ms)
        sig = timestep.detach().float().cpu().flatten().tolist()
        if len(set(sig)) == 1:  # the usual case: one sigma for the whole batch
            return self._scale(ms, kind, x, denoised, sig[0])
        return torch.stack([self._scale(ms, kind, x[i], denoised[i], sig[min(i, len(sig) - 1)])
                            for i in range(x.shape[0])])

    def _scale(self, ms: Any, kind: str, x: torch.Tensor, denoised: torch.Tensor, sigma: float) -> torch.Tensor:
        if self.exempt(ms, kind, sigma):
            return denoised
        return sched.epsilon_scale(geometry(kind), x, denoised, sigma, self.lam(ms, sigma))


def patch_epsilon_scaling(model: Any, k: float, b: float) -> Any:
    import comfy.patcher_extension as pe

    check_model(model)
    m = model.clone()
    m.add_wrapper_with_key(pe.WrappersMP.PREDICT_NOISE, ES_KEY, EpsilonScaling(k, b).predict_noise)
    return m
