"""Single-pass CFG vs stock two-pass CFG on every family fixture: seconds per step, the head's cost.

    python bench/singlepass_speed.py [--families sd15 sdxl sd3 chroma qwen_image wan21 flux]
                                     [--size 256 [sd3=1024 ...]] [--steps 3] [--repeats 3]
    python bench/singlepass_speed.py --caches [--families sd15] [--cache-steps 20]

Per family, at one image size (Wan: a 5-frame clip; ``--size`` takes a default and per-family
``name=px`` overrides, by default larger for the fixtures too small to be compute-bound at 256 px:
at a few ms per step the sampler's own per-step Python work is a large share of a step, which
single-pass does not halve, so the ratio would measure ComfyUI's overhead rather than the model), interleaved in one process (A B C D A B C D ...)
so machine noise hits every variant alike; medians. Rows:
- cfg: stock KSampler at cfg 5, euler; single-pass (projection / last_block): the same with
  SupercondNewHead -> SupercondSinglePass. Seconds per step are (time of 2*steps - time of steps) /
  steps, so per-run fixed costs (loading the clone, conds, wrappers) cancel;
- head projection / last_block: the head's own cost per call, timed alone on features captured
  from a real single-pass call, as % of that call (the batch-1 forward).
Targets, on every real-CFG family (SD1.x, SDXL, SD3, Chroma, Qwen-Image, Wan): single-pass >= 1.85x
faster than CFG, projection head <= 3 % of a forward. Flux dev is guidance-distilled (sampled at
cfg 1 with a guidance embedding): single-pass only applies when it is run with real CFG, listed
for completeness. The fixtures have random weights and tiny depths (one or two blocks where
ComfyUI's detection allows), so a block is a larger share of the model than in the real ones:
the last_block head's share here is an upper bound.

``--caches``: single-pass stacked with ComfyUI's EasyCache and LazyCache (reuse_threshold 0.2, their
defaults), against two-pass CFG under the same cache: seconds per whole run of ``--cache-steps``
steps (differencing does not apply: a cache's skips depend on the step count), speed-up over plain
two-pass CFG, and the steps the cache skipped. The projection head is fresh (these fixtures have no
trained head), which does not change the cost; whether a cache skips depends on the outputs, so the
skip counts of a real model differ. The CFG + EasyCache row times what runs, but ComfyUI 0.3.64's
EasyCache mixes the cond's and uncond's cached differences when they share a call (batch 1 here; a
larger batch stops with a size error): a speed figure, not a usable image.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch
from _common import header, import_pack, save_figure, setup_logging

log = logging.getLogger("supercond.bench.singlepass")
REAL_CFG = ("sd15", "sdxl", "sd3", "chroma", "qwen_image", "wan21")
# at 256 px the SD3 and Wan fixtures (width 128) take a few ms a step, and SDXL and Qwen-Image missed 1.85x
# (1.71x, 1.76x): measured at 512 px they reach 2.04x and 1.91x
DEFAULT_SIZES = ("sdxl=512", "sd3=1024", "qwen_image=512", "wan21=1024")


def sizes(spec: list[str]) -> dict[str, int]:
    """``["256", "sd3=1024"]`` -> {"": 256, "sd3": 1024}: the default under ""."""
    out = {"": 256}
    for item in spec:
        name, _, px = item.rpartition("=")
        out[name] = int(px)
    return out


def load(name: str):
    """(family spec, MODEL, positive, negative) through ComfyUI's real loaders."""
    import_pack()
    from supercond.tools import paths
    from supercond.tools.fixture_models import check, registry
    from supercond.tools.inprocess import ensure_fixtures, setup_comfy_imports

    comfyui = paths.find_comfyui()
    setup_comfy_imports(comfyui)
    models = ensure_fixtures(comfyui)
    model, clip, _ = check.load(name, models, comfyui)
    pos, neg = check.encode(clip, "a photograph of a lighthouse on a cliff at sunset"), check.encode(clip, "")
    return registry.FAMILIES[name], model, pos, neg


def latent(spec, size: int) -> dict:
    return {"samples": torch.zeros(spec.latent_shape(1, size))}


