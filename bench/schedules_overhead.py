"""Overhead of the schedule MODEL patches on the SD1.x fixture (in-process ComfyUI, KSampler).

    python bench/schedules_overhead.py [--size 256] [--steps 10] [--repeats 7]

Seconds per sampling run with each patch vs none, interleaved in one process (A B C D A B C D ...)
so machine noise hits every variant alike; median and ratio to none. Target: <= 2 % overhead.
Noise correction does its first step itself (same number of model calls), epsilon scaling adds
one elementwise op per step (k != 0 also a cached sigma -> time lookup).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch
from _common import header, import_pack, setup_logging
from perturb_sampling import load_sd15

log = logging.getLogger("supercond.bench.schedules")


def variants(model) -> dict:
    import_pack()
    from supercond.nodes.schedules.nodes import SupercondEpsilonScaling, SupercondNoiseCorrection

    return {
        "none": model,
        "NoiseCorrection": SupercondNoiseCorrection.execute(model, 1.0).result[0],
        "EpsilonScaling b=1.005": SupercondEpsilonScaling.execute(model, 1.005, 0.0).result[0],
        "EpsilonScaling k=0.01": SupercondEpsilonScaling.execute(model, 1.0, 0.01).result[0],
    }


def run(model, pos, neg, seed: int, steps: int, size: int) -> torch.Tensor:
    import nodes

    latent = {"samples": torch.zeros(1, 4, size // 8, size // 8)}
    return nodes.common_ksampler(model, seed, steps, 7.0, "euler", "simple", pos, neg, latent)[0]["samples"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    setup_logging()
    model, pos, neg = load_sd15()
    vs = variants(model)
    for m in vs.values():  # warm-up: model load, allocator
        run(m, pos, neg, 0, 2, args.size)
    times: dict[str, list[float]] = {k: [] for k in vs}
    for r in range(args.repeats):
        for name, m in vs.items():
            t0 = time.perf_counter()
            run(m, pos, neg, r, args.steps, args.size)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    log.info(header(f"schedule patches: overhead per KSampler run (SD1.x fixture, {args.size}px, "
                    f"{args.steps} steps euler/simple, cfg 7, median of {args.repeats}, interleaved)"))
    log.info("| patch | s/run | vs none |")
    log.info("|---|---|---|")
    for k, v in med.items():
        log.info("| %s | %.3f | %+.1f %% |", k, v, 100 * (v / med["none"] - 1))


if __name__ == "__main__":
    main()
