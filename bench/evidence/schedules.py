"""Table 3: noise-correction schedules at 2-20 steps on an eps model, CFG on, same seeds: ComfyUI's
KSampler schedules (normal, karras) and SupercondScheduleSigmas spacings (trailing, leading) with
SamplerCustomAdvanced, then trailing with SupercondNoiseCorrection, with SupercondEpsilonScaling
(its default b 1.005), and with zero terminal SNR, which an eps model cannot use (Lin et al.: kept
to show what happens when it is switched on for the wrong model)."""

from __future__ import annotations

from typing import Any

from . import data, metrics, plots, report
from .sampling import Evidence


def sigmas(model: Any, steps: int, spacing: str, zsnr: bool = False) -> Any:
    from supercond.nodes.schedules.nodes import SupercondScheduleSigmas

    return SupercondScheduleSigmas.execute(model, steps, spacing, zsnr, "as_scheduled", 136.0).result[0]


def variants(ev: Evidence) -> dict[str, tuple[Any, str, bool]]:
    """Name -> (model, the KSampler's scheduler or a SupercondScheduleSigmas spacing, zsnr)."""
    from supercond.nodes.schedules.nodes import SupercondEpsilonScaling, SupercondNoiseCorrection

    corrected = SupercondNoiseCorrection.execute(ev.model, 1.0).result[0]
    scaled = SupercondEpsilonScaling.execute(ev.model, 1.005, 0.0).result[0]
    return {
        "KSampler normal": (ev.model, "normal", False),
        "KSampler karras": (ev.model, "karras", False),
        "trailing": (ev.model, "trailing", False),
        "leading": (ev.model, "leading", False),
        "trailing + noise correction": (corrected, "trailing", False),
        "trailing + epsilon scaling 1.005": (scaled, "trailing", False),
        "trailing + zero terminal SNR": (ev.model, "trailing", True),
    }


def table(ev: Evidence, judge: metrics.Judge, s: report.Settings) -> list[str]:
    rows = []
    for name, (model, spacing, zsnr) in variants(ev).items():
        for n in s.schedule_steps:
            if name.startswith("KSampler"):
                drawn = ev.draw(data.SEEN, s.per_digit, s.seed, model=model, steps=n, cfg=s.schedule_cfg,
                                scheduler=spacing)
            else:
                drawn = ev.draw(data.SEEN, s.per_digit, s.seed, model=model, steps=n, cfg=s.schedule_cfg,
                                sigmas=sigmas(model, n, spacing, zsnr))
            rows.append(report.measure(judge, drawn, s, f"{name}, {n} steps", name, n))
    plots.series(rows, ("adherence", "FD", "Vendi"), "steps",
                 f"Table 3: schedules, euler, cfg {s.schedule_cfg:g} ({s.per_digit} per digit)",
                 "evidence_schedules.png", xlog=True)
    return report.lines(f"3. Schedules at {', '.join(map(str, s.schedule_steps))} steps (euler, cfg "
                        f"{s.schedule_cfg:g})", rows)
