"""Gist single-pass superconditioning vs label dropout + two-pass CFG, on the 2-D toy (issue 6, bench 1).

Two models of the same architecture and size (bench/toy_gmm.py: res-MLP eps-predictor, learned class
embedding) are trained at EQUAL budget and PAIRED per seed: same initial trunk weights, same batches,
timesteps and noise, and the same 10% of samples selected (``swap_captions`` draws its mask exactly
as ``tg.train`` draws its dropout mask):

- ``gist``: two outputs (cond, uncond) from one forward; the selected samples get a label drawn from
  the batch's labels, their own included (``core.head_objective.swap_captions``), and supervise only
  the uncond output, the
  others only the cond output (``gist_loss``). Sampled single-pass: u + s (c - u) from ONE forward.
- ``dropout``: one output; the selected samples get the null class (CFG label dropout). Sampled with
  two-pass CFG (cond and null rows batched together; at s = 1 only the cond pass runs).

Both use the same 50-step DDIM (trailing) and the same starting noise. What "truth" means under
guidance: at s > 1 CFG samples are deliberately NOT the data distribution, so W2 to the data only
measures fidelity at s = 1. The reference at every scale is ``oracle CFG``: the same DDIM with the
exact eps of the noised mixture (``tg.exact_eps``, cond and marginal) combined as CFG; ``W2 oracle``
is the distance to it, and ``gist vs CFG`` compares the two methods directly. ``floor`` columns are
W2 between two oracle draws with different noise (the sampling noise of W2 at this sample size).

Cost: model evaluations per sample (counted with a hook, per step x steps), and seconds per sample,
timed side by side in this process (interleaved, alternating order, medians) at a large batch and at
batch 4 (where a doubled batch costs little more: overhead dominates the tiny MLP).

Run: ``python bench/head_gist_toy.py`` (full, a few minutes on 2 cores) or ``--quick`` (smoke test).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import toy_gmm as tg
from _common import header, save_figure, setup_logging
from cep_toy import pm

log = logging.getLogger("supercond.bench.head_gist_toy")
ho = importlib.import_module("supercond.core.head_objective")

GIST, DROPOUT = "gist 1-pass", "dropout CFG 2-pass"
METHODS = (GIST, DROPOUT)


@dataclass(frozen=True)
class Config:
    steps: int
    batch: int
    lr: float
    width: int
    depth: int
    seeds: tuple[int, ...]
    n_eval: int  # samples per class for the metrics
    sample_steps: int
    scales: tuple[float, ...]
    n_timing: int  # samples per class in the large-batch timing
    repeats: int  # timing repeats per method (medians)
    emb_dim: int = 32
    fraction: float = ho.GIST_FRACTION


FULL = Config(steps=2000, batch=256, lr=3e-3, width=128, depth=2, seeds=(0, 1, 2), n_eval=1000,
              sample_steps=50, scales=(1.0, 1.5, 2.0, 3.0, 5.0), n_timing=250, repeats=5)
QUICK = Config(steps=300, batch=128, lr=3e-3, width=64, depth=2, seeds=(0, 1), n_eval=200,
               sample_steps=20, scales=(1.0, 3.0), n_timing=50, repeats=3)


# ---------------------------------------------------------------------------------------------
# Training and sampling


def train_gist(model: tg.Denoiser, data: tg.DataSource, steps: int, batch: int, lr: float, seed: int,
               fraction: float = ho.GIST_FRACTION, schedule: tg.VPSchedule | None = None) -> list[float]:
    """Train a two-output model (``outputs=2``) with the gist objective, in place; per-step losses.

    Draws from the same stream as ``tg.train`` (same seed: same batches, and the rolled mask is the
    dropout mask), so the two objectives are compared paired.
    """
    schedule = schedule or tg.VPSchedule.scaled_linear()
    gen = tg.seeds.seeded_generator(seed, 0x7EA1)
    draws = tg.seeds.seeded_generator(seed, 0x5A9)  # the swapped labels: off the shared stream

    def step_loss() -> torch.Tensor:
        xt, t, eps, y = tg.noised_batch(data, batch, schedule, gen)
        labels, rolled = ho.swap_captions(y, y, fraction, gen, draws)
        pred_cond, pred_uncond = model(xt, t, model.embed(labels)).chunk(2, dim=-1)
        return ho.gist_loss(pred_cond, pred_uncond, eps, rolled)

    model.train()
    losses = tg.train_loop(model.parameters(), steps, lr, step_loss)
    model.eval()
    return losses


def train_pair(cfg: Config, data: tg.DataSource, seed: int) -> tuple[dict[str, tg.Denoiser], dict[str, float]]:
    """(models, final losses) for both methods at equal budget."""
    kw = dict(width=cfg.width, depth=cfg.depth, emb_dim=cfg.emb_dim)
    gist = tg.make_model(4, seed, outputs=2, **kw)
    drop = tg.make_model(4, seed, **kw)
    tail = max(1, cfg.steps // 10)
    losses = {
        GIST: train_gist(gist, data, cfg.steps, cfg.batch, cfg.lr, seed, cfg.fraction),
        DROPOUT: tg.train(drop, data, cfg.steps, cfg.batch, cfg.lr, seed, cfg_dropout=cfg.fraction),
    }
    return {GIST: gist, DROPOUT: drop}, {k: float(np.mean(v[-tail:])) for k, v in losses.items()}


def sample_method(model: tg.Denoiser, method: str, n_per_class: int, schedule: tg.VPSchedule,
                  timesteps: torch.Tensor, seed: int, scale: float) -> list[torch.Tensor]:
    """n_per_class samples per class; both methods start from the same noise for the same seed."""
    if method == DROPOUT:
        return tg.sample_classes(model, n_per_class, schedule, timesteps, seed, scale)
    labels = torch.arange(model.num_classes).repeat_interleave(n_per_class)
    x = torch.randn(len(labels), 2, generator=tg.seeds.seeded_generator(seed, 0x5A3))
    out = tg.ddim_loop(lambda xt, t: tg.single_pass_eps(model, xt, t, labels, scale), x, schedule, timesteps)
    return list(out.split(n_per_class))


# ---------------------------------------------------------------------------------------------
# Cost


class EvalCounter:
    """Counts passes through a toy model's trunk (a hook on its input layer, which every entry point
    uses once per pass): ``calls`` forward calls and ``rows`` batch rows evaluated."""

    def __init__(self) -> None:
        self.calls = 0
        self.rows = 0

    def __call__(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.calls += 1
        self.rows += output.shape[0]


@contextmanager
def count_evals(model: tg.Denoiser) -> Iterator[EvalCounter]:
    counter = EvalCounter()
    handle = model.inp.register_forward_hook(counter)
    try:
        yield counter
    finally:
        handle.remove()


def evals_per_sample(model: tg.Denoiser, run: Callable[[], object], n_samples: int) -> float:
    """Model evaluations (batch rows through the trunk) per generated sample, over the whole run."""
    with count_evals(model) as counter:
        run()
    return counter.rows / n_samples


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, run side by side: one warm-up each, then
    ``repeats`` rounds, alternating the order every round (shared, noisy machine: ratios, not absolutes)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats):
        for k in (list(fns) if r % 2 == 0 else list(reversed(fns))):
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


@dataclass
class Cost:
    """Per scale and method: evaluations per sample, ms per sample at the large batch and at batch 4."""

    nfe: dict[tuple[float, str], float] = field(default_factory=dict)
    ms_batch: dict[tuple[float, str], float] = field(default_factory=dict)
    ms_single: dict[tuple[float, str], float] = field(default_factory=dict)


def measure_cost(cfg: Config, models: dict[str, tg.Denoiser], schedule: tg.VPSchedule,
                 timesteps: torch.Tensor) -> Cost:
    cost = Cost()
    n_big = cfg.n_timing * 4
    for s in cfg.scales:
        def run(method: str, n: int, s: float = s) -> Callable[[], object]:
            return lambda: sample_method(models[method], method, n, schedule, timesteps, 0, s)

        for m in METHODS:
            cost.nfe[s, m] = evals_per_sample(models[m], run(m, 1), 4)
        big = time_interleaved({m: run(m, cfg.n_timing) for m in METHODS}, cfg.repeats)
        # the latency regime: one sample per class, a batch of 4
        single = time_interleaved({m: run(m, 1) for m in METHODS}, cfg.repeats)
        for m in METHODS:
            cost.ms_batch[s, m] = 1e3 * big[m] / n_big
            cost.ms_single[s, m] = 1e3 * single[m] / 4
    return cost


# ---------------------------------------------------------------------------------------------
# Quality


@dataclass
class SeedResult:
    """Metrics of one seed's pair of models, keyed (scale, method) or scale."""

    w2_truth: dict[tuple[float, str], float] = field(default_factory=dict)
    w2_oracle: dict[tuple[float, str], float] = field(default_factory=dict)
    entropy: dict[tuple[float, str], float] = field(default_factory=dict)
    w2_between: dict[float, float] = field(default_factory=dict)
    oracle_w2_truth: dict[float, float] = field(default_factory=dict)
    oracle_entropy: dict[float, float] = field(default_factory=dict)
    final_loss: dict[str, float] = field(default_factory=dict)
    samples: dict[tuple[float, str], list[torch.Tensor]] = field(default_factory=dict)


