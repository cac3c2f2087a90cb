"""A distilled unconditional head on a frozen toy model: how close is single-pass to two-pass CFG? (issue 6, bench 2)

Teacher: the toy eps-predictor of bench/toy_gmm.py trained with 10% label dropout (null class), then
frozen. Head: a copy of the teacher's tail that reads the features of the CONDITIONAL pass and
predicts the teacher's null-class output u, so guided = u_hat + s (c - u_hat) needs one trunk pass:

- ``proj``: a copy of the last layer (silu + linear) on the final hidden state;
- ``block``: a copy of the last residual block + last layer on the hidden state before that block
  (and the conditional pass's condition vector, time + class).

Both start from the base weights, so a fresh head returns c (rel_delta = 1: guidance off). Trained
with ``core.head_objective.distill_loss`` (per-sample weight (s - 1)^2 + floor for s ~ U[cfg_min,
cfg_max] from ``sample_scales``) on x_t from either

- ``data``: noised exact data at uniform timesteps (s only weights the loss: it is independent of
  x_t there, so the weighting only adds variance), or
- ``policy``: the teacher's own CFG-guided DDIM trajectories, each at its own s (on-policy: the x_t
  the head meets when sampling; here the weighting favours the high-s trajectories);

plus the ablation ``block/policy unweighted`` (plain MSE: ``distill_loss`` at s = 1 on [1, 1]).

Evaluation on held-out teacher CFG trajectories at each scale (other noise than training):
``guidance_errors`` per sigma bin (bins of consecutive DDIM steps, high sigma first) and overall:
``rel_delta`` = |u_hat - u| / |c - u| (the guidance direction, scale-free) and ``rel_guided`` =
|g_hat - g| / |g| (what the sampler uses). Then full single-pass sampling from the same noise as
two-pass CFG: W2 between them, their paired RMS displacement (same start, deterministic DDIM), and
W2 of each to the data and to oracle CFG (exact eps of the mixture, see bench/head_gist_toy.py:
at s > 1 the data are not the target).

Run: ``python bench/head_distill_toy.py`` (full, a few minutes on 2 cores) or ``--quick`` (smoke test).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import toy_gmm as tg
from _common import header, save_figure, setup_logging
from cep_toy import pm
from head_gist_toy import count_evals
from torch import nn

log = logging.getLogger("supercond.bench.head_distill_toy")
ho = importlib.import_module("supercond.core.head_objective")

PROJ, BLOCK = "proj", "block"
FRESH, TWO_PASS = "fresh head", "two-pass CFG"


@dataclass(frozen=True)
class Variant:
    head: str  # PROJ | BLOCK
    source: str  # "data" | "policy"
    weighted: bool = True


VARIANTS: dict[str, Variant] = {
    "proj/data": Variant(PROJ, "data"),
    "proj/policy": Variant(PROJ, "policy"),
    "block/data": Variant(BLOCK, "data"),
    "block/policy": Variant(BLOCK, "policy"),
    "block/policy unw.": Variant(BLOCK, "policy", weighted=False),
}


@dataclass(frozen=True)
class Config:
    steps: int  # teacher
    batch: int
    lr: float
    width: int
    depth: int
    seeds: tuple[int, ...]
    head_steps: int
    head_batch: int
    head_lr: float
    pool_per_class: int  # on-policy trajectories per class
    n_eval: int  # samples (= eval trajectories) per class per scale
    sample_steps: int
    scales: tuple[float, ...]
    sigma_bins: int
    variants: tuple[str, ...] = tuple(VARIANTS)
    cfg_min: float = 1.0
    cfg_max: float = 8.0
    emb_dim: int = 32


FULL = Config(steps=2000, batch=256, lr=3e-3, width=128, depth=2, seeds=(0, 1, 2), head_steps=1500,
              head_batch=256, head_lr=1e-3, pool_per_class=512, n_eval=500, sample_steps=50,
              scales=(1.5, 2.0, 3.0, 5.0, 8.0), sigma_bins=5)
QUICK = Config(steps=300, batch=128, lr=3e-3, width=64, depth=2, seeds=(0,), head_steps=300,
               head_batch=128, head_lr=1e-3, pool_per_class=64, n_eval=100, sample_steps=20,
               scales=(2.0, 5.0), sigma_bins=4, variants=("proj/policy", "block/policy"))


# ---------------------------------------------------------------------------------------------
# The head


@dataclass
class CondPass:
    """What one conditional pass of the teacher gives: the hidden state before the last block, the
    condition vector, the final hidden state and the conditional prediction c."""

    h_pre: torch.Tensor
    c_vec: torch.Tensor
    h_final: torch.Tensor
    cond: torch.Tensor


def cond_pass(teacher: tg.Denoiser, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> CondPass:
    h_pre, c_vec = teacher.trunk(x, t, teacher.embed(labels), num_blocks=len(teacher.blocks) - 1)
    h = teacher.block(-1, h_pre, c_vec)
    return CondPass(h_pre, c_vec, h, teacher.project(h))


class DistilledHead(nn.Module):
    """A copy of the teacher's tail (last layer, or last block + last layer), initialised from its
    weights: a fresh head reproduces the conditional prediction exactly."""

    def __init__(self, teacher: tg.Denoiser, kind: str) -> None:
        super().__init__()
        if kind not in (PROJ, BLOCK):
            raise ValueError(f"head kind must be {PROJ!r} or {BLOCK!r}, got {kind!r}")
        self.kind = kind
        self.block = copy.deepcopy(teacher.blocks[-1]) if kind == BLOCK else None
        self.out = copy.deepcopy(teacher.out)
        self.requires_grad_(True)

    def forward(self, f: CondPass) -> torch.Tensor:
        h = tg.residual_block(self.block, f.h_pre, f.c_vec) if self.block is not None else f.h_final
        return self.out(nn.functional.silu(h))


def two_pass(teacher: tg.Denoiser, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(c, u): the teacher's conditional and null-class predictions, batched as CFG does."""
    emb = torch.cat([teacher.embed(labels), teacher.embed(torch.full_like(labels, teacher.null_label))])
    return teacher(torch.cat([x, x]), torch.cat([t, t]), emb).chunk(2)


