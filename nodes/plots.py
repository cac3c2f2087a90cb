"""Small matplotlib figures returned as ComfyUI IMAGE tensors ([1, H, W, 3], float in [0, 1])."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def line_plot(
    series: Sequence[tuple[str, Sequence[float], Sequence[float]]],
    title: str,
    xlabel: str,
    ylabel: str,
    logy: bool = False,
    size: tuple[float, float] = (6.4, 4.0),
) -> torch.Tensor:
    """One labelled line per (label, xs, ys); returns the figure as an IMAGE."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=size, dpi=100)
    canvas = FigureCanvasAgg(fig)  # explicit: never depends on (or changes) the global backend
    ax = fig.add_subplot(1, 1, 1)
    for label, xs, ys in series:
        ax.plot(list(xs), list(ys), marker="o", markersize=3, label=label)
    if logy:
        ax.set_yscale("symlog", linthresh=1e-3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return torch.from_numpy(rgba[..., :3].copy()).float().div(255.0).unsqueeze(0)
