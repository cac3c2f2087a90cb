"""Fitting a sampling schedule to a model: the optimal-stepsize dynamic programme (Pei et al. 2025,
arXiv 2503.21774) and AYS-style log-linear interpolation. Pure torch, no ComfyUI.

The fit sees the model only as a denoiser ``D(x, sigma) -> denoised`` in ComfyUI's sampler coordinates
(k-diffusion: ``d = (x - D) / sigma``; one sigma per batch row, as a sampler passes them), so one
programme serves eps, v and flow models. A teacher runs
the solver over a fine grid of sigmas (``teacher_steps``); the student's schedule is a subset of that
grid with ``steps`` steps, from its first sigma to its last (0). The programme keeps, for every grid
point j and step count k, the student state that lands closest to the teacher's state at j among
all k-step paths' last hops; the schedule is traced back from the teacher's end at ``steps`` steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

SOLVERS: tuple[str, ...] = ("euler", "dpmpp_2m")
METHODS: tuple[str, ...] = ("optimal_stepsize",)

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x (R, ...), sigma (R,)) -> denoised
Progress = Callable[[int], None]  # called with the model evaluations (batch rows) done so far


class FitError(ValueError):
    """Bad input to the fit: the message says what was wrong and what to do."""


@dataclass
class Node:
    """A solver state on the grid: x, and what a multistep solver carries (the previous denoised and its
    sigma; None at the start)."""

    x: torch.Tensor
    old: torch.Tensor | None = None
    old_sigma: float | None = None


def check(steps: int, teacher_steps: int, solver: str) -> None:
    if steps < 2:
        raise FitError(f"steps must be at least 2 (the schedule's step count), got {steps}")
    if teacher_steps <= steps:
        raise FitError(f"teacher_steps ({teacher_steps}) must be larger than steps ({steps}): the fit picks the "
                       "student's sigmas from the teacher's finer grid (e.g. teacher_steps 100 for 10 steps)")
    if solver not in SOLVERS:
        raise FitError(f"the fit supports the samplers {list(SOLVERS)}, not {solver!r}: fit for the one whose "
                       "update you sample with (euler serves euler_ancestral-free first-order samplers)")


def step(solver: str, node: Node, denoised: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """One solver update from ``node`` at ``sigma`` to ``sigma_next``, as ComfyUI's k-diffusion sampler
    writes it (``sample_euler`` without churn, ``sample_dpmpp_2m``)."""
    x = node.x
    if solver == "euler":
        return x + (x - denoised) / sigma * (sigma_next - sigma)
    if sigma_next == 0:
        return denoised
    t, t_next = -math.log(sigma), -math.log(sigma_next)
    h = t_next - t
    if node.old is None:
        d = denoised
    else:
        r = (t - (-math.log(node.old_sigma))) / h
        d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * node.old
    return (sigma_next / sigma) * x - math.expm1(-h) * d


def solve(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, solver: str) -> list[torch.Tensor]:
    """Run the solver over ``sigmas``; the state at every sigma (len(sigmas) tensors, the last the sample)."""
    node, states = Node(x), [x]
    s = [float(v) for v in sigmas]
    for i in range(len(s) - 1):
        den = denoise(node.x, x.new_full((len(x),), s[i]))
        node = Node(step(solver, node, den, s[i], s[i + 1]), den, s[i])
        states.append(node.x)
    return states


@dataclass(frozen=True)
class Fit:
    indices: tuple[int, ...]  # into the grid, 0 first and len(grid) - 1 last
    sigmas: torch.Tensor  # the schedule: grid[indices], float64, ends at 0
    error: float  # mean squared distance of the student's final sample to the teacher's
    calls: int  # denoiser evaluations, counted in batch rows
    searched: bool = True  # False: the evenly spaced subset of the grid was closer, and is returned instead


def optimal_stepsize(denoise: Denoiser, x: torch.Tensor, grid: torch.Tensor, steps: int, solver: str = "euler",
                     progress: Progress | None = None, batch: int = 64) -> Fit:
    """The dynamic programme. ``x``: the noisy starts (B, ...) at ``grid[0]``; ``grid``: the teacher's
    decreasing sigmas ending at 0. ``batch``: at most this many rows per denoiser call."""
    n = len(grid) - 1
    check(steps, n, solver)
    g = [float(v) for v in grid]
    if any(a <= b for a, b in zip(g, g[1:], strict=False)) or g[-1] != 0:
        raise FitError("the teacher's sigmas must be strictly decreasing and end at 0")
    calls = 0

    per_call = max(1, batch // len(x))  # states per denoiser call

    def counted(rows: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        out = denoise(rows, sigma)
        calls += len(rows)
        if progress is not None:
            progress(calls)
        return out

    def run(nodes: list[tuple[int, Node]]) -> list[torch.Tensor]:
        """The denoised of many states, batched: ``nodes`` as (grid index, state)."""
        out = []
        for start in range(0, len(nodes), per_call):
            chunk = nodes[start:start + per_call]
            sigma = torch.tensor([g[i] for i, _ in chunk], dtype=x.dtype).repeat_interleave(len(x))
            out += list(counted(torch.cat([node.x for _, node in chunk]), sigma).split(len(x)))
        return out

    teacher = solve(counted, x, grid, solver)  # over the whole grid, counted like the search
    reached: dict[int, Node] = {0: Node(x)}
    parents: list[dict[int, int]] = []
    for k in range(1, steps + 1):
        # a state at step k-1 must leave room for the remaining steps; targets likewise
        sources = sorted(i for i in reached if i <= n - (steps - k + 1))
        denoised = run([(i, reached[i]) for i in sources])
        last = n - (steps - k)
        best: dict[int, tuple[float, int, Node]] = {}
        for i, den in zip(sources, denoised, strict=True):
            targets = range(last, last + 1) if k == steps else range(i + 1, last + 1)
            for j in targets:
                xj = step(solver, reached[i], den, g[i], g[j])
                cost = float((xj - teacher[j]).double().square().mean())
                if j not in best or cost < best[j][0]:
                    best[j] = (cost, i, Node(xj, den, g[i]))
        parents.append({j: b[1] for j, b in best.items()})
        reached = {j: b[2] for j, b in best.items()}
    indices = [n]
    for k in reversed(range(steps)):
        indices.append(parents[k][indices[-1]])
    indices.reverse()
    error = float((reached[n].x - teacher[n]).double().square().mean())
    # The programme keeps one state per grid point (the closest there), which is exact for euler on the
    # Gaussian tests but not for every model and solver: never return worse than the evenly spaced subset
    # (ComfyUI's `simple` at ``steps`` when the grid is `simple` at a multiple of it), checked on the same starts.
    even = [round(i * n / steps) for i in range(steps + 1)]
    even_error = float((solve(counted, x, grid[even], solver)[-1] - teacher[n]).double().square().mean())
    if even_error < error:
        indices, error = even, even_error
    return Fit(tuple(indices), torch.tensor([g[i] for i in indices], dtype=torch.float64), error, calls,
               searched=indices is not even)


def loglinear(sigmas: torch.Tensor, steps: int, sigma_min: float) -> torch.Tensor:
    """A schedule fitted for another step count, as AYS interpolates its presets: the sigmas with the
    final 0 read as ``sigma_min``, log-linearly interpolated to ``steps + 1`` points, the last set to 0.
    A schedule already ``steps`` long is returned as is."""
    if steps < 1:
        raise FitError(f"steps must be at least 1, got {steps}")
    s = sigmas.double().clone()
    if len(s) == steps + 1:
        return s
    if s[-1] == 0:
        s[-1] = sigma_min
    if bool((s <= 0).any()):
        raise FitError("a schedule to interpolate needs positive sigmas before its final 0")
    ys = s.log().flip(0)
    xs = torch.linspace(0, 1, len(s), dtype=torch.float64)
    new = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    # numpy.interp's piecewise-linear rule, which AYS uses
    idx = torch.searchsorted(xs, new, right=True).clamp(1, len(xs) - 1)
    x0, x1, y0, y1 = xs[idx - 1], xs[idx], ys[idx - 1], ys[idx]
    out = (y0 + (y1 - y0) * (new - x0) / (x1 - x0)).exp().flip(0)
    out[-1] = 0
    return out