def evaluate_seed(cfg: Config, gmm: tg.GMM, seed: int, oracle: dict[float, list[torch.Tensor]]
                  ) -> tuple[SeedResult, dict[str, tg.Denoiser]]:
    sch = tg.VPSchedule.scaled_linear()
    ts = sch.timesteps(cfg.sample_steps)
    truth = tg.truth_samples(gmm, cfg.n_eval, seed + 1000)
    models, final_loss = train_pair(cfg, gmm, seed)
    res = SeedResult(final_loss=final_loss)
    for s in cfg.scales:
        res.oracle_w2_truth[s] = tg.per_class_w2(oracle[s], truth)
        res.oracle_entropy[s] = tg.per_class_entropy(oracle[s])
        for m in METHODS:
            x = sample_method(models[m], m, cfg.n_eval, sch, ts, seed, s)
            res.samples[s, m] = x
            res.w2_truth[s, m] = tg.per_class_w2(x, truth)
            res.w2_oracle[s, m] = tg.per_class_w2(x, oracle[s])
            res.entropy[s, m] = tg.per_class_entropy(x)
        res.w2_between[s] = tg.per_class_w2(res.samples[s, GIST], res.samples[s, DROPOUT])
    return res, models


@dataclass
class Reference:
    truth_floor: list[float] = field(default_factory=list)  # truth vs another truth draw
    truth_entropy: list[float] = field(default_factory=list)
    oracle_floor: dict[float, list[float]] = field(default_factory=dict)  # oracle vs oracle, other noise


