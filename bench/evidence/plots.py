"""The tables' pictures: figures against a setting with their 95% intervals, and sample grids."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from . import metrics, report

PANELS = {"adherence": "adherence (classifier reads the prompted digit)", "FD": "FD to held-out digits (lower is closer)",
          "Vendi": "Vendi score (within-prompt diversity)", "nn-dist ratio": "nearest-training distance ratio",
          "calls": "diffusion-model calls per image"}


def _figure(metric: str, row: report.Row) -> metrics.Figure | None:
    if metric == "calls":
        return metrics.Figure(row.calls, row.calls, row.calls)
    if metric in row.extra:
        return row.extra[metric]
    return report.COLUMNS[metric](row) if row.rep is not None else None


def series(rows: Sequence[report.Row], panels: Sequence[str], xlabel: str, title: str, name: str,
           xlog: bool = False, against: Sequence[str | None] = ()) -> Path:
    """One panel per metric; one line per method over its rows' x, with interval bars. ``against``: per
    panel, another metric to plot against instead of x (e.g. diversity against adherence)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from _common import save_figure

    methods = list(dict.fromkeys(r.method for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for p, (ax, metric) in enumerate(zip(axes[0], panels, strict=True)):
        scatter_x = against[p] if p < len(against) else None
        for i, method in enumerate(methods):
            pts = [(r, _figure(metric, r)) for r in rows if r.method == method]
            pts = [(r, f) for r, f in pts if f is not None]
            if not pts:
                continue
            xs = [(_figure(scatter_x, r).value if scatter_x else r.x) for r, _ in pts]
            ys = [f.value for _, f in pts]
            # a percentile interval need not hold the full-set value (tiny or degenerate sets): clip the bars
            err = [[max(0.0, f.value - f.low) for _, f in pts], [max(0.0, f.high - f.value) for _, f in pts]]
            if scatter_x:
                style = "o"  # points against another figure: no line
            else:
                style = "o-" if len(pts) > 1 else "s"
            ax.errorbar(xs, ys, yerr=err, fmt=style, capsize=3, ms=4, label=method, color=f"C{i % 10}")
        ax.set_title(PANELS.get(metric, metric), fontsize=9)
        ax.set_xlabel(PANELS.get(scatter_x, scatter_x) if scatter_x else xlabel, fontsize=9)
        if xlog:
            ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, name)


def grid(images: dict[str, torch.Tensor], title: str, name: str) -> Path:
    """Rows = settings, columns = images (8x8 ink, white on black as rendered)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from _common import save_figure

    cols = max(len(v) for v in images.values())
    fig, axes = plt.subplots(len(images), 1, figsize=(0.55 * cols + 2.6, 0.62 * len(images) + 0.5), squeeze=False)
    for ax, (label, pix) in zip(axes[:, 0], images.items(), strict=True):
        strip = torch.cat([torch.nn.functional.pad(p, (1, 1, 1, 1), value=0.35) for p in pix], dim=1)
        ax.imshow(strip.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, name)
