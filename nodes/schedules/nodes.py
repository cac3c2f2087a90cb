"""Noise-correction schedule nodes: first-step noise correction, a schedule-fixing SIGMAS node,
offset/pyramid NOISE, model-type-aware epsilon scaling and a schedule plot."""

from __future__ import annotations

import logging
import math

import torch
from comfy_api.v0_0_2 import io, ui

from ...core import noise as cnoise
from ...core import schedules as sched
from ..checked import CheckedNode
from ..events import progress_text
from ..inputs import MAX_SEED
from ..plots import line_plot
from . import hook

log = logging.getLogger("supercond.schedules")

CATEGORY = "supercond/schedules"


class SupercondNoiseCorrection(CheckedNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SupercondNoiseCorrection",
            display_name="Noise Correction (first step)",
            category=CATEGORY,
            description=(
                "First-step noise correction after Imagine Flash (our reconstruction from descriptions of the paper, "
                "not its own equation): on a run that starts from pure noise, the first "
                "update keeps the model's x0 estimate but uses the true initial noise instead of the model's "
                "noise prediction (more colour and contrast at few steps on eps models). Works with KSampler, "
                "SamplerCustomAdvanced and other samplers. Exact no-op for flow models starting at sigma 1, "
                "zero-terminal-SNR v-prediction, img2img (denoise < 1) and inpainting. The first step is done "
                "as a DDIM/Euler step; the chosen sampler continues from step 2."),
            inputs=[
                io.Model.Input("model"),
                io.Float.Input("strength", default=1.0, min=0.0, max=1.0, step=0.05,
                               tooltip="0 = off (the MODEL is returned unchanged), 1 = full correction; "
                                       "in between blends the noise used in the first update."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, strength) -> io.NodeOutput:
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be between 0 and 1, got {strength}")
        hook.check_model(model)
        if strength == 0:
            return io.NodeOutput(model)
        return io.NodeOutput(hook.patch_noise_correction(model, strength))


class SupercondScheduleSigmas(CheckedNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SupercondScheduleSigmas",
            display_name="Schedule Sigmas (spacing, zero terminal SNR)",
            category=CATEGORY,
            description=(
                "One schedule-fixing SIGMAS node for SamplerCustom(Advanced): timestep spacing (Lin et al. 2023: "
                "trailing starts at the noisiest timestep, leading never does), optional zero-terminal-SNR "
                "rescaling of a discrete VP model's schedule, and a policy for the first sigma."),
            inputs=[
                io.Model.Input("model"),
                io.Int.Input("steps", default=10, min=1, max=1000, tooltip="Number of sampling steps."),
                io.Combo.Input("spacing", options=list(sched.SPACINGS), default="trailing",
                               tooltip="trailing: 999, 899, ..., 99 for 10 steps (recommended; equals ComfyUI 'simple' when "
                                       "1000 is a multiple of steps, and always starts at the noisiest timestep). "
                                       "leading: 901, ..., 1 (SD's DDIM, = 'ddim_uniform'; never starts at pure noise). "
                                       "linspace: 999, 888, ..., 0 (iDDPM). karras / exponential: in sigma, between "
                                       "the model's sigma_min and sigma_max."),
                io.Boolean.Input("zero_terminal_snr", default=False,
                                 tooltip="Rescale a discrete VP (eps/v) schedule so its last timestep has SNR 0, "
                                         "keeping the first (Lin et al. 2023, Alg. 1; sigma_max 4518.76 as in "
                                         "ComfyUI's zsnr). For v-prediction models trained with it. Flow models "
                                         "already reach SNR 0: no-op."),
                io.Combo.Input("first_sigma", options=list(sched.FIRST_SIGMA_POLICIES), default="as_scheduled",
                               tooltip="as_scheduled: keep it. set: replace it with first_sigma_value (as "
                                       "SetFirstSigma; 136 suits ZTSNR models). cap: lower it to first_sigma_value "
                                       "if it is higher."),
                io.Float.Input("first_sigma_value", default=136.0, min=0.001, max=20000.0, step=0.001,
                               tooltip="The sigma used by first_sigma set / cap."),
            ],
            outputs=[io.Sigmas.Output()],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, steps, spacing, zero_terminal_snr, first_sigma, first_sigma_value) -> io.NodeOutput:
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        ms, kind = hook.check_model(model)
        table = getattr(ms, "sigmas", None)
        if zero_terminal_snr:
            table, warning = _zero_terminal_snr_table(ms, kind, table)
            if warning:  # on the node, where the user looks, as well as in the log
                log.warning("SupercondScheduleSigmas: %s", warning)
                progress_text(warning, getattr(getattr(cls, "hidden", None), "unique_id", None))
        if spacing in sched.TABLE_SPACINGS:
            if table is None:
                raise ValueError(f"spacing '{spacing}' needs a model with discrete timesteps; this one "
                                 f"({type(ms).__name__}) has none. Use karras or exponential.")
            sigmas = sched.table_sigmas(table, sched.spacing_timesteps(spacing, steps, len(table)))
        else:
            lo = float(table[0]) if table is not None else float(ms.sigma_min)
            hi = float(table[-1]) if table is not None else float(ms.sigma_max)
            fn = sched.karras_sigmas if spacing == "karras" else sched.exponential_sigmas
            sigmas = fn(steps, lo, hi)
        return io.NodeOutput(sched.apply_first_sigma(sigmas, first_sigma, first_sigma_value))


def _zero_terminal_snr_table(ms, kind: str, table: torch.Tensor | None) -> tuple[torch.Tensor | None, str | None]:
    """The rescaled timestep table, and what the user must know when the node alone is not enough."""
    if kind == "flow":
        log.info("zero_terminal_snr: flow models already end at SNR 0 (sigma 1); nothing to rescale")
        return table, None
    if table is None:
        raise ValueError(f"zero_terminal_snr needs a discrete VP model (eps or v-prediction); "
                         f"{type(ms).__name__} has no timestep table to rescale")
    if getattr(ms, "zsnr", False):
        return table, None  # already rescaled by ModelSamplingDiscrete(zsnr=True)
    if kind == "eps":
        warning = ("zero_terminal_snr on an eps-prediction model: at SNR 0 eps prediction is trivial and "
                   "x0 = x - 4518*eps is ill-conditioned (Lin et al.); use it with v-prediction, or first_sigma set")
    else:
        warning = ("zero_terminal_snr: this MODEL's sampling is not zero-terminal-SNR, so it maps these sigmas "
                   "to timesteps with its own table (the first, 4518.8, lies beyond its last timestep): put "
                   "ModelSamplingDiscrete (v_prediction, zsnr on) on the MODEL the sampler uses")
    return sched.zero_terminal_snr_sigma_table(table), warning


class OffsetNoise:
    """A NOISE object (``seed`` + ``generate_noise(latent)``) like ComfyUI's RandomNoise."""

    def __init__(self, seed: int, offset: float, pyramid_iterations: int, pyramid_discount: float) -> None:
        self.seed = seed
        self.offset = offset
        self.pyramid_iterations = pyramid_iterations
        self.pyramid_discount = pyramid_discount

    def generate_noise(self, input_latent: dict) -> torch.Tensor:
        samples = input_latent["samples"]
        batch_index = input_latent.get("batch_index")
        base = cnoise.seeded_noise(samples, self.seed, batch_index)
        if self.offset == 0 and self.pyramid_iterations == 0:
            return base
        rows = batch_index if batch_index is not None else range(samples.shape[0])
        return cnoise.structure_noise(base, cnoise.row_generators(self.seed, list(rows)), self.offset,
                                      self.pyramid_iterations, self.pyramid_discount)


class SupercondOffsetNoise(CheckedNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SupercondOffsetNoise",
            display_name="Offset / Pyramid Noise",
            category=CATEGORY,
            description=(
                "A NOISE for SamplerCustomAdvanced: RandomNoise plus a per-channel constant (offset noise) "
                "and multi-resolution (pyramid) noise, renormalised to unit variance. Offset 0 and pyramid 0 "
                "give exactly RandomNoise's noise for the same seed; batch_index is respected."),
            inputs=[
                io.Int.Input("noise_seed", default=0, min=0, max=MAX_SEED, control_after_generate=True,
                             tooltip="Same seed as RandomNoise gives the same base noise."),
                io.Float.Input("offset", default=0.1, min=0.0, max=1.0, step=0.01,
                               tooltip="Std of the per-channel constant added to the noise (kohya's noise_offset; "
                                       "0.05-0.2 typical); the sum is divided by sqrt(1 + offset^2), or by its std with "
                                       "pyramid noise on."),
                io.Int.Input("pyramid_iterations", default=0, min=0, max=16,
                             tooltip="Levels of multi-resolution noise (0 = off; 6-10 in kohya's sd-scripts)."),
                io.Float.Input("pyramid_discount", default=0.3, min=0.01, max=1.0, step=0.01,
                               tooltip="Weight of level i is discount^i (kohya's default 0.3)."),
            ],
            outputs=[io.Noise.Output()],
        )

    @classmethod
    def execute(cls, noise_seed, offset, pyramid_iterations, pyramid_discount) -> io.NodeOutput:
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        if pyramid_iterations < 0:
            raise ValueError(f"pyramid_iterations must be >= 0, got {pyramid_iterations}")
        if pyramid_iterations > 0 and not 0 < pyramid_discount <= 1:
            raise ValueError(f"pyramid_discount must be in (0, 1], got {pyramid_discount}")
        return io.NodeOutput(OffsetNoise(noise_seed, offset, pyramid_iterations, pyramid_discount))


class SupercondEpsilonScaling(CheckedNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SupercondEpsilonScaling",
            display_name="Epsilon Scaling (exposure bias)",
            category=CATEGORY,
            description=(
                "Exposure-bias correction (Ning et al. 2023): the model's noise component is divided by "
                "lambda_t = k*t + b at every step (t = sampling time, 1 at pure noise, 0 at the end). Scales the "
                "actual noise component for eps, v and flow models; skips the singular first step of flow and "
                "zero-terminal-SNR models. b = 1, k = 0 returns the MODEL unchanged."),
            inputs=[
                io.Model.Input("model"),
                io.Float.Input("b", default=1.005, min=0.5, max=2.0, step=0.0005,
                               tooltip="Constant part of lambda_t; must be > 0. 1.0 = off; published values 1.0006-1.017."),
                io.Float.Input("k", default=0.0, min=-1.0, max=1.0, step=0.0005,
                               tooltip="Slope of lambda_t in sampling time t in [0, 1] (0 = the paper's uniform schedule)."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def relations(cls, b=None, k=None, **_) -> str | None:
        if not isinstance(b, (int, float)) or not isinstance(k, (int, float)):
            return None  # linked inputs are checked at execution
        return _lambda_problem(b, k)

    @classmethod
    def execute(cls, model, b, k) -> io.NodeOutput:
        problem = _lambda_problem(b, k)
        if problem:
            raise ValueError(problem)
        hook.check_model(model)
        if b == 1.0 and k == 0.0:
            return io.NodeOutput(model)
        return io.NodeOutput(hook.patch_epsilon_scaling(model, k, b))


def _lambda_problem(b: float, k: float) -> str | None:
    if not (math.isfinite(b) and math.isfinite(k)):
        return f"b and k must be finite numbers, got b={b}, k={k}"
    if b <= 0:
        return f"b must be > 0 (lambda_t = k*t + b divides the noise), got b={b}"
    if k + b <= 0:
        return f"lambda_t = k*t + b must stay > 0 for t in [0, 1]; with b={b}, k={k} it reaches {k + b} at t=1"
    return None


class SupercondPlotSigmas(CheckedNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SupercondPlotSigmas",
            display_name="Plot Sigmas",
            category=CATEGORY,
            description="Plots up to three schedules: sigma (log scale) and log10 SNR against step.",
            inputs=[
                io.Sigmas.Input("sigmas", tooltip="Schedule A."),
                io.Combo.Input("snr_convention", options=["eps/v: SNR = 1/sigma^2", "flow: SNR = ((1-sigma)/sigma)^2"],
                               default="eps/v: SNR = 1/sigma^2",
                               tooltip="How sigma maps to SNR: VE sigmas of eps/v models, or flow-matching sigmas."),
                io.Sigmas.Input("sigmas_2", optional=True, tooltip="Schedule B (optional)."),
                io.Sigmas.Input("sigmas_3", optional=True, tooltip="Schedule C (optional)."),
            ],
            outputs=[io.Image.Output("plot")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, sigmas, snr_convention, sigmas_2=None, sigmas_3=None) -> io.NodeOutput:
        kind = "flow" if snr_convention.startswith("flow") else "ve"
        sig_series, snr_series = [], []
        for name, s in zip("ABC", (sigmas, sigmas_2, sigmas_3), strict=True):
            if s is None:
                continue
            s = s.detach().double().cpu().flatten()
            if len(s) == 0:
                raise ValueError(f"schedule {name} is empty")
            label = f"{name}: {len(s) - 1} steps, {float(s[0]):.4g} -> {float(s[-1]):.4g}"
            steps = list(range(len(s)))
            sig_series.append((label, steps, s.tolist()))
            ratio = sched.snr(s, kind)
            keep = [i for i in steps if math.isfinite(float(ratio[i])) and float(ratio[i]) > 0]
            snr_series.append((label, keep, [math.log10(float(ratio[i])) for i in keep]))
        left = line_plot(sig_series, "Sigma per step", "step", "sigma (symlog)", logy=True)
        right = line_plot(snr_series, f"log10 SNR per step ({kind})", "step", "log10 SNR (sigma 0 not shown)")
        image = torch.cat([left, right], dim=2)
        return io.NodeOutput(image, ui=ui.PreviewImage(image, cls=cls))


NODES: list[type[io.ComfyNode]] = [
    SupercondNoiseCorrection,
    SupercondScheduleSigmas,
    SupercondOffsetNoise,
    SupercondEpsilonScaling,
    SupercondPlotSigmas,
]
