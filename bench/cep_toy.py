"""CEP on a toy: does conditional embedding perturbation improve W2 and diversity?

Replicates the toy claim of Chen et al. (NeurIPS 2024, "Slight Corruption in Pre-training Data Makes
Better Diffusion Models", Thm. 1-2): training with a perturbed class embedding raises the entropy of
the generated class-conditional distribution and lowers its W2 distance to the truth.

Setup (bench/toy_gmm.py): 4 classes, each a 3-component anisotropic 2-D mixture; an MLP
eps-predictor with a learned N(0, 1) class embedding (d = 32) and CFG dropout 0.1; SD's
scaled-linear VP schedule; deterministic 50-step DDIM. Variants are trained at EQUAL budget and
PAIRED per seed: same initial weights, same batches, timesteps and noise (CEP draws from its own
generator), same sampling noise, same truth draw. CEP is never applied when sampling.

Two data regimes:
- ``finite``: a fixed training set of n points per class, the setting of the paper's theory
  (its W2 gain is Omega(gamma^2 d / n_k), from not collapsing onto the empirical distribution);
- ``fresh``: an exact new draw from the truth every step (infinite data), the control.

Metrics per class, averaged over classes: W2 against an independent truth draw (exact OT,
Hungarian), Kozachenko-Leonenko kNN entropy (k=5, nats); for ``finite`` also the mean distance from
each sample to its nearest training point relative to the same for fresh truth (< 1 means
pulled towards the training points, i.e. memorisation). Deltas are paired by seed.

Run: ``python bench/cep_toy.py`` (full, a few minutes on 2 cores) or ``--quick`` (smoke test).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import toy_gmm as tg
from _common import header, save_figure, setup_logging

log = logging.getLogger("supercond.bench.cep_toy")

CLEAN = "clean"
VARIANTS: dict[str, dict | None] = {
    CLEAN: None,
    "CEP-U g1": dict(gamma=1.0, distribution="uniform"),  # the paper's default gamma
    "CEP-G g1": dict(gamma=1.0, distribution="gaussian"),
    "CEP-G g0.5": dict(gamma=0.5, distribution="gaussian"),  # --sweep
    "CEP-G g2": dict(gamma=2.0, distribution="gaussian"),  # --sweep
}
MAIN_VARIANTS = (CLEAN, "CEP-U g1", "CEP-G g1")


@dataclass(frozen=True)
class Config:
    steps: int
    batch: int
    lr: float
    width: int
    depth: int
    seeds: tuple[int, ...]
    n_eval: int  # samples per class for the metrics
    n_train: int  # training points per class in the finite regime
    sample_steps: int
    cfg_scales: tuple[float, ...]
    variants: tuple[str, ...]
    regimes: tuple[str, ...] = ("finite", "fresh")
    emb_dim: int = 32


FULL = Config(
    steps=2000, batch=256, lr=3e-3, width=128, depth=2, seeds=(0, 1, 2), n_eval=1000, n_train=64,
    sample_steps=50, cfg_scales=(1.0, 3.0), variants=MAIN_VARIANTS,
)
QUICK = Config(
    steps=150, batch=128, lr=3e-3, width=64, depth=1, seeds=(0, 1), n_eval=200, n_train=64,
    sample_steps=20, cfg_scales=(1.0, 3.0), variants=MAIN_VARIANTS,
)


@dataclass
class Run:
    """Metrics of one (regime, variant, seed) model, per CFG scale."""

    w2: dict[float, float]
    entropy: dict[float, float]
    nn_ratio: dict[float, float]
    emb_rms: float
    final_loss: float
    samples: dict[float, list[torch.Tensor]]


def training_source(gmm: tg.GMM, regime: str, n_train: int, seed: int) -> tg.DataSource:
    if regime == "finite":
        return tg.make_dataset(gmm, n_train, seed)
    if regime == "fresh":
        return gmm
    raise ValueError(f"unknown regime {regime!r}")


def nn_ratio(samples: Sequence[torch.Tensor], truth: Sequence[torch.Tensor], data: tg.DataSource) -> float:
    """Mean NN distance of samples to the training points over the same for fresh truth (finite only)."""
    if not isinstance(data, tg.FiniteDataset):
        return float("nan")
    ratios = [
        tg.mean_nn_distance(s, data.class_points(k)) / tg.mean_nn_distance(t, data.class_points(k))
        for k, (s, t) in enumerate(zip(samples, truth, strict=True))
    ]
    return float(np.mean(ratios))


def run_one(
    cfg: Config, gmm: tg.GMM, data: tg.DataSource, truth: list[torch.Tensor], variant: str, seed: int
) -> Run:
    model = tg.make_model(gmm.num_classes, seed, width=cfg.width, depth=cfg.depth, emb_dim=cfg.emb_dim)
    losses = tg.train(model, data, cfg.steps, cfg.batch, cfg.lr, seed, cep=VARIANTS[variant])
    sch = tg.VPSchedule.scaled_linear()
    ts = sch.timesteps(cfg.sample_steps)
    run = Run({}, {}, {}, model.class_emb.weight[:-1].pow(2).mean().sqrt().item(),
              float(np.mean(losses[-max(1, cfg.steps // 10):])), {})
    for s in cfg.cfg_scales:
        x = tg.sample_classes(model, cfg.n_eval, sch, ts, seed, s)
        run.samples[s] = x
        run.w2[s] = tg.per_class_w2(x, truth)
        run.entropy[s] = tg.per_class_entropy(x)
        run.nn_ratio[s] = nn_ratio(x, truth, data)
    return run


@dataclass
class Reference:
    """What the metrics read on the truth itself (per seed)."""

    w2_floor: list[float] = field(default_factory=list)  # truth vs an independent truth draw
    entropy: list[float] = field(default_factory=list)
    w2_memorizer: list[float] = field(default_factory=list)  # training set resampled vs truth


def references(
    gmm: tg.GMM, cfg: Config, regime: str, seed: int, truth: list[torch.Tensor], ref: Reference
) -> None:
    other = tg.truth_samples(gmm, cfg.n_eval, seed + 5000)
    ref.w2_floor.append(tg.per_class_w2(truth, other))
    ref.entropy.append(tg.per_class_entropy(truth))
    if regime != "finite":
        return
    data = tg.make_dataset(gmm, cfg.n_train, seed)
    g = torch.Generator().manual_seed(seed)
    memorized = [
        data.class_points(k)[torch.randint(0, cfg.n_train, (cfg.n_eval,), generator=g)]
        for k in range(gmm.num_classes)
    ]
    ref.w2_memorizer.append(tg.per_class_w2(memorized, truth))


def pm(values: Sequence[float], signed: bool = False) -> str:
    """mean ± std (sample std over seeds); '-' when there is nothing to report."""
    v = np.asarray(values, dtype=float)
    if np.isnan(v).all():
        return "-"
    std = v.std(ddof=1) if len(v) > 1 else 0.0
    return f"{v.mean():{'+' if signed else ''}.3f} ± {std:.3f}"


def log_table(cfg: Config, runs: dict[tuple[str, str, int], Run], refs: dict[str, Reference]) -> None:
    cols = ("W2", "dW2 vs clean", "W2 wins", "entropy", "dH vs clean", "NN/NN_truth", "emb rms")
    log.info("%-7s %-4s %-11s " + " ".join(["%-16s"] * len(cols)), "regime", "cfg", "variant", *cols)
    for regime in cfg.regimes:
        for s in cfg.cfg_scales:
            for v in cfg.variants:
                rs = [runs[regime, v, seed] for seed in cfg.seeds]
                cs = [runs[regime, CLEAN, seed] for seed in cfg.seeds]
                dw = [r.w2[s] - c.w2[s] for r, c in zip(rs, cs, strict=True)]
                dh = [r.entropy[s] - c.entropy[s] for r, c in zip(rs, cs, strict=True)]
                wins = "-" if v == CLEAN else f"{sum(d < 0 for d in dw)}/{len(dw)}"
                log.info(
                    "%-7s %-4s %-11s " + " ".join(["%-16s"] * len(cols)),
                    regime, f"{s:g}", v, pm([r.w2[s] for r in rs]),
                    "-" if v == CLEAN else pm(dw, True), wins, pm([r.entropy[s] for r in rs]),
                    "-" if v == CLEAN else pm(dh, True), pm([r.nn_ratio[s] for r in rs]), pm([r.emb_rms for r in rs]),
                )
        ref = refs[regime]
        mem = f", memorizer (training set resampled) W2 {pm(ref.w2_memorizer)}" if regime == "finite" else ""
        log.info(
            "%-7s reference: truth-vs-truth W2 %s, truth entropy %s%s",
            regime, pm(ref.w2_floor), pm(ref.entropy), mem,
        )


def plot(
    cfg: Config, gmm: tg.GMM, runs: dict[tuple[str, str, int], Run], refs: dict[str, Reference], name: str
) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_reg = len(cfg.regimes)
    fig = plt.figure(figsize=(18, 4.2 * (n_reg + 1)))
    grid = fig.add_gridspec(n_reg + 1, 4)
    panels = (
        ("w2", False, "W2 to truth (lower is better)"),
        ("entropy", False, "kNN entropy, nats"),
        ("w2", True, "W2 minus clean, paired by seed"),
        ("entropy", True, "entropy minus clean, paired by seed"),
    )
    for row, regime in enumerate(cfg.regimes):
        for col, (metric, paired, label) in enumerate(panels):
            ax = fig.add_subplot(grid[row, col])
            _metric_panel(ax, cfg, runs, regime, metric, paired)
            if not paired:
                _reference_lines(ax, refs[regime], regime, metric)
            ax.set_title(f"{regime} data: {label}\n(mean ± std over {len(cfg.seeds)} seeds)", fontsize=9)
            ax.legend(fontsize=6, ncol=2)
    _scatter_row(fig, grid, n_reg, cfg, gmm, runs)
    return str(save_figure(fig, name, dpi=110))


def _metric_panel(ax, cfg: Config, runs: dict, regime: str, metric: str, paired: bool) -> None:
    """One marker with error bar per variant and CFG scale (markers, not bars: entropies are
    negative and the differences are small)."""
    width = 0.7 / len(cfg.variants)
    xs = np.arange(len(cfg.cfg_scales))
    for i, v in enumerate(cfg.variants):
        if paired and v == CLEAN:
            continue
        vals = np.array([
            [getattr(runs[regime, v, sd], metric)[s]
             - (getattr(runs[regime, CLEAN, sd], metric)[s] if paired else 0.0) for sd in cfg.seeds]
            for s in cfg.cfg_scales
        ])
        ax.errorbar(xs + (i - (len(cfg.variants) - 1) / 2) * width, vals.mean(1),
                    yerr=vals.std(1, ddof=1) if len(cfg.seeds) > 1 else None,
                    fmt="o", ms=5, capsize=3, color=f"C{i}", label=v)
    if paired:
        ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xticks(xs, [f"CFG {s:g}" for s in cfg.cfg_scales])


def _reference_lines(ax, ref: Reference, regime: str, metric: str) -> None:
    if metric == "w2":
        ax.axhline(np.mean(ref.w2_floor), color="k", ls="--", lw=1, label="truth vs truth")
        if regime == "finite":
            ax.axhline(np.mean(ref.w2_memorizer), color="r", ls=":", lw=1, label="memorizer")
    else:
        ax.axhline(np.mean(ref.entropy), color="k", ls="--", lw=1, label="truth")


def _scatter_row(fig, grid, row: int, cfg: Config, gmm: tg.GMM, runs: dict) -> None:
    """Class 0 of seed 0 in the first regime: truth (+ training points), clean, CEP-U, CEP-G at CFG 1."""
    regime, seed, k, s = cfg.regimes[0], cfg.seeds[0], 0, cfg.cfg_scales[0]
    truth = tg.truth_samples(gmm, cfg.n_eval, seed + 1000)[k]
    panels = [("truth", truth)] + [(v, runs[regime, v, seed].samples[s][k]) for v in cfg.variants[:3]]
    lim = (truth.min(0).values - 0.4, truth.max(0).values + 0.4)
    train_pts = tg.make_dataset(gmm, cfg.n_train, seed).class_points(k) if regime == "finite" else None
    for col, (name, pts) in enumerate(panels):
        ax = fig.add_subplot(grid[row, col])
        ax.scatter(truth[:, 0], truth[:, 1], s=2, c="0.8", label="truth")
        if name != "truth":
            ax.scatter(pts[:, 0], pts[:, 1], s=2, c="C0", label=name)
        if train_pts is not None:
            ax.scatter(train_pts[:, 0], train_pts[:, 1], s=8, c="r", marker="x", lw=0.7, label="training set")
        ax.set_xlim(lim[0][0], lim[1][0])
        ax.set_ylim(lim[0][1], lim[1][1])
        ax.set_aspect("equal")
        ax.set_title(f"class {k}, {name}, {regime}, CFG {s:g}, seed {seed}", fontsize=8)
        ax.legend(fontsize=6, loc="lower left", markerscale=3)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (seconds)")
    parser.add_argument("--sweep", action="store_true", help="also CEP-G at gamma 0.5 and 2 (~5/3 the time)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, quick 2)")
    parser.add_argument("--cfg", type=float, nargs="+", default=None, help="CFG scales (default 1 3)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per model")
    parser.add_argument("--n-train", type=int, default=None, help="finite regime: points per class")
    args = parser.parse_args(argv)
    setup_logging()
    # Tiny matmuls on a shared machine: one thread is faster and steadier than two.
    torch.set_num_threads(1)
    cfg = QUICK if args.quick else FULL
    cfg = replace(
        cfg,
        variants=tuple(VARIANTS) if args.sweep else cfg.variants,
        seeds=tuple(range(args.seeds)) if args.seeds else cfg.seeds,
        cfg_scales=tuple(args.cfg) if args.cfg else cfg.cfg_scales,
        steps=args.steps or cfg.steps,
        n_train=args.n_train or cfg.n_train,
    )
    log.info(header("CEP toy: clean vs CEP on a class-conditional 2-D GMM" + (" (QUICK)" if args.quick else "")))
    log.info(
        "# %d steps x batch %d, AdamW lr %g cosine, res-MLP %d blocks x %d, emb d=%d, CFG dropout 0.1, seeds %s, "
        "finite n=%d/class, DDIM %d steps (trailing), %d samples/class; entropy = KL kNN k=5 (nats)",
        cfg.steps, cfg.batch, cfg.lr, cfg.depth, cfg.width, cfg.emb_dim, list(cfg.seeds), cfg.n_train,
        cfg.sample_steps, cfg.n_eval,
    )
    log.info("# load average at start %.1f (other work on the machine slows this down)", os.getloadavg()[0])
    t0 = time.time()
    gmm = tg.default_gmm()
    runs: dict[tuple[str, str, int], Run] = {}
    refs = {r: Reference() for r in cfg.regimes}
    for seed in cfg.seeds:
        truth = tg.truth_samples(gmm, cfg.n_eval, seed + 1000)  # independent of any training data
        for regime in cfg.regimes:
            references(gmm, cfg, regime, seed, truth, refs[regime])
            data = training_source(gmm, regime, cfg.n_train, seed)
            for v in cfg.variants:
                runs[regime, v, seed] = run_one(cfg, gmm, data, truth, v, seed)
                log.debug("%s %s seed %d done at %.0f s", regime, v, seed, time.time() - t0)
        log.info("# seed %d done at %.0f s", seed, time.time() - t0)
    log_table(cfg, runs, refs)
    # --quick writes its own file so a smoke run never overwrites the real plot.
    log.info("# plot: %s", plot(cfg, gmm, runs, refs, "cep_toy_quick.png" if args.quick else "cep_toy.png"))
    log.info("# total %.0f s", time.time() - t0)


if __name__ == "__main__":
    main()