def sampler_run(spec, model, pos, neg, steps: int, size: int, cfg: float = 5.0):
    """Seconds per step without the per-run fixed costs: a run of 2*steps minus a run of steps."""
    import nodes

    def run(n: int) -> float:
        t0 = time.perf_counter()
        nodes.common_ksampler(model, 0, n, cfg, "euler", "simple", pos, neg, latent(spec, size))
        return time.perf_counter() - t0

    return lambda: (run(2 * steps) - run(steps)) / steps


def captured_call(spec, model, pos, neg, size: int):
    """One single-pass step's diffusion-model call (batch 1), its features captured for the heads."""
    import nodes

    from supercond.nodes import family as fm
    from supercond.nodes.singlepass import hook
    from supercond.nodes.singlepass.nodes import SupercondNewHead, SupercondSinglePass

    sp = SupercondSinglePass.execute(SupercondNewHead.execute(model, "projection").result[0], 0, "head").result[0]
    net = model.model.diffusion_model
    tail = fm.family_of(model, "bench").tail
    with hook.capturing(net, tail, final=True, block=True) as cap:
        nodes.common_ksampler(sp, 0, 1, 5.0, "euler", "simple", pos, neg, latent(spec, size))
    return net, tail, cap


def variants(spec, model, pos, neg, size: int, steps: int) -> dict:
    from supercond.nodes.singlepass import hook
    from supercond.nodes.singlepass.nodes import SupercondNewHead, SupercondSinglePass

    def sp(head_type):
        m = SupercondNewHead.execute(model, head_type).result[0]
        return SupercondSinglePass.execute(m, 0, "head").result[0]

    net, tail, cap = captured_call(spec, model, pos, neg, size)
    heads = {t: hook.new_head(model, t) for t in ("projection", "last_block")}
    return {
        "cfg": sampler_run(spec, model, pos, neg, steps, size),
        "single-pass projection": sampler_run(spec, sp("projection"), pos, neg, steps, size),
        "single-pass last_block": sampler_run(spec, sp("last_block"), pos, neg, steps, size),
        "forward b1": _timed(lambda: net(*cap.net_args, **cap.net_kwargs)),
        "head projection": _timed(lambda: hook.run_head(heads["projection"], tail, net, cap)),
        "head last_block": _timed(lambda: hook.run_head(heads["last_block"], tail, net, cap)),
    }


CACHES = ("EasyCache", "LazyCache")


