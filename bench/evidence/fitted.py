"""Table 6: a schedule fitted to the evidence model (SupercondFitSchedule, optimal stepsize) against the
schedules a user would pick instead, at few steps, with euler and dpmpp_2m at cfg 5: ComfyUI's simple,
karras, exponential and kl_optimal schedulers, its AYS preset for SD1 and GITS. Each schedule samples
the same seeds; besides adherence and FD, each image's pixel distance to the teacher's image (the same
sampler at the fit's teacher_steps on `simple`, same seed), the quantity the fit minimizes on its own
noise. The question: does a fitted 6-step schedule match or beat `simple` at 10 steps?

The fits are cached like the trained heads (artifacts.prefix: the checkpoint's build stamp and the
recipe), under the models folder's supercond_schedules."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import artifacts, data, metrics, negatives, plots, report
from .sampling import Drawn, Evidence

FIT_PROMPT = 8  # the fit's positive prompt ("a handwritten eight"); the table prompts all nine digits


@dataclass(frozen=True)
class FitRecipe:
    steps: int
    sampler: str
    teacher_steps: int = 100
    cfg: float = 5.0
    samples: int = 8
    seed: int = 0


def fitted(ev: Evidence, recipe: FitRecipe) -> torch.Tensor:
    """The fitted SIGMAS (fitted once, then loaded with SupercondLoadSchedule)."""
    import folder_paths

    from supercond.nodes.schedules.fit import FOLDER, SupercondFitSchedule, SupercondLoadSchedule

    stem = artifacts.prefix(ev, f"schedule_{recipe.sampler}_{recipe.steps}", recipe)
    name = f"{stem}_00001.safetensors"
    found = folder_paths.get_full_path(FOLDER, name)
    if found is not None and not artifacts.RETRAIN:
        return SupercondLoadSchedule.execute(ev.model, name, 0).result[0]
    if found is not None:  # train --force: the new fit takes the old one's name
        Path(found).unlink()
    artifacts.log.info("fitting a %d-step %s schedule (cached afterwards)", recipe.steps, recipe.sampler)
    latent = {"samples": torch.zeros(1, 4, data.PX // 8, data.PX // 8)}
    r = recipe
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as the tables sample
        sigmas = SupercondFitSchedule.execute(ev.model, ev.positive[FIT_PROMPT], ev.negative, r.steps,
                                              r.teacher_steps, r.cfg, r.sampler, "optimal_stepsize", r.samples, r.seed,
                                              stem, latent).result[0]
    artifacts.log.info("fitted in %.0f s", time.perf_counter() - start)
    return sigmas


def recipe(s: report.Settings, steps: int, sampler: str) -> FitRecipe:
    return FitRecipe(steps, sampler, s.fit_teacher_steps, s.schedule_cfg, s.fit_samples)


def fit_all(ev: Evidence, s: report.Settings) -> None:
    for sampler in s.fit_samplers:
        for steps in s.fit_steps:
            fitted(ev, recipe(s, steps, sampler))


def alternatives(ev: Evidence, steps: int) -> dict[str, torch.Tensor]:
    """Name -> SIGMAS of the schedules a user would pick instead, from ComfyUI's own nodes."""
    from comfy_extras import nodes_custom_sampler as cs
    from comfy_extras.nodes_align_your_steps import AlignYourStepsScheduler
    from comfy_extras.nodes_gits import GITSScheduler

    out = {name: cs.BasicScheduler().get_sigmas(ev.model, name, steps, 1.0)[0]
           for name in ("simple", "karras", "exponential", "kl_optimal")}
    out["AYS (SD1 preset)"] = AlignYourStepsScheduler.execute("SD1", steps, 1.0).result[0]
    out["GITS (coeff 1.2)"] = GITSScheduler.execute(1.2, steps, 1.0).result[0]
    return out


def table(ev: Evidence, judge: metrics.Judge, s: report.Settings) -> list[str]:
    rows: list[report.Row] = []
    verdicts = []
    for sampler in s.fit_samplers:
        def draw(sigmas: torch.Tensor, sampler: str = sampler) -> Drawn:
            return ev.draw(data.SEEN, s.per_digit, s.seed, cfg=s.schedule_cfg, sampler=sampler, sigmas=sigmas)

        from comfy_extras import nodes_custom_sampler as cs

        teacher = draw(cs.BasicScheduler().get_sigmas(ev.model, "simple", s.fit_teacher_steps, 1.0)[0])
        at: dict[tuple[str, int], report.Row] = {}
        for steps in s.fit_steps:
            todo = {"fitted (optimal stepsize)": fitted(ev, recipe(s, steps, sampler)),
                    **alternatives(ev, steps)}
            for name, sigmas in todo.items():
                drawn = draw(sigmas)
                far = negatives.per_image(negatives.distance(drawn, teacher), drawn.labels, s)
                row = report.measure(judge, drawn, s, f"{sampler}, {name}, {steps} steps", f"{sampler} {name}", steps,
                                     **{"distance to the teacher": far})
                at[name, steps] = row
                rows.append(row)
        verdicts.append(verdict(at, sampler))
    plots.series(rows, ("adherence", "FD", "distance to the teacher"), "steps",
                 f"Table 6: fitted schedules, cfg {s.schedule_cfg:g} ({s.per_digit} per digit)",
                 "evidence_fitted_schedules.png", xlog=True)
    return [*report.lines(f"6. Fitted schedules at {', '.join(map(str, s.fit_steps))} steps (cfg {s.schedule_cfg:g}; "
                          "distance: to the teacher's image of the same seed)", rows, ("adherence", "FD"),
                          ("distance to the teacher",)), "", *verdicts]


def verdict(at: dict[tuple[str, int], report.Row], sampler: str) -> str:
    """Does the fitted schedule at 6 steps match or beat `simple` at 10 (FD and distance intervals)?"""
    if ("fitted (optimal stepsize)", 6) not in at or ("simple", 10) not in at:
        return f"- {sampler}: (6 or 10 steps not in this run)"
    mine, ref = at["fitted (optimal stepsize)", 6], at["simple", 10]

    def compare(a: metrics.Figure, b: metrics.Figure) -> str:
        return "lower" if a.high < b.low else "higher" if a.low > b.high else "overlapping"

    fd = compare(mine.rep.fd, ref.rep.fd)
    far = compare(mine.extra["distance to the teacher"], ref.extra["distance to the teacher"])
    return (f"- {sampler}: fitted at 6 steps vs simple at 10: FD {mine.rep.fd.value:.3g} vs {ref.rep.fd.value:.3g} "
            f"({fd}), distance to the teacher {mine.extra['distance to the teacher'].value:.3g} vs "
            f"{ref.extra['distance to the teacher'].value:.3g} ({far})")