def oracle_samples(cfg: Config, gmm: tg.GMM, seed: int) -> dict[float, list[torch.Tensor]]:
    sch = tg.VPSchedule.scaled_linear()
    ts = sch.timesteps(cfg.sample_steps)
    return {s: tg.oracle_sample_classes(gmm, cfg.n_eval, sch, ts, seed, s) for s in cfg.scales}


def add_references(cfg: Config, gmm: tg.GMM, seed: int, oracle: dict, other: dict, ref: Reference) -> None:
    truth = tg.truth_samples(gmm, cfg.n_eval, seed + 1000)
    ref.truth_floor.append(tg.per_class_w2(truth, tg.truth_samples(gmm, cfg.n_eval, seed + 5000)))
    ref.truth_entropy.append(tg.per_class_entropy(truth))
    for s in cfg.scales:
        ref.oracle_floor.setdefault(s, []).append(tg.per_class_w2(oracle[s], other[s]))


# ---------------------------------------------------------------------------------------------
# Report


ROW = "%-5s %-19s %-7s %-16s %-16s %-17s %-16s %-16s"


def log_quality(cfg: Config, results: list[SeedResult], ref: Reference, cost: Cost) -> None:
    log.info("")
    log.info("## quality, mean ± std over seeds %s (%d samples/class, W2 per class, averaged)", list(cfg.seeds), cfg.n_eval)
    log.info(ROW, "scale", "method", "NFE/smp", "W2 truth", "W2 oracle CFG", "entropy (nats)", "gist vs CFG",
             "floor o-vs-o")
    for s in cfg.scales:
        for m in (*METHODS, "oracle CFG"):
            if m == "oracle CFG":
                cells = ("-", pm([r.oracle_w2_truth[s] for r in results]), "0", pm([r.oracle_entropy[s] for r in results]),
                         "-", pm(ref.oracle_floor[s]))
            else:
                cells = (f"{cost.nfe[s, m]:g}", pm([r.w2_truth[s, m] for r in results]), pm([r.w2_oracle[s, m] for r in results]),
                         pm([r.entropy[s, m] for r in results]),
                         pm([r.w2_between[s] for r in results]) if m == GIST else "", "")
            log.info(ROW, f"{s:g}", m, *cells)
    log.info("# references: truth-vs-truth W2 %s, truth entropy %s; final train loss (last 10%%): %s",
             pm(ref.truth_floor), pm(ref.truth_entropy),
             ", ".join(f"{m} {pm([r.final_loss[m] for r in results])}" for m in METHODS))


