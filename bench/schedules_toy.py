"""Sample quality of the schedule fixes on a toy VP/eps model (bench/toy_gmm.py), CPU only.

    python bench/schedules_toy.py [--train-steps 3000] [--n 600]

One eps-prediction MLP is trained on the class-conditional Gaussian mixture with SD's schedule,
a second one on the zero-terminal-SNR rescaling of it (terminal alpha_bar clamped as ComfyUI does).
Both are sampled with a deterministic DDIM/Euler sampler written in ComfyUI's VE coordinates,
starting exactly as ComfyUI's KSAMPLER does (x = n * sqrt(1 + sigma0^2) when sigma0 is the model's
sigma_max, else n * sigma0), and scored by per-class W2 to fresh exact draws (lower is better;
``floor`` is W2 between two exact draws of the same size). Sweeps: every spacing at 2/4/8/16
steps with and without NoiseCorrection, ZTSNR, and a sweep of b for EpsilonScaling.
The corrections come from the pack's core (the same functions the nodes use).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math

import torch
import toy_gmm as tg
from _common import header, save_figure, setup_logging

log = logging.getLogger("supercond.bench.schedules_toy")
sched = importlib.import_module("supercond.core.schedules")

STEPS = (2, 4, 8, 16)
B_SWEEP = (1.0, 1.002, 1.005, 1.01, 1.02, 1.05)


def ztsnr_schedule(base: tg.VPSchedule) -> tg.VPSchedule:
    ab = sched.rescale_zero_terminal_snr(base.alphas_cumprod)
    ab[-1] = sched.ZTSNR_TERMINAL_ALPHA_BAR
    prev = torch.cat([ab.new_ones(1), ab[:-1]])
    return tg.VPSchedule(1.0 - ab / prev)


def schedule_sigmas(vp: tg.VPSchedule, spacing: str, steps: int) -> torch.Tensor:
    table = vp.sigmas
    if spacing in sched.TABLE_SPACINGS:
        return sched.table_sigmas(table, sched.spacing_timesteps(spacing, steps, vp.num_steps)).double()
    fn = sched.karras_sigmas if spacing == "karras" else sched.exponential_sigmas
    return fn(steps, float(table[0]), float(table[-1])).double()


def timestep_of(vp: tg.VPSchedule, sigma: float) -> float:
    """Fractional timestep by linear interpolation in log sigma (as ComfyUI's timestep())."""
    ls = vp.sigmas.log()
    s = min(max(math.log(sigma), float(ls[0])), float(ls[-1]))
    hi = int(torch.searchsorted(ls, torch.tensor(s, dtype=ls.dtype)).clamp(1, len(ls) - 1))
    lo = hi - 1
    w = (s - float(ls[lo])) / (float(ls[hi]) - float(ls[lo]))
    return lo + w


@torch.no_grad()
def sample(model: tg.Denoiser, vp: tg.VPSchedule, labels: torch.Tensor, sigmas: torch.Tensor, seed: int,
           correction: float = 0.0, b: float = 1.0) -> torch.Tensor:
    g = tg.seeds.seeded_generator(seed, 0x5A3)
    n = torch.randn(len(labels), 2, generator=g, dtype=torch.float64)
    s0, smax = float(sigmas[0]), float(vp.sigmas[-1])
    max_denoise = math.isclose(s0, smax, rel_tol=1e-5) or s0 > smax
    x = n * math.sqrt(1 + s0**2) if max_denoise else n * s0
    emb = model.embed(labels)
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        t = torch.full((len(labels),), timestep_of(vp, s))
        eps = model((x / math.sqrt(1 + s * s)).float(), t, emb).double()
        d = x - s * eps
        if b != 1.0:
            d = sched.epsilon_scale("ve", x, d, s, b)
        if i == 0 and correction > 0 and max_denoise and len(sigmas) > 2:
            x = sched.noise_correction_step("ve", x, d, n, s, s_next, correction)
        else:
            x = d + s_next * sched.implied_noise("ve", x, d, s)
    return x.float()


def score(model, vp, sigmas, truth, n, seed, **kw) -> float:
    labels = torch.arange(model.num_classes).repeat_interleave(n)
    x = sample(model, vp, labels, sigmas, seed, **kw)
    return tg.per_class_w2(list(x.split(n)), truth)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-steps", type=int, default=3000)
    ap.add_argument("--n", type=int, default=600, help="samples per class")
    ap.add_argument("--seeds", type=int, default=2, help="sampling seeds averaged")
    args = ap.parse_args()
    setup_logging()
    torch.set_num_threads(1)
    gmm = tg.default_gmm()
    sd = tg.VPSchedule.scaled_linear()
    zt = ztsnr_schedule(sd)
    models = {}
    for name, vp in (("sd", sd), ("ztsnr", zt)):
        m = tg.make_model(gmm.num_classes, seed=0, width=128)
        tg.train(m, gmm, args.train_steps, 256, 3e-3, seed=0, schedule=vp)
        models[name] = m
    truth = tg.truth_samples(gmm, args.n, seed=1)
    floor = tg.per_class_w2(tg.truth_samples(gmm, args.n, seed=2), truth)

    def w2(name, vp, spacing, steps, **kw) -> float:
        sig = schedule_sigmas(vp, spacing, steps)
        return sum(score(models[name], vp, sig, truth, args.n, s, **kw) for s in range(args.seeds)) / args.seeds

    rows: list[tuple[str, list[float]]] = []
    for spacing in sched.SPACINGS:
        for nc in (0.0, 1.0):
            rows.append((f"sd {spacing}{' +NC' if nc else ''}", [w2("sd", sd, spacing, k, correction=nc) for k in STEPS]))
    for nc in (0.0, 1.0):
        rows.append((f"ztsnr trailing{' +NC' if nc else ''}", [w2("ztsnr", zt, "trailing", k, correction=nc) for k in STEPS]))
    for b in B_SWEEP:
        rows.append((f"sd trailing ES b={b}", [w2("sd", sd, "trailing", k, b=b) for k in STEPS]))

    log.info(header(f"schedule fixes on the toy GMM: per-class W2 to truth (lower is better), eps MLP width 128, "
                    f"{args.train_steps} train steps, n={args.n}/class, mean of {args.seeds} sampling seeds, "
                    f"cfg 1; floor (two exact draws) = {floor:.4f}"))
    log.info("| variant | " + " | ".join(f"{k} steps" for k in STEPS) + " |")
    log.info("|---|" + "---|" * len(STEPS))
    for name, vals in rows:
        log.info("| %s | %s |", name, " | ".join(f"{v:.4f}" for v in vals))
    plot(rows, floor)


def plot(rows, floor: float) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    groups = [("spacing, with (dashed) and without NoiseCorrection", lambda n: n.startswith("sd ") and "ES" not in n),
              ("zero terminal SNR vs SD schedule (trailing)",
               lambda n: n.startswith("ztsnr") or n in ("sd trailing", "sd trailing +NC")),
              ("EpsilonScaling b sweep (trailing)", lambda n: "ES" in n)]
    for j, (title, keep) in enumerate(groups):
        ax = fig.add_subplot(1, 3, j + 1)
        colors: dict[str, str] = {}
        for name, vals in rows:
            if not keep(name):
                continue
            base = name.replace(" +NC", "")
            line = ax.plot(STEPS, vals, "--" if "+NC" in name else "-", marker="o", markersize=3, label=name,
                           color=colors.get(base))
            colors.setdefault(base, line[0].get_color())
        ax.axhline(floor, color="grey", lw=0.8, ls=":", label="floor")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(STEPS, [str(s) for s in STEPS])
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("steps")
        ax.set_ylabel("per-class W2 to truth")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6)
    log.info("plot: %s", save_figure(fig, "schedules_toy.png"))


if __name__ == "__main__":
    main()