def single_pass_eps(teacher: tg.Denoiser, head: DistilledHead, x: torch.Tensor, t: torch.Tensor,
                    labels: torch.Tensor, scale: float) -> torch.Tensor:
    """u_hat + s (c - u_hat) from ONE trunk pass plus the head."""
    f = cond_pass(teacher, x, t, labels)
    u_hat = head(f)
    return u_hat + scale * (f.cond - u_hat)


# ---------------------------------------------------------------------------------------------
# Training


@dataclass
class Pool:
    """On-policy training points: x_t along teacher CFG trajectories, with their t, label and scale."""

    x: torch.Tensor
    t: torch.Tensor
    labels: torch.Tensor
    scales: torch.Tensor

    def batch(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        idx = torch.randint(0, len(self.t), (n,), generator=gen)
        return self.x[idx], self.t[idx], self.labels[idx], self.scales[idx]


@torch.no_grad()
def policy_pool(teacher: tg.Denoiser, cfg: Config, schedule: tg.VPSchedule, seed: int) -> Pool:
    """Teacher CFG-guided DDIM trajectories, each at its own scale from ``sample_scales``."""
    gen = tg.seeds.seeded_generator(seed, 0x9001)
    labels = torch.arange(teacher.num_classes).repeat_interleave(cfg.pool_per_class)
    scales = ho.sample_scales(len(labels), cfg.cfg_min, cfg.cfg_max, gen)

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        c, u = two_pass(teacher, x, t, labels)
        return ho.guided(c, u, scales.unsqueeze(1))

    record: list[tuple[int, torch.Tensor]] = []
    tg.ddim_loop(eps_fn, torch.randn(len(labels), 2, generator=gen), schedule,
                 schedule.timesteps(cfg.sample_steps), record)
    n = len(record)
    return Pool(torch.cat([x for _, x in record]), torch.cat([torch.full((len(labels),), t) for t, _ in record]),
                labels.repeat(n), scales.repeat(n))


def train_head(teacher: tg.Denoiser, variant: Variant, cfg: Config, gmm: tg.GMM, pool: Pool | None,
               seed: int) -> tuple[DistilledHead, list[float]]:
    """A head distilled from the frozen teacher; (head, per-step losses)."""
    sch = tg.VPSchedule.scaled_linear()
    head = DistilledHead(teacher, variant.head)
    gen = tg.seeds.seeded_generator(seed, 0xD157)
    null = torch.full((cfg.head_batch,), teacher.null_label)

    def step_loss() -> torch.Tensor:
        if variant.source == "data":
            xt, t, _, y = tg.noised_batch(gmm, cfg.head_batch, sch, gen)
            scales = ho.sample_scales(cfg.head_batch, cfg.cfg_min, cfg.cfg_max, gen)
        else:
            xt, t, y, scales = pool.batch(cfg.head_batch, gen)
        with torch.no_grad():
            f = cond_pass(teacher, xt, t, y)
            u = teacher(xt, t, teacher.embed(null))
        u_hat = head(f)
        if variant.weighted:
            return ho.distill_loss(u_hat, u, scales, cfg.cfg_min, cfg.cfg_max)
        return ho.distill_loss(u_hat, u, torch.ones_like(scales), 1.0, 1.0)  # weight 1: plain MSE

    losses = tg.train_loop(head.parameters(), cfg.head_steps, cfg.head_lr, step_loss)
    return head.eval(), losses


# ---------------------------------------------------------------------------------------------
# Evaluation


@dataclass
class SeedResult:
    """Keyed (variant, scale) or (variant, scale, bin); bin "all" is every step."""

    rel_delta: dict[tuple, float] = field(default_factory=dict)
    rel_guided: dict[tuple, float] = field(default_factory=dict)
    w2_two_pass: dict[tuple[str, float], float] = field(default_factory=dict)  # single vs two-pass
    rms_paired: dict[tuple[str, float], float] = field(default_factory=dict)
    w2_truth: dict[tuple[str, float], float] = field(default_factory=dict)
    w2_oracle: dict[tuple[str, float], float] = field(default_factory=dict)
    oracle_floor: dict[float, float] = field(default_factory=dict)
    losses: dict[str, list[float]] = field(default_factory=dict)
    samples: dict[tuple[str, float], torch.Tensor] = field(default_factory=dict)
    evals_per_step: dict[str, float] = field(default_factory=dict)


def sigma_bins(cfg: Config, schedule: tg.VPSchedule) -> list[tuple[float, float]]:
    """(sigma at the first step, sigma at the last step) of each bin, high sigma first."""
    ts = schedule.timesteps(cfg.sample_steps)
    sig = schedule.sigmas[ts]
    return [(float(b[0]), float(b[-1])) for b in sig.tensor_split(cfg.sigma_bins)]


@torch.no_grad()
def error_table(teacher: tg.Denoiser, heads: dict[str, DistilledHead], record: list[tuple[int, torch.Tensor]],
                labels: torch.Tensor, scale: float, n_bins: int, res: SeedResult) -> None:
    """guidance_errors of every head on the recorded two-pass trajectory, per sigma bin and overall."""
    per_step = []
    for t, x in record:
        tt = torch.full((len(x),), t)
        f = cond_pass(teacher, x, tt, labels)
        _, u = two_pass(teacher, x, tt, labels)
        per_step.append((f.cond, u, {name: h(f) for name, h in heads.items()} | {FRESH: f.cond}))
    groups = {b: list(idx) for b, idx in enumerate(np.array_split(np.arange(len(per_step)), n_bins))}
    groups["all"] = list(range(len(per_step)))
    for b, idx in groups.items():
        c = torch.cat([per_step[i][0] for i in idx])
        u = torch.cat([per_step[i][1] for i in idx])
        for name in per_step[0][2]:
            err = ho.guidance_errors(c, u, torch.cat([per_step[i][2][name] for i in idx]), scale)
            res.rel_delta[name, scale, b] = err["rel_delta"]
            res.rel_guided[name, scale, b] = err["rel_guided"]


def per_class(x: torch.Tensor, n: int) -> list[torch.Tensor]:
    return list(x.split(n))


@torch.no_grad()
def evaluate(teacher: tg.Denoiser, heads: dict[str, DistilledHead], cfg: Config, gmm: tg.GMM, seed: int,
             res: SeedResult) -> None:
    sch = tg.VPSchedule.scaled_linear()
    ts = sch.timesteps(cfg.sample_steps)
    labels = torch.arange(teacher.num_classes).repeat_interleave(cfg.n_eval)
    truth = tg.truth_samples(gmm, cfg.n_eval, seed + 1000)
    eval_seed = seed + 100  # other noise than the training pool
    for s in cfg.scales:
        x_start = torch.randn(len(labels), 2, generator=tg.seeds.seeded_generator(eval_seed, 0x5A3))
        record: list[tuple[int, torch.Tensor]] = []
        two = tg.ddim_loop(lambda x, t, s=s: ho.guided(*two_pass(teacher, x, t, labels), s), x_start, sch, ts, record)
        error_table(teacher, heads, record, labels, s, cfg.sigma_bins, res)
        oracle = tg.oracle_sample_classes(gmm, cfg.n_eval, sch, ts, eval_seed, s)
        other = tg.oracle_sample_classes(gmm, cfg.n_eval, sch, ts, eval_seed + 7000, s)
        res.oracle_floor[s] = tg.per_class_w2(oracle, other)
        res.samples[TWO_PASS, s] = two
        res.w2_truth[TWO_PASS, s] = tg.per_class_w2(per_class(two, cfg.n_eval), truth)
        res.w2_oracle[TWO_PASS, s] = tg.per_class_w2(per_class(two, cfg.n_eval), oracle)
        for name, head in heads.items():
            with count_evals(teacher) as counter:
                one = tg.ddim_loop(lambda x, t, h=head, s=s: single_pass_eps(teacher, h, x, t, labels, s),
                                   x_start, sch, ts)
            res.evals_per_step[name] = counter.rows / len(labels) / len(ts)
            res.samples[name, s] = one
            res.w2_two_pass[name, s] = tg.per_class_w2(per_class(one, cfg.n_eval), per_class(two, cfg.n_eval))
            res.rms_paired[name, s] = float((one - two).pow(2).sum(1).mean().sqrt())
            res.w2_truth[name, s] = tg.per_class_w2(per_class(one, cfg.n_eval), truth)
            res.w2_oracle[name, s] = tg.per_class_w2(per_class(one, cfg.n_eval), oracle)


def fresh_head(teacher: tg.Denoiser) -> DistilledHead:
    return DistilledHead(teacher, PROJ)


def run_seed(cfg: Config, gmm: tg.GMM, seed: int) -> SeedResult:
    teacher = tg.make_model(gmm.num_classes, seed, width=cfg.width, depth=cfg.depth, emb_dim=cfg.emb_dim)
    tg.train(teacher, gmm, cfg.steps, cfg.batch, cfg.lr, seed)
    teacher.requires_grad_(False)
    sch = tg.VPSchedule.scaled_linear()
    needs_pool = any(VARIANTS[v].source == "policy" for v in cfg.variants)
    pool = policy_pool(teacher, cfg, sch, seed) if needs_pool else None
    res = SeedResult()
    heads: dict[str, DistilledHead] = {FRESH: fresh_head(teacher)}
    for name in cfg.variants:
        heads[name], res.losses[name] = train_head(teacher, VARIANTS[name], cfg, gmm, pool, seed)
    evaluate(teacher, heads, cfg, gmm, seed, res)
    return res


# ---------------------------------------------------------------------------------------------
# Report


def names(cfg: Config) -> tuple[str, ...]:
    return (FRESH, *cfg.variants)


def log_tables(cfg: Config, results: list[SeedResult], bins: list[tuple[float, float]]) -> None:
    col = "%-18s" + " %-16s" * len(cfg.scales)
    for metric, what in (("rel_delta", "|u_hat - u| / |c - u|"), ("rel_guided", "|g_hat - g| / |g|")):
        log.info("")
        log.info("## %s = %s per guidance scale, all sigmas (held-out teacher CFG trajectories)", metric, what)
        log.info(col, "head", *[f"s={s:g}" for s in cfg.scales])
        for n in names(cfg):
            log.info(col, n, *[pm([getattr(r, metric)[n, s, "all"] for r in results]) for s in cfg.scales])
    for metric, s in (("rel_delta", _mid_scale(cfg)), ("rel_guided", cfg.scales[-1])):
        log.info("")
        log.info("## %s per sigma bin (DDIM steps split in %d, high sigma first) at s=%g", metric, cfg.sigma_bins, s)
        bcol = "%-18s" + " %-16s" * len(bins)
        log.info(bcol, "head", *[f"sig {hi:.2g}-{lo:.2g}" for hi, lo in bins])
        for n in names(cfg):
            log.info(bcol, n, *[pm([getattr(r, metric)[n, s, b] for r in results]) for b in range(len(bins))])
    _log_samples(cfg, results)


def _mid_scale(cfg: Config) -> float:
    return cfg.scales[len(cfg.scales) // 2]


def _log_samples(cfg: Config, results: list[SeedResult]) -> None:
    log.info("")
    log.info("## samples (%d/class, same start noise): single-pass vs two-pass, and each to the data and to "
             "oracle CFG", cfg.n_eval)
    row = "%-5s %-18s %-10s %-16s %-16s %-16s %-16s"
    log.info(row, "scale", "sampler", "evals/step", "W2 1p vs 2p", "paired RMS", "W2 truth", "W2 oracle CFG")
    for s in cfg.scales:
        log.info(row, f"{s:g}", TWO_PASS, "2", "-", "-", pm([r.w2_truth[TWO_PASS, s] for r in results]),
                 pm([r.w2_oracle[TWO_PASS, s] for r in results]))
        for n in names(cfg):
            log.info(row, "", n, f"{results[0].evals_per_step[n]:g}", pm([r.w2_two_pass[n, s] for r in results]),
                     pm([r.rms_paired[n, s] for r in results]), pm([r.w2_truth[n, s] for r in results]),
                     pm([r.w2_oracle[n, s] for r in results]))
        log.info(row, "", "floor o-vs-o", "", pm([r.oracle_floor[s] for r in results]), "", "", "")


def plot(cfg: Config, results: list[SeedResult], bins: list[tuple[float, float]], name: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(17, 10))
    centres = [np.sqrt(hi * lo) for hi, lo in bins]
    for ax, metric, s in ((axes[0, 0], "rel_delta", _mid_scale(cfg)), (axes[1, 0], "rel_guided", cfg.scales[-1])):
        for i, n in enumerate(names(cfg)):
            _band(ax, centres, [[getattr(r, metric)[n, s, b] for r in results] for b in range(len(bins))], i, n)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("sigma (bin centre)")
        ax.set_title(f"{metric} by sigma at s={s:g}", fontsize=9)
    ax = axes[0, 1]
    for i, n in enumerate(names(cfg)):
        _band(ax, cfg.scales, [[r.rel_guided[n, s, "all"] for r in results] for s in cfg.scales], i, n)
    ax.set_yscale("log")
    ax.set_xlabel("guidance scale")
    ax.set_title("rel_guided, all sigmas", fontsize=9)
    ax = axes[0, 2]
    for i, n in enumerate(names(cfg)):
        _band(ax, cfg.scales, [[r.w2_two_pass[n, s] for r in results] for s in cfg.scales], i, n)
    _band(ax, cfg.scales, [[r.oracle_floor[s] for r in results] for s in cfg.scales], "k", "floor (W2 sampling noise)")
    ax.set_yscale("log")
    ax.set_xlabel("guidance scale")
    ax.set_title("W2 single-pass vs two-pass samples", fontsize=9)
    _loss_panel(axes[1, 1], cfg, results[0])
    _overlay(axes[1, 2], cfg, results[0])
    for ax in axes.flat:
        ax.legend(fontsize=7)
    fig.suptitle(f"distilled uncond head on a frozen toy teacher (mean ± std over {len(cfg.seeds)} seeds)")
    return str(save_figure(fig, name))


def _band(ax, xs: Sequence[float], vals: Sequence[Sequence[float]], color: int | str, label: str) -> None:
    v = np.asarray(vals, dtype=float)
    c = f"C{color}" if isinstance(color, int) else color
    std = v.std(1, ddof=1) if v.shape[1] > 1 else None
    ax.errorbar(xs, v.mean(1), yerr=std, fmt="o-", ms=4, capsize=3, color=c, label=label)


def _loss_panel(ax, cfg: Config, res: SeedResult) -> None:
    k = max(1, cfg.head_steps // 50)
    for i, n in enumerate(cfg.variants, start=1):
        loss = np.convolve(res.losses[n], np.ones(k) / k, mode="valid")
        ax.plot(loss, color=f"C{i}", label=n)
    ax.set_yscale("log")
    ax.set_xlabel("head training step")
    ax.set_title(f"distillation loss (seed {cfg.seeds[0]}, moving mean of {k}; unw. is a different loss)", fontsize=9)


def _overlay(ax, cfg: Config, res: SeedResult) -> None:
    s = cfg.scales[-1]
    best = min(cfg.variants, key=lambda n: res.w2_two_pass[n, s])
    ax.scatter(*res.samples[FRESH, s].T, s=1, c="C0", alpha=0.3, label=f"{FRESH} (= no guidance)")
    ax.scatter(*res.samples[TWO_PASS, s].T, s=8, c="k", label=TWO_PASS)
    ax.scatter(*res.samples[best, s].T, s=1, c="C3", label=f"single-pass {best}")
    ax.set_aspect("equal")
    ax.set_title(f"samples at s={s:g}, seed {cfg.seeds[0]}", fontsize=9)


# ---------------------------------------------------------------------------------------------


def run(cfg: Config) -> list[SeedResult]:
    gmm = tg.default_gmm()
    t0 = time.time()
    results = []
    for seed in cfg.seeds:
        results.append(run_seed(cfg, gmm, seed))
        log.info("# seed %d done at %.0f s", seed, time.time() - t0)
    return results


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (seconds)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, quick 1)")
    parser.add_argument("--head-steps", type=int, default=None, help="head training steps")
    args = parser.parse_args(argv)
    setup_logging()
    torch.set_num_threads(1)  # tiny matmuls on a shared machine: one thread is faster and steadier
    cfg = QUICK if args.quick else FULL
    cfg = replace(cfg, seeds=tuple(range(args.seeds)) if args.seeds else cfg.seeds,
                  head_steps=args.head_steps or cfg.head_steps)
    log.info(header("Distilled uncond head vs two-pass CFG on a class-conditional 2-D GMM"
                    + (" (QUICK)" if args.quick else "")))
    log.info("# teacher: %d steps x batch %d, lr %g, res-MLP %d blocks x %d, 10%% label dropout. Heads: %d steps x "
             "batch %d, AdamW lr %g cosine, s ~ U[%g, %g], pool %d CFG trajectories/class. DDIM %d steps, seeds %s",
             cfg.steps, cfg.batch, cfg.lr, cfg.depth, cfg.width, cfg.head_steps, cfg.head_batch, cfg.head_lr,
             cfg.cfg_min, cfg.cfg_max, cfg.pool_per_class, cfg.sample_steps, list(cfg.seeds))
    log.info("# load average at start %.1f (other work on the machine slows this down)", os.getloadavg()[0])
    t0 = time.time()
    results = run(cfg)
    bins = sigma_bins(cfg, tg.VPSchedule.scaled_linear())
    log_tables(cfg, results, bins)
    name = "head_distill_toy_quick.png" if args.quick else "head_distill_toy.png"
    log.info("# plot: %s", plot(cfg, results, bins, name))
    log.info("# total %.0f s", time.time() - t0)


if __name__ == "__main__":
    main()