def log_cost(cfg: Config, cost: Cost) -> None:
    log.info("")
    log.info("## cost per sample (seed 0 models, %d DDIM steps; timed interleaved, median of %d; 1 thread)",
             cfg.sample_steps, cfg.repeats)
    row = "%-5s %-19s %-14s %-22s %-10s %-16s %-10s"
    log.info(row, "scale", "method", "evals/sample", f"ms/sample @batch {cfg.n_timing * 4}", "vs gist",
             "ms/sample @b=4", "vs gist")
    for s in cfg.scales:
        for m in METHODS:
            log.info(row, f"{s:g}", m, f"{cost.nfe[s, m]:g}", f"{cost.ms_batch[s, m]:.4f}",
                     f"{cost.ms_batch[s, m] / cost.ms_batch[s, GIST]:.2f}x", f"{cost.ms_single[s, m]:.3f}",
                     f"{cost.ms_single[s, m] / cost.ms_single[s, GIST]:.2f}x")


def plot(cfg: Config, results: list[SeedResult], ref: Reference, cost: Cost, name: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(19, 9))
    xs = np.array(cfg.scales)
    panels = (("w2_truth", "W2 to the data (fidelity only at s = 1)"),
              ("w2_oracle", "W2 to oracle CFG at the same scale"),
              ("entropy", "kNN entropy per class, nats"))
    for ax, (metric, title) in zip(axes[0, :3], panels, strict=True):
        for i, m in enumerate(METHODS):
            _errorbar(ax, xs, [[getattr(r, metric)[s, m] for r in results] for s in cfg.scales], f"C{i}", m)
        if metric == "w2_truth":
            _errorbar(ax, xs, [[r.oracle_w2_truth[s] for r in results] for s in cfg.scales], "k", "oracle CFG", "--")
            ax.axhline(np.mean(ref.truth_floor), color="0.5", ls=":", lw=1, label="truth vs truth")
        if metric == "entropy":
            _errorbar(ax, xs, [[r.oracle_entropy[s] for r in results] for s in cfg.scales], "k", "oracle CFG", "--")
        ax.set_title(f"{title}\n(mean ± std over {len(cfg.seeds)} seeds)", fontsize=9)
    ax = axes[0, 3]
    _errorbar(ax, xs, [[r.w2_between[s] for r in results] for s in cfg.scales], "C2", "gist vs dropout-CFG")
    _errorbar(ax, xs, [ref.oracle_floor[s] for s in cfg.scales], "k", "floor: oracle vs oracle (other noise)", "--")
    ax.set_title("W2 between the two methods' samples", fontsize=9)
    for ax in axes[0]:
        ax.set_xlabel("guidance scale")
        ax.legend(fontsize=7)
    s_show = 3.0 if 3.0 in cfg.scales else cfg.scales[-1]
    for ax, m in zip(axes[1, :2], METHODS, strict=True):
        _scatter(ax, results[0].samples[s_show, m], f"{m}, scale {s_show:g}, seed {cfg.seeds[0]}")
    _scatter(ax=axes[1, 2], pts=results[0].samples[cfg.scales[0], GIST],
             title=f"{GIST}, scale {cfg.scales[0]:g}, seed {cfg.seeds[0]}")
    _cost_panel(axes[1, 3], cfg, cost)
    return str(save_figure(fig, name))


