"""Conditioning perturbation nodes: static CEP, sampling-time CEP and CADS, and their schedule plot."""

from __future__ import annotations

import math

import torch
from comfy_api.v0_0_2 import io, ui

from ...core import perturb
from ...core.seeds import seeded_generator
from .. import family as fm
from ..checked import CheckedNode
from ..inputs import MAX_SEED, float_input
from ..model_time import TIME_BASES, sampling_time
from ..plots import line_plot
from . import hook

CATEGORY = "supercond/conditioning"

_GAMMA_TIP = ("Perturbation strength. 0 = exact no-op, 1 = the CEP paper's default (for training). Amplitude is "
              "gamma/sqrt(d) per token, d the width of each text-encoder segment.")
_DIST_TIP = "uniform: U(-a, a) (CEP-U); gaussian: N(0, a^2) (CEP-G)."
_SCALE_TIP = ("paper: amplitude gamma/sqrt(d) as in the paper (assumes unit-RMS embeddings). relative: "
              "the same in units of the embedding's RMS, so one gamma means the same on every text encoder.")
_APPLY_TIP = ("tokens: the per-token embeddings (cross-attention); pooled: the pooled embedding "
              "(SDXL, SD3, Flux; never SDXL's size/crop embeddings); both.")
_BRANCH_TIP = ("Which prompt is perturbed during sampling. Default positive: the negative (often the "
               "empty prompt) stays untouched. Zeroed-out conditioning is never touched.")
_OFFSET_TIP = "Added to the sampler's seed for this node's noise; change it for a different draw at the same seed."


