"""SupercondFitSchedule and SupercondLoadSchedule: a sampling schedule fitted to the MODEL a user loaded
(core.schedule_fit's optimal-stepsize programme), saved under models/supercond_schedules and loaded
back, interpolated to other step counts as AYS interpolates its presets.

The fit runs inside ComfyUI's own sampling: a CFGGuider with the wired prompts calls a custom KSAMPLER
whose function is the search, so the model is loaded, patched and guided exactly as when sampling."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import folder_paths
import torch
from comfy_api.v0_0_2 import io, ui

from ...core import files
from ...core import schedule_fit as sf
from .. import family as fm
from ..checked import CheckedNode
from ..errors import InputError
from ..events import progress_text
from ..inputs import MAX_SEED, register_model_folder
from ..plots import line_plot
from ..train.run import check_writable, memory_guard, prefix_path

log = logging.getLogger("supercond.schedules")

CATEGORY = "supercond/schedules"
FOLDER = "supercond_schedules"
FORMAT = "supercond_schedule/1"
TEACHER_GRID = "simple"  # the teacher's sigmas: ComfyUI's trailing spacing of the model's own table
BATCH = 64  # latents per model call during the search
# ComfyUI's presets a fitted schedule is drawn against: family -> (node module, node, model_type)
PRESETS = {"SD15": ("nodes_align_your_steps", "AlignYourStepsScheduler", "SD1"),
           "SDXL": ("nodes_align_your_steps", "AlignYourStepsScheduler", "SDXL"),
           "Flux": ("nodes_optimalsteps", "OptimalStepsScheduler", "FLUX"),
           "Chroma": ("nodes_optimalsteps", "OptimalStepsScheduler", "Chroma"),
           "WAN21_T2V": ("nodes_optimalsteps", "OptimalStepsScheduler", "Wan")}


register_model_folder(FOLDER, {".safetensors"})


def describe(model: Any) -> tuple[str, str, Any]:
    """(family, prediction type, model_sampling) of a MODEL, or a clear refusal."""
    try:
        ms = model.get_model_object("model_sampling")
        family = type(model.model.model_config).__name__
        table = ms.sigmas
    except AttributeError as e:
        raise InputError(f"the schedule nodes cannot read this model's sampling ({e}): they need a diffusion "
                         "MODEL from a checkpoint or diffusion-model loader") from None
    if table.numel() < 2:
        raise InputError("the schedule nodes need a model with a table of sigmas (model_sampling.sigmas)")
    return family, fm.prediction(ms), ms


def run_fit(model: Any, ms: Any, positive: Any, negative: Any, latent: dict, steps: int, teacher_steps: int,
            cfg: float, solver: str, samples: int, seed: int, node_id: str | None = None
            ) -> tuple[sf.Fit, torch.Tensor]:
    """The search inside ComfyUI's sampling (``ms``: the model's model_sampling, from ``describe``);
    returns (fit, the teacher's grid)."""
    import comfy.model_management as mm
    import comfy.sample
    import comfy.samplers
    import comfy.utils

    grid = comfy.samplers.calculate_sigmas(ms, TEACHER_GRID, teacher_steps).cpu().double()
    if bool((grid[:-1] <= grid[1:]).any()):
        raise InputError(f"teacher_steps {teacher_steps} repeats sigmas of this model's table of {len(ms.sigmas)}: "
                         "use fewer teacher_steps")
    template = latent["samples"][:1]
    empty = comfy.sample.fix_empty_latent_channels(model, torch.zeros(samples, *template.shape[1:]))
    noise = comfy.sample.prepare_noise(empty, seed)
    rows = samples * (teacher_steps * (steps + 1) + steps)  # at most: the teacher, every source per step, `simple`
    pbar = comfy.utils.ProgressBar(rows, node_id=node_id)

    def progress(done: int) -> None:
        pbar.update_absolute(min(done, rows))  # the server's hook raises on Cancel here
        mm.throw_exception_if_processing_interrupted()

    found: dict[str, sf.Fit] = {}

    def search(model_k: Any, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
               callback: Any = None, disable: Any = None) -> torch.Tensor:
        extra = extra_args or {}

        def denoise(xs: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            return model_k(xs, sigma.to(xs), **extra).float()

        found["fit"] = sf.optimal_stepsize(denoise, x.float(), sigmas.cpu().double(), steps, solver, progress, BATCH)
        return x

    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    with torch.no_grad():  # the server samples without gradients; a direct call should too
        guider.sample(noise, empty, comfy.samplers.KSAMPLER(search), grid.float(), disable_pbar=True, seed=seed)
    return found["fit"], grid


def compare_plot(fit: torch.Tensor, family: str, ms: Any, steps: int) -> torch.Tensor:
    """The fitted sigmas against simple, karras and the family's ComfyUI preset, per step (log scale)."""
    import importlib

    import comfy.samplers

    series = [("fitted", range(len(fit)), fit.tolist())]
    for name in ("simple", "karras"):
        series.append((name, range(steps + 1), comfy.samplers.calculate_sigmas(ms, name, steps).tolist()))
    if family in PRESETS:
        module, node, kind = PRESETS[family]
        cls = getattr(importlib.import_module(f"comfy_extras.{module}"), node)
        series.append((f"{node} {kind}", range(steps + 1), cls.execute(kind, steps, 1.0).result[0].tolist()))
    return line_plot(series, f"{steps}-step schedules ({family})", "step", "sigma", logy=True)


def next_free(stem: Path) -> Path:
    n = 1
    while (path := stem.with_name(f"{stem.name}_{n:05d}.safetensors")).exists():
        n += 1
    return path


class SupercondFitSchedule(CheckedNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SupercondFitSchedule",
            display_name="Fit Schedule (optimal steps)",
            category=CATEGORY,
            description=(
                "Fits a sampling schedule to THIS model, prompts, CFG scale and sampler (Optimal Stepsize, Pei "
                "et al. 2025): a teacher samples over teacher_steps fine steps, and a dynamic programme picks "
                "the steps of the student's schedule, among the teacher's sigmas, whose result lands closest to "
                "the teacher's. Outputs SIGMAS for SamplerCustomAdvanced (use the same sampler) and saves the "
                "schedule under models/supercond_schedules for SupercondLoadSchedule. Costs about "
                "samples x teacher_steps x (steps + 1) model calls (x2 with cfg > 1); the progress bar counts them."),
            inputs=[
                io.Model.Input("model"),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Int.Input("steps", default=10, min=2, max=100, tooltip="The student's step count: the schedule "
                             "has steps + 1 sigmas, ending at 0."),
                io.Int.Input("teacher_steps", default=100, min=3, max=1000,
                             tooltip="The fine reference the fit imitates; its sigmas are the candidates. More is "
                                     "closer to the exact trajectory and costs proportionally more."),
                io.Float.Input("cfg", default=5.0, min=0.0, max=100.0, step=0.1,
                               tooltip="The guidance scale you will sample with (1 for guidance-distilled models)."),
                io.Combo.Input("sampler_name", options=list(sf.SOLVERS),
                               tooltip="The solver the schedule is for: sample with the same one."),
                io.Combo.Input("method", options=list(sf.METHODS),
                               tooltip="optimal_stepsize: the dynamic programme over the teacher's trajectory."),
                io.Int.Input("samples", default=4, min=1, max=64,
                             tooltip="Seeded noise latents the fit averages its distance over."),
                io.Int.Input("seed", default=0, min=0, max=MAX_SEED,
                             tooltip="Seeds the noise latents the fit runs on (the fit is deterministic)."),
                io.String.Input("filename_prefix", default="supercond/schedule",
                                tooltip="Saved as <prefix>_00001.safetensors (the next free number) under "
                                        "models/supercond_schedules."),
                io.Latent.Input("latent_image", tooltip="The size the schedule is for (e.g. EmptyLatentImage); "
                                "only its shape is used."),
            ],
            outputs=[
                io.Sigmas.Output(display_name="SIGMAS", tooltip="The fitted schedule (steps + 1 values, last 0)."),
                io.Image.Output(display_name="comparison", tooltip="The fitted sigmas against simple, karras and "
                                "ComfyUI's preset for this family (AYS or Optimal Steps) where one exists."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def relations(cls, steps=None, teacher_steps=None, **_) -> str | None:
        if steps is not None and teacher_steps is not None and teacher_steps <= steps:
            return f"teacher_steps ({teacher_steps}) must be larger than steps ({steps})"
        return None

    @classmethod
    def execute(cls, model, positive, negative, steps, teacher_steps, cfg, sampler_name, method, samples, seed,
                filename_prefix, latent_image) -> io.NodeOutput:
        try:
            sf.check(steps, teacher_steps, sampler_name)
        except sf.FitError as e:
            raise InputError(str(e)) from None
        if method not in sf.METHODS:
            raise InputError(f"method must be one of {list(sf.METHODS)}, got {method!r}")
        if samples < 1:
            raise InputError(f"samples must be at least 1, got {samples}")
        family, prediction, ms = describe(model)
        stem = prefix_path(folder_paths.get_folder_paths(FOLDER)[0], filename_prefix, FOLDER)
        check_writable(stem.parent, "schedules")
        node_id = getattr(getattr(cls, "hidden", None), "unique_id", None)
        progress_text(f"fitting a {steps}-step schedule: up to {samples * teacher_steps * (steps + 1)} model calls",
                      node_id)
        with memory_guard("SupercondFitSchedule", "lower samples or teacher_steps, or the latent's size"):
            fit, _ = run_fit(model, ms, positive, negative, latent_image, steps, teacher_steps, cfg, sampler_name,
                             samples, seed, node_id)
        sigmas = fit.sigmas.float()
        meta = {"format": FORMAT, "family": family, "prediction": prediction, "sampler": sampler_name,
                "steps": steps, "teacher_steps": teacher_steps, "teacher_grid": TEACHER_GRID, "cfg": cfg,
                "method": method, "samples": samples, "seed": seed, "sigma_min": float(ms.sigma_min),
                "sigma_max": float(ms.sigma_max), "shift": float(getattr(ms, "shift", 1.0)),
                "latent_shape": "x".join(map(str, latent_image["samples"].shape[1:])), "error": fit.error,
                "model_calls": fit.calls, "searched": fit.searched}
        path = files.save_atomic(next_free(stem), {"sigmas": sigmas}, meta)
        log.info("supercond: fitted %s (%s, %s, %d steps; teacher %d steps): distance to the teacher %.4g after %d "
                 "model calls; saved %s", family, prediction, sampler_name, steps, teacher_steps, fit.error,
                 fit.calls, path)
        if not fit.searched:
            log.warning("supercond: the search found nothing closer to the teacher than the evenly spaced steps "
                        "(%s at %d steps), so the fitted schedule is that", TEACHER_GRID, steps)
        plot = compare_plot(sigmas, family, ms, steps)
        return io.NodeOutput(sigmas, plot, ui=ui.PreviewImage(plot, cls=cls))


def schedule_names() -> list[str]:
    return folder_paths.get_filename_list(FOLDER)


def read_schedule(name: str) -> tuple[torch.Tensor, dict[str, str]]:
    """(sigmas, metadata) of a saved schedule, or a clear error."""
    from safetensors import SafetensorError, safe_open

    path = folder_paths.get_full_path(FOLDER, name)
    if path is None:
        raise InputError(f"schedule {name!r} is not in the {FOLDER} folder(s): "
                         f"{', '.join(folder_paths.get_folder_paths(FOLDER))}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            sigmas = f.get_tensor("sigmas")
    except (SafetensorError, OSError, KeyError) as e:
        raise InputError(f"{name} is not a readable schedule file ({e}): fit it again with SupercondFitSchedule") \
            from None
    if meta.get("format") != FORMAT:
        raise InputError(f"{name} is not a Supercond schedule (format {meta.get('format')!r}, expected {FORMAT!r})")
    if sigmas.dim() != 1 or len(sigmas) < 2 or not bool(torch.isfinite(sigmas).all()) or float(sigmas[-1]) != 0 \
            or bool((sigmas[:-1] <= sigmas[1:]).any()):
        raise InputError(f"{name} holds no valid schedule (it must be strictly decreasing and end at 0)")
    return sigmas, meta


class SupercondLoadSchedule(CheckedNode):
    FILE_INPUTS = ("schedule_name",)

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SupercondLoadSchedule",
            display_name="Load Fitted Schedule",
            category=CATEGORY,
            description=("Loads a schedule saved by SupercondFitSchedule as SIGMAS. At another step count it is "
                         "log-linearly interpolated, as ComfyUI's AlignYourStepsScheduler interpolates its presets. "
                         "A schedule fitted for another model family, prediction type, sigma_max or flow shift is "
                         "refused."),
            inputs=[
                io.Model.Input("model", tooltip="The model you sample with: checked against the schedule's family, "
                               "prediction type, sigma_max and shift."),
                io.Combo.Input("schedule_name", options=schedule_names(),
                               tooltip=f"A schedule file in the {FOLDER} model folder."),
                io.Int.Input("steps", default=0, min=0, max=1000,
                             tooltip="0: the step count it was fitted for; another count interpolates it."),
            ],
            outputs=[io.Sigmas.Output(display_name="SIGMAS")],
        )

    @classmethod
    def execute(cls, model, schedule_name, steps) -> io.NodeOutput:
        sigmas, meta = read_schedule(schedule_name)
        family, prediction, ms = describe(model)
        if (meta.get("family"), meta.get("prediction")) != (family, prediction):
            raise InputError(f"{schedule_name} was fitted for {meta.get('family')} ({meta.get('prediction')} "
                             f"prediction); this model is {family} ({prediction}): fit a schedule for it with "
                             "SupercondFitSchedule")
        fitted_for = (float(meta.get("sigma_max", ms.sigma_max)), float(meta.get("shift", getattr(ms, "shift", 1.0))))
        here = (float(ms.sigma_max), float(getattr(ms, "shift", 1.0)))
        if any(abs(a - b) > 1e-3 * max(abs(b), 1e-6) for a, b in zip(fitted_for, here, strict=True)):
            raise InputError(f"{schedule_name} was fitted for sigma_max {fitted_for[0]:.4g}, shift {fitted_for[1]:g}; "
                             f"this model samples with sigma_max {here[0]:.4g}, shift {here[1]:g} (zero terminal SNR "
                             "or a ModelSampling node changes them): fit a schedule for this setting")
        if steps in (0, len(sigmas) - 1):
            return io.NodeOutput(sigmas)
        out = sf.loglinear(sigmas.double(), steps, float(meta.get("sigma_min", float(ms.sigma_min))))
        return io.NodeOutput(out.float())


NODES = [SupercondFitSchedule, SupercondLoadSchedule]