def _errorbar(ax, xs: np.ndarray, vals: Sequence[Sequence[float]], color: str, label: str, ls: str = "-") -> None:
    v = np.asarray(vals, dtype=float)
    std = v.std(1, ddof=1) if v.shape[1] > 1 else None
    ax.errorbar(xs, v.mean(1), yerr=std, fmt="o", ls=ls, ms=4, capsize=3, color=color, label=label)


def _scatter(ax, pts: list[torch.Tensor], title: str) -> None:
    for k, p in enumerate(pts):
        ax.scatter(p[:, 0], p[:, 1], s=1, c=f"C{k}")
    ax.set_aspect("equal")
    ax.set_xlim(-2.6, 2.6)
    ax.set_ylim(-2.6, 2.6)
    ax.set_title(title, fontsize=9)


def _cost_panel(ax, cfg: Config, cost: Cost) -> None:
    xs = np.arange(len(cfg.scales))
    for i, m in enumerate(METHODS):
        ax.bar(xs + (i - 0.5) * 0.38, [cost.ms_batch[s, m] * 1e3 for s in cfg.scales], 0.38, color=f"C{i}", label=m)
    ax.set_xticks(xs, [f"s={s:g}" for s in cfg.scales])
    ax.set_ylabel(f"µs per sample @ batch {cfg.n_timing * 4}")
    ax.set_title("cost per sample (median, interleaved)", fontsize=9)
    ax.legend(fontsize=7)


# ---------------------------------------------------------------------------------------------


@dataclass
class BenchResult:
    cfg: Config
    results: list[SeedResult]
    ref: Reference
    cost: Cost
    models: dict[str, tg.Denoiser]  # the first seed's


def run(cfg: Config) -> BenchResult:
    """Train, sample and measure every seed; the cost on the first seed's models."""
    gmm = tg.default_gmm()
    ref = Reference()
    results: list[SeedResult] = []
    first: dict[str, tg.Denoiser] = {}
    t0 = time.time()
    for seed in cfg.seeds:
        oracle = oracle_samples(cfg, gmm, seed)
        add_references(cfg, gmm, seed, oracle, oracle_samples(cfg, gmm, seed + 7000), ref)
        res, models = evaluate_seed(cfg, gmm, seed, oracle)
        results.append(res)
        first = first or models
        log.info("# seed %d done at %.0f s", seed, time.time() - t0)
    sch = tg.VPSchedule.scaled_linear()
    cost = measure_cost(cfg, first, sch, sch.timesteps(cfg.sample_steps))
    return BenchResult(cfg, results, ref, cost, first)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (seconds)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, quick 2)")
    parser.add_argument("--scales", type=float, nargs="+", default=None, help="guidance scales")
    parser.add_argument("--steps", type=int, default=None, help="training steps per model")
    args = parser.parse_args(argv)
    setup_logging()
    torch.set_num_threads(1)  # tiny matmuls on a shared machine: one thread is faster and steadier
    cfg = QUICK if args.quick else FULL
    cfg = replace(cfg, seeds=tuple(range(args.seeds)) if args.seeds else cfg.seeds,
                  scales=tuple(args.scales) if args.scales else cfg.scales, steps=args.steps or cfg.steps)
    log.info(header("Gist single-pass vs dropout two-pass CFG on a class-conditional 2-D GMM"
                    + (" (QUICK)" if args.quick else "")))
    log.info("# %d steps x batch %d, AdamW lr %g cosine, res-MLP %d blocks x %d, emb d=%d, %.0f%% rolled/dropped "
             "(paired masks), seeds %s, DDIM %d steps (trailing), fresh data every step",
             cfg.steps, cfg.batch, cfg.lr, cfg.depth, cfg.width, cfg.emb_dim, 100 * cfg.fraction,
             list(cfg.seeds), cfg.sample_steps)
    log.info("# load average at start %.1f (other work on the machine slows this down)", os.getloadavg()[0])
    t0 = time.time()
    bench = run(cfg)
    log_quality(cfg, bench.results, bench.ref, bench.cost)
    log_cost(cfg, bench.cost)
    name = "head_gist_toy_quick.png" if args.quick else "head_gist_toy.png"
    log.info("# plot: %s", plot(cfg, bench.results, bench.ref, bench.cost, name))
    log.info("# total %.0f s", time.time() - t0)


if __name__ == "__main__":
    main()
