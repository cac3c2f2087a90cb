"""Table 1: single-pass heads against two-pass CFG and the peers that cut its cost.

At each guidance scale, with the same prompts and seeds: two-pass CFG at N steps (2N calls) and at
N/2 steps (N calls, what single-pass costs), a projection and a last_block head distilled with
SupercondTrainHead and sampled with SupercondSinglePass (N calls), adaptive guidance and a guidance
interval (peers.py; their calls are counted), and ComfyUI's caches under CFG and under the head. The
questions: does single-pass at N steps stay inside two-pass CFG's interval at N steps, and how does it compare with CFG at the same calls (N/2 steps)
and with the peers, which spend more? Calls count diffusion-model runs; a last_block head also runs
one copied output block per call, which the ms/image column (sampler time) shows."""

from __future__ import annotations

import torch

from . import artifacts, data, metrics, peers, plots, report
from .sampling import Evidence

HEADS = ("projection", "last_block")


def heads(ev: Evidence, s: report.Settings) -> dict[str, object]:
    """Head type -> the evidence MODEL with that distilled head, through SupercondSinglePass."""
    from supercond.nodes.singlepass.nodes import SupercondSinglePass

    return {h: SupercondSinglePass.execute(artifacts.distilled_head(ev, artifacts.HeadRecipe(h, s.head_steps)), 0,
                                           "head").result[0] for h in HEADS}


def methods(ev: Evidence, single: dict[str, object], steps: int, peers_too: bool = True) -> dict[str, dict]:
    """Name -> Evidence.draw arguments (besides cfg)."""
    lo, hi = peers.INTERVAL
    out = {
        f"two-pass CFG, {steps} steps": {"steps": steps},
        f"two-pass CFG, {steps // 2} steps": {"steps": steps // 2},
        f"single-pass projection head, {steps} steps": {"steps": steps, "model": single["projection"]},
        f"single-pass last_block head, {steps} steps": {"steps": steps, "model": single["last_block"]},
    }
    if peers_too:
        out[f"adaptive guidance {peers.AG_THRESHOLD:g}, {steps} steps"] = {
            "steps": steps, "guider": peers.adaptive_guider(), "batch_per_digit": True}
        out[f"guidance interval ({lo:g}, {hi:g}], {steps} steps"] = {"steps": steps,
                                                                    "model": peers.guidance_interval(ev.model)}
        out[f"two-pass CFG + LazyCache, {steps} steps"] = {"steps": steps, "model": peers.cached(ev.model, "LazyCache")}
        for cache in ("LazyCache", "EasyCache"):
            out[f"single-pass last_block head + {cache}, {steps} steps"] = {
                "steps": steps, "model": peers.cached(single["last_block"], cache)}
    return out


def table(ev: Evidence, judge: metrics.Judge, s: report.Settings) -> list[str]:
    single = heads(ev, s)
    rows = [report.measure(judge, ev.draw(data.SEEN, s.per_digit, s.seed, steps=s.steps, cfg=1.0), s,
                           f"cfg 1 (no guidance), {s.steps} steps", "cfg 1", 1.0)]
    grid_scale = min(s.scales, key=lambda c: abs(c - 5.0))
    main, verdicts, shown = _rows(ev, judge, s, methods(ev, single, s.steps), s.steps, grid_scale)
    few, few_verdicts, _ = _rows(ev, judge, s, methods(ev, single, s.few_steps, peers_too=False), s.few_steps)
    rows += main
    plots.series(main + few, ("adherence", "FD", "Vendi", "FD"), "guidance scale",
                 f"Table 1: single-pass vs two-pass CFG and peers ({s.per_digit} images per digit)",
                 "evidence_guidance.png", against=(None, None, None, "calls"))
    plots.grid(shown, f"cfg {grid_scale:g}, same seeds: the first image of each digit", "evidence_guidance_grid.png")
    columns = ("adherence", "FD", "Vendi", "nn-dist ratio", "ms/image")
    note = ("FD to the held-out digits grows with the guidance scale here (guidance sharpens each digit beyond the "
            "handwriting's spread), so a row whose FD is below CFG's at the same scale is guided more weakly; "
            "Vendi says the same from the diversity side.")
    return [*report.lines("1. Single-pass heads vs two-pass CFG and its peers", rows, columns), "", *verdicts, note, "",
            *report.lines(f"1b. The same at {s.few_steps} steps, where halving the steps costs quality", few,
                          columns), "", *few_verdicts]


def _rows(ev: Evidence, judge: metrics.Judge, s: report.Settings, todo: dict[str, dict], steps: int,
          grid_scale: float | None = None) -> tuple[list[report.Row], list[str], dict[str, torch.Tensor]]:
    """Every method at every scale: (rows, a verdict per scale, the grid's images at ``grid_scale``)."""
    rows, verdicts, shown = [], [], {}
    for scale in s.scales:
        at = {}
        for name, kw in todo.items():
            drawn = ev.draw(data.SEEN, s.per_digit, s.seed, cfg=scale, **kw)
            at[name] = report.measure(judge, drawn, s, f"{name}, cfg {scale:g}", name, scale)
            if scale == grid_scale:
                shown[name] = drawn.pixels[:: s.per_digit]  # the first image of each digit
        rows += at.values()
        verdicts.append(verdict(at, scale, steps))
    return rows, verdicts, shown


def verdict(at: dict[str, report.Row], scale: float, steps: int) -> str:
    """Per head: which of adherence, FD and Vendi lie inside two-pass CFG's interval at the same steps,
    and how its FD compares with CFG at half the steps (the same calls)."""
    full, half = at[f"two-pass CFG, {steps} steps"].rep, at[f"two-pass CFG, {steps // 2} steps"].rep
    parts = []
    for h in HEADS:
        rep = at[f"single-pass {h} head, {steps} steps"].rep
        pairs = (("adherence", rep.adherence, full.adherence), ("FD", rep.fd, full.fd), ("Vendi", rep.vendi, full.vendi))
        inside = [name for name, mine, ref in pairs if ref.low <= mine.value <= ref.high]
        if rep.fd.high < half.fd.low:
            equal = "lower FD than"
        elif rep.fd.low > half.fd.high:
            equal = "higher FD than"
        else:
            equal = "FD intervals overlap with"
        parts.append(f"{h}: {', '.join(inside) if inside else 'none'} inside CFG's interval; {equal} CFG at "
                     f"{steps // 2} steps")
    return f"- cfg {scale:g}: " + "; ".join(parts)