class SupercondPerturbConditioning(CheckedNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SupercondPerturbConditioning",
            display_name="Perturb Conditioning (CEP)",
            category=CATEGORY,
            description=("Adds slight seeded CEP noise to a CONDITIONING once (static): a variation seed for the "
                         "prompt. Inspired by Chen et al.'s CEP, which the paper applies in training, not sampling."),
            inputs=[
                io.Conditioning.Input("conditioning"),
                float_input("gamma", 1.0, 0.0, 100.0, 0.01, _GAMMA_TIP),
                io.Combo.Input("distribution", options=list(perturb.DISTRIBUTIONS), default="uniform", tooltip=_DIST_TIP),
                io.Combo.Input("scale", options=list(perturb.SCALE_MODES), default="paper", tooltip=_SCALE_TIP),
                io.Combo.Input("apply_to", options=list(hook.APPLY_TO), default="tokens", tooltip=_APPLY_TIP),
                io.Int.Input("seed", default=0, min=0, max=MAX_SEED, control_after_generate=True,
                             tooltip="Seed of the noise. Same seed, same conditioning."),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, conditioning, gamma, distribution, scale, apply_to, seed) -> io.NodeOutput:
        if gamma == 0:
            return io.NodeOutput(conditioning)
        out = []
        for i, (tokens, extra) in enumerate(conditioning):
            if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3:
                shape = list(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
                raise ValueError(f"conditioning entry {i}: expected token embeddings [batch, tokens, width], got {shape}")
            extra = dict(extra)
            pooled = extra.get("pooled_output")
            pooled_width = int(pooled.shape[-1]) if isinstance(pooled, torch.Tensor) else None
            token_segments, pooled_segments = fm.conditioning_segments(int(tokens.shape[-1]), pooled_width)
            if apply_to in ("tokens", "both"):
                tokens = perturb.apply_cep(tokens, gamma, distribution, scale, seeded_generator(seed, i, 0),
                                           token_segments)
            if apply_to in ("pooled", "both"):
                if pooled_width is None:
                    raise ValueError(f"conditioning entry {i} has no pooled_output to perturb; set apply_to to tokens")
                extra["pooled_output"] = perturb.apply_cep(pooled, gamma, distribution, scale,
                                                           seeded_generator(seed, i, 1), pooled_segments)
            out.append([tokens, extra])
        return io.NodeOutput(out)


class SupercondCEP(CheckedNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SupercondCEP",
            display_name="CEP During Sampling",
            category=CATEGORY,
            description=("CEP noise at sampling time: fresh (or fixed) seeded noise on the text conditioning, a "
                         "distinct draw per batch row, seeded from the sampler's seed. An inference-time variation "
                         "inspired by Chen et al.'s CEP, which the paper applies in training (the trainer's "
                         "cep_gamma); on the evidence model gamma 1 changed no measured figure (README)."),
            inputs=[
                io.Model.Input("model"),
                float_input("gamma", 1.0, 0.0, 100.0, 0.01, _GAMMA_TIP),
                io.Combo.Input("distribution", options=list(perturb.DISTRIBUTIONS), default="uniform", tooltip=_DIST_TIP),
                io.Combo.Input("scale", options=list(perturb.SCALE_MODES), default="paper", tooltip=_SCALE_TIP),
                io.Combo.Input("apply_to", options=list(hook.APPLY_TO), default="tokens", tooltip=_APPLY_TIP),
                io.Combo.Input("branch", options=list(hook.BRANCHES), default="positive", tooltip=_BRANCH_TIP),
                io.Combo.Input("resample", options=["every_step", "once_per_run"], default="every_step",
                               tooltip="every_step: a fresh draw at every model call (as in CEP training); "
                                       "once_per_run: one draw held for the whole run."),
                io.Int.Input("seed_offset", default=0, min=0, max=0xFFFFFFFF, tooltip=_OFFSET_TIP),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, gamma, distribution, scale, apply_to, branch, resample, seed_offset) -> io.NodeOutput:
        if gamma == 0:
            return io.NodeOutput(model)
        config = hook.CEPConfig(gamma, distribution, scale, apply_to, branch, resample, seed_offset)
        return io.NodeOutput(hook.patch_model(model, config, "SupercondCEP"))


class SupercondCADS(CheckedNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SupercondCADS",
            display_name="CADS (Condition-Annealed Sampling)",
            category=CATEGORY,
            description=("Condition-annealed diffusion sampling (Sadat et al., ICLR 2024): y' = sqrt(g) y + "
                         "s sqrt(1-g) n, with g rising from 0 to 1 as sampling progresses from tau2 down to tau1."),
            inputs=[
                io.Model.Input("model"),
                float_input("tau1", 0.6, 0.0, 1.0, 0.01, "Below this sampling time (1 = pure noise, 0 = clean) the conditioning is clean."),
                float_input("tau2", 0.9, 0.0, 1.0, 0.01, "Above this sampling time the conditioning is pure noise (g = 0). Must exceed tau1."),
                float_input("noise_scale", 0.25, 0.0, 10.0, 0.01, "s: noise amplitude in units of the embedding (paper default for SD: 0.25)."),
                float_input("psi", 1.0, 0.0, 1.0, 0.01, "Rescale mix: 1 = restore the embedding's mean and std after noising, 0 = raw."),
                io.Combo.Input("apply_to", options=list(hook.APPLY_TO), default="tokens", tooltip=_APPLY_TIP),
                io.Combo.Input("branch", options=list(hook.BRANCHES), default="positive", tooltip=_BRANCH_TIP),
                io.Combo.Input("time_base", options=list(TIME_BASES), default="sigma",
                               tooltip="sigma: sampling time from the noise level (same for every sampler and step "
                                       "count); step: 1 - step/steps, as the A1111 extension does."),
                io.Int.Input("seed_offset", default=0, min=0, max=0xFFFFFFFF, tooltip=_OFFSET_TIP),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def relations(cls, tau1=None, tau2=None, **_) -> str | None:
        if tau1 is not None and tau2 is not None and not tau1 < tau2:
            return f"tau1 ({tau1}) must be smaller than tau2 ({tau2}): noise is full above tau2 and off below tau1."
        return None

    @classmethod
    def execute(cls, model, tau1, tau2, noise_scale, psi, apply_to, branch, time_base, seed_offset) -> io.NodeOutput:
        perturb.cads_gamma(0.0, tau1, tau2)  # raises the clear message for tau1 >= tau2
        config = hook.CADSConfig(tau1, tau2, noise_scale, psi, apply_to, branch, time_base, seed_offset)
        return io.NodeOutput(hook.patch_model(model, config, "SupercondCADS"))


PLOT = "SupercondPlotPerturbation"


class SupercondPlotPerturbation(CheckedNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SupercondPlotPerturbation",
            display_name="Plot Conditioning Noise",
            category=CATEGORY,
            description=("Effective noise-to-signal ratio of every Supercond CEP/CADS patch on the MODEL at each "
                         "step of a schedule (RMS of the noise over RMS of the embedding)."),
            inputs=[
                io.Model.Input("model"),
                io.Sigmas.Input("sigmas", tooltip="The schedule to plot against, e.g. from BasicScheduler."),
                io.Conditioning.Input("conditioning", optional=True,
                                      tooltip="The embedding the ratio is measured on (its RMS and padding; "
                                              "CEP per encoder segment and non-padding token, as the patch "
                                              "applies it). Without it: unit embeddings of the model's width."),
            ],
            outputs=[io.Image.Output("plot")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, sigmas, conditioning=None) -> io.NodeOutput:
        configs = hook.installed_configs(model)
        fam = fm.family_of(model, PLOT) if configs else None  # a patch knows its family's encoder segments
        if fam is not None and conditioning:
            fm.check_conditioning(fam, conditioning, PLOT)
        # without a conditioning: unit embeddings of the model's width
        tokens = conditioning[0][0].float() if conditioning else torch.ones(1, 1, fam.token_width if fam else 768)
        rms = _rms(tokens)
        segments = fam.token_segments if fam is not None else (tokens.shape[-1],)
        ms = model.get_model_object("model_sampling")
        sig = sigmas.detach().float().cpu()
        steps = list(range(max(len(sig) - 1, 1)))
        series = []
        for n, cfg in enumerate(configs):
            ys = [_noise_to_signal(cfg, sampling_time(ms, sig, float(sig[i]), getattr(cfg, "time_base", "sigma")),
                                   tokens, rms, segments) for i in steps]
            series.append((f"{n + 1}: {_describe(cfg)}", steps, ys))
        if not series:  # e.g. gamma 0, which leaves the MODEL unpatched: show that, don't fail
            series.append(("no Supercond CEP/CADS patch on this MODEL", steps, [0.0] * len(steps)))
        image = line_plot(series, "Conditioning noise-to-signal per step", "step", "noise RMS / embedding RMS", logy=True)
        return io.NodeOutput(image, ui=ui.PreviewImage(image, cls=cls))


def _rms(tokens: torch.Tensor) -> float:
    nz = tokens[tokens != 0]
    return float(nz.pow(2).mean().sqrt()) if nz.numel() else 1.0


def cep_noise_to_signal(cfg: hook.CEPConfig, tokens: torch.Tensor, segments: tuple[int, ...]) -> float:
    """What the hook applies: the RMS of CEP's noise over the RMS of the embedding, both on the non-padding
    entries, with the amplitude the hook gives each token of each encoder segment (core.perturb.cep_amplitude:
    gamma / sqrt(its non-padding width), times its RMS when relative). Exact in expectation."""
    variance = 1.0 / 3.0 if cfg.distribution == "uniform" else 1.0  # U(-a, a) has variance a^2 / 3
    noise, start = 0.0, 0
    for w in segments:
        seg = tokens[..., start:start + w]
        amp = perturb.cep_amplitude(seg, cfg.gamma, cfg.scale)
        noise += float((amp.pow(2) * (seg != 0)).sum()) * variance
        start += w
    signal = float(tokens[tokens != 0].pow(2).sum())
    return math.sqrt(noise / signal) if signal > 0 else 0.0


def _noise_to_signal(cfg, t: float, tokens: torch.Tensor, rms: float, segments: tuple[int, ...]) -> float:
    if isinstance(cfg, hook.CEPConfig):
        return cep_noise_to_signal(cfg, tokens, segments)
    g = perturb.cads_gamma(t, cfg.tau1, cfg.tau2)
    return min(perturb.cads_noise_to_signal(g, cfg.noise_scale, rms), 1e3)


def _describe(cfg) -> str:
    if isinstance(cfg, hook.CEPConfig):
        return f"CEP {cfg.distribution} gamma={cfg.gamma} ({cfg.scale}, {cfg.branch})"
    return (f"CADS tau=({cfg.tau1}, {cfg.tau2}) s={cfg.noise_scale} psi={cfg.psi} ({cfg.time_base}); "
            "1e3 = pure noise")


NODES: list[type[io.ComfyNode]] = [
    SupercondPerturbConditioning,
    SupercondCEP,
    SupercondCADS,
    SupercondPlotPerturbation,
]