def cache_rows(spec, model, pos, neg, size: int, steps: int) -> dict:
    """name -> run() giving (seconds for one run, steps the cache skipped) for CFG and single-pass, plain and
    under each cache."""
    import logging as logging_
    import re

    import nodes
    from comfy_extras.nodes_easycache import EasyCacheNode, LazyCacheNode

    from supercond.nodes.singlepass.nodes import SupercondNewHead, SupercondSinglePass

    single = SupercondSinglePass.execute(SupercondNewHead.execute(model, "projection").result[0], 0, "head").result[0]
    cache_nodes = {"EasyCache": EasyCacheNode, "LazyCache": LazyCacheNode}

    class Skips(logging_.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.skipped = 0

        def emit(self, record: logging_.LogRecord) -> None:
            m = re.search(r"Cache - skipped (\d+)/", record.getMessage())
            if m:
                self.skipped = int(m[1])

    def run(m):
        def go() -> tuple[float, int]:
            handler = Skips()
            logging_.getLogger().addHandler(handler)
            try:
                t0 = time.perf_counter()
                nodes.common_ksampler(m, 0, steps, 5.0, "euler", "simple", pos, neg, latent(spec, size))
                return time.perf_counter() - t0, handler.skipped
            finally:
                logging_.getLogger().removeHandler(handler)
        return go

    out = {"cfg": run(model), "single-pass": run(single)}
    for cache in CACHES:
        node = cache_nodes[cache]
        out[f"cfg + {cache}"] = run(node.execute(model, 0.2, 0.15, 0.95, False).result[0])
        out[f"single-pass + {cache}"] = run(node.execute(single, 0.2, 0.15, 0.95, False).result[0])
    return out


def cache_table(args: argparse.Namespace) -> None:
    log.info(header(f"single-pass under ComfyUI's caches, {args.cache_steps} steps, cfg 5, euler, median of "
                    f"{args.repeats} interleaved whole runs"))
    for name in args.families:
        spec, model, pos, neg = load(name)
        size = sizes(args.size).get(name, 256)
        rows = cache_rows(spec, model, pos, neg, size, args.cache_steps)
        times: dict[str, list[float]] = {k: [] for k in rows}
        skipped: dict[str, int] = {}
        with torch.inference_mode():
            for fn in rows.values():
                fn()
            for _ in range(args.repeats):
                for k, fn in rows.items():
                    t, skipped[k] = fn()
                    times[k].append(t)
        med = {k: statistics.median(v) for k, v in times.items()}
        log.info(f"| {name + f' {size} px':<25} | {'s/run':>7} | {'x faster than cfg':>17} | {'steps skipped':>13} |")
        log.info(f"|{'-' * 27}|{'-' * 9}|{'-' * 19}|{'-' * 15}|")
        for k in rows:
            log.info(f"| {k:<25} | {med[k]:7.2f} | {med['cfg'] / med[k]:17.2f} | "
                     f"{skipped[k]:>5}/{args.cache_steps:<7} |")


def _timed(fn):
    def run() -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return run


def measure(vs: dict, repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in vs}
    with torch.inference_mode():
        for fn in vs.values():  # warm-up: loads each clone once
            fn()
        for _ in range(repeats):
            for name, fn in vs.items():
                times[name].append(fn())
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    setup_logging()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="+", default=[*REAL_CFG, "flux"])
    ap.add_argument("--size", nargs="+", default=["256", *DEFAULT_SIZES],
                    help="a default size in px and per-family overrides such as sd3=1024")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--caches", action="store_true", help="the table with EasyCache / LazyCache instead")
    ap.add_argument("--cache-steps", type=int, default=20)
    args = ap.parse_args()
    if args.caches:
        if args.families == [*REAL_CFG, "flux"]:
            args.families = ["sd15"]
        cache_table(args)
        return

    px = sizes(args.size)
    log.info(header(f"single-pass vs two-pass CFG per family fixture, {args.steps} steps, cfg 5, "
                    f"euler, median of {args.repeats} interleaved repeats"))
    log.info(f"{'family':<12}{'px':>5}{'cfg s/step':>11}{'1-pass proj':>12}{'speed-up':>9}{'1-pass block':>13}"
             f"{'speed-up':>9}{'proj head':>10}{'block head':>11}  target")
    rows = []
    for name in args.families:
        spec, model, pos, neg = load(name)
        size = px.get(name, px[""])
        med = measure(variants(spec, model, pos, neg, size, args.steps), args.repeats)
        fwd = med["forward b1"]
        proj, block = med["cfg"] / med["single-pass projection"], med["cfg"] / med["single-pass last_block"]
        hp, hb = med["head projection"] / fwd * 100, med["head last_block"] / fwd * 100
        ok = proj >= 1.85 and hp <= 3.0
        target = ("met" if ok else "MISSED") if name in REAL_CFG else "n/a (cfg 1 model)"
        log.info(f"{name:<12}{size:>5}{med['cfg']:>11.3f}{med['single-pass projection']:>12.3f}{proj:>8.2f}x"
                 f"{med['single-pass last_block']:>13.3f}{block:>8.2f}x{hp:>9.1f}%{hb:>10.1f}%  {target}")
        rows.append((name, proj, block, hp, hb))
        del model
        import comfy.model_management as mm

        mm.unload_all_models()
        mm.soft_empty_cache()
    _plot(rows)


def _plot(rows) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(9, 3.5))
    names = [r[0] for r in rows]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r[1] for r in rows], 0.4, label="projection head")
    ax.bar([i + 0.2 for i in x], [r[2] for r in rows], 0.4, label="last_block head")
    ax.axhline(1.85, color="k", ls="--", lw=0.8, label="target 1.85x")
    ax.set_xticks(list(x), names, rotation=20, fontsize=8)
    ax.set_ylabel("speed-up over two-pass CFG")
    ax.legend(fontsize=7)
    bx.bar([i - 0.2 for i in x], [r[3] for r in rows], 0.4, label="projection")
    bx.bar([i + 0.2 for i in x], [r[4] for r in rows], 0.4, label="last_block")
    bx.axhline(3.0, color="k", ls="--", lw=0.8, label="target 3 % (projection)")
    bx.set_xticks(list(x), names, rotation=20, fontsize=8)
    bx.set_ylabel("head cost, % of a forward")
    bx.set_yscale("log")
    bx.legend(fontsize=7)
    log.info(f"plot: {save_figure(fig, 'singlepass_speed.png')}")


if __name__ == "__main__":
    main()
