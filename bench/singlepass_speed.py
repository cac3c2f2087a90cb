"""Single-pass CFG vs stock two-pass CFG on the SD1.x fixture: seconds per step and peak memory.

    python bench/singlepass_speed.py [--sizes 256 512] [--steps 4] [--repeats 5]

Interleaved in one process (A B C D A B C D ...) so machine noise hits every variant alike;
medians. Rows per size:
- forward b1 / b2: the bare diffusion-model call at batch 1 and 2: the physical limit of the
  ratio (single-pass is one b1 call per step, CFG one b2 call);
- cfg: stock KSampler, cfg 5, euler; single-pass (projection / last_block): the same with
  SupercondNewHead -> SupercondSinglePass at the same steps and scale; seconds per step are
  (time of 2*steps - time of steps) / steps, so per-run fixed costs cancel;
- head: the head's own cost per call, timed alone on captured features (% of a b1 forward).
Peak memory is the process's peak RSS above its level before each variant, sampled from a thread
(CPU), after a warm-up run of every variant.
Targets: single-pass >= 1.85x faster than CFG, head <= 3% of a forward.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch
from _common import PeakRSS, header, save_figure, setup_logging
from perturb_sampling import load_sd15

log = logging.getLogger("supercond.bench.singlepass")


def sampler_run(model, pos, neg, steps: int, size: int, cfg: float = 5.0):
    """Seconds per step without the per-run fixed costs (loading the patched clone, conds,
    wrappers): a run of 2*steps minus a run of steps, divided by steps."""
    import nodes

    latent = {"samples": torch.zeros(1, 4, size // 8, size // 8)}

    def run(n: int) -> float:
        t0 = time.perf_counter()
        nodes.common_ksampler(model, 0, n, cfg, "euler", "normal", pos, neg, latent)
        return time.perf_counter() - t0

    return lambda: (run(2 * steps) - run(steps)) / steps


def forward_run(model, pos, size: int, batch: int):
    net = model.model.diffusion_model
    x = torch.randn(batch, 4, size // 8, size // 8)
    t = torch.full((batch,), 500.0)
    ctx = pos[0][0].expand(batch, -1, -1)
    return lambda: net(x, t, context=ctx, transformer_options={})


def head_run(model, head_type: str, pos, size: int):
    """The head alone on features captured from one real forward (what it adds per call)."""
    from supercond.nodes import family as fm
    from supercond.nodes.singlepass import hook

    head = hook.new_head(model, head_type)
    net = model.model.diffusion_model
    tail = fm.family_of(model, "bench").tail
    with hook.capturing(net, tail, final=True, block=True) as cap:
        forward_run(model, pos, size, 1)()
    return lambda: hook.run_head(head, tail, net, cap)


def variants(model, pos, neg, size: int, steps: int) -> dict:
    from supercond.nodes.singlepass.nodes import SupercondNewHead, SupercondSinglePass

    def sp(head_type):
        m = SupercondNewHead.execute(model, head_type).result[0]
        return SupercondSinglePass.execute(m, 0, "head").result[0]

    return {
        "forward b1": (forward_run(model, pos, size, 1), 1),
        "forward b2": (forward_run(model, pos, size, 2), 1),
        "cfg": (sampler_run(model, pos, neg, steps, size), None),
        "single-pass projection": (sampler_run(sp("projection"), pos, neg, steps, size), None),
        "single-pass last_block": (sampler_run(sp("last_block"), pos, neg, steps, size), None),
        "head projection": (head_run(model, "projection", pos, size), 1),
        "head last_block": (head_run(model, "last_block", pos, size), 1),
    }


def measure(vs: dict, repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    times: dict[str, list[float]] = {k: [] for k in vs}
    mem: dict[str, float] = {}
    with torch.inference_mode():
        for fn, _ in vs.values():  # warm-up (loads each clone once) ...
            fn()
        for name, (fn, _) in vs.items():  # ... then the peak each variant adds above the loaded model
            with PeakRSS() as peak:
                fn()
            mem[name] = peak.peak_mb
        for _ in range(repeats):
            for name, (fn, per) in vs.items():
                if per is None:  # the function measures itself (seconds per step)
                    times[name].append(fn())
                    continue
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) / per)
    return {k: statistics.median(v) for k, v in times.items()}, mem


def main() -> None:
    setup_logging()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    model, pos, neg = load_sd15()
    log.info(header(f"single-pass vs two-pass CFG, SD1.x fixture, {args.steps} steps, cfg 5, euler, "
                    f"median of {args.repeats} interleaved repeats"))
    rows = []
    for size in args.sizes:
        med, mem = measure(variants(model, pos, neg, size, args.steps), args.repeats)
        fwd = med["forward b1"]
        log.info(f"\n{size}px{'s/step or s/call':>33}{'vs cfg':>9}{'% of fwd b1':>13}{'peak +MB':>10}")
        for name, s in med.items():
            speed = f"{med['cfg'] / s:>8.2f}x" if not name.startswith("head") else f"{'':>9}"
            log.info(f"  {name:<26}{s:>12.4f}{speed}{s / fwd * 100:>12.1f}%{mem[name]:>10.0f}")
        log.info(f"  limit (forward b2 / b1): {med['forward b2'] / fwd:.2f}x; target single-pass >= 1.85x, "
                 f"head <= 3% of a forward")
        rows.append((size, med))
    _plot(rows)


def _plot(rows) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = ["forward b2", "cfg", "single-pass projection", "single-pass last_block", "forward b1"]
    width = 0.8 / len(rows)
    for i, (size, med) in enumerate(rows):
        ax.bar([j + i * width for j in range(len(names))], [med[n] for n in names], width, label=f"{size}px")
    ax.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(names))], names, rotation=15, fontsize=8)
    ax.set_ylabel("seconds per step (forward: per call)")
    ax.legend()
    log.info(f"plot: {save_figure(fig, 'singlepass_speed.png')}")


if __name__ == "__main__":
    main()
