"""``scripts/evidence report``: every table, side by side in one run with the same prompts and seeds.
Samples are drawn through ComfyUI's own loader, text encoder, samplers and VAE with the pack's nodes
(sampling.py) and read by the metrics' judge; each table prints its rows and writes a plot to
bench/results/."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import data, metrics
from .sampling import Drawn, Evidence

log = logging.getLogger("supercond.evidence")


@dataclass(frozen=True)
class Settings:
    """How much each table draws. ``quick`` draws fewer images per row, with fewer bootstrap rounds, and
    fewer guidance scales (table 1) and step counts (table 3); every other row is kept, and the trained
    heads and LoRAs are the same."""

    per_digit: int = 32  # images per prompted digit (tables 0-3)
    rounds: int = 200  # bootstrap rounds
    seed: int = 0  # sampling seed: another seed draws new images from the same models
    steps: int = 20  # sampler steps where a table does not vary them
    few_steps: int = 8  # table 1b: where CFG at half the steps (4) loses quality
    scales: tuple[float, ...] = (1.5, 3.0, 5.0, 8.0)  # table 1
    diversity_cfg: float = 8.0  # table 2: where CFG's mode collapse is strongest
    schedule_steps: tuple[int, ...] = (2, 4, 8, 20)  # table 3
    schedule_cfg: float = 5.0
    trainer_samples: int = 48  # images of the held-out digit per LoRA row (table 4)
    negative_scales: tuple[float, ...] = (5.0, 8.0)  # table 5
    negatives: tuple[int, ...] = (3, 5, 8)  # table 5: the digits whose captions are the negatives
    fit_steps: tuple[int, ...] = (3, 4, 6, 8, 10)  # table 6
    fit_teacher_steps: int = 100  # table 6's fits (and its teacher images)
    fit_samples: int = 8
    fit_samplers: tuple[str, ...] = ("euler", "dpmpp_2m")  # table 6
    # What the tables train (once, then cached; the same for quick and full reports):
    lora_steps: int = 200  # table 4's LoRA runs
    lora_every: int = 50  # a checkpoint every this many steps: the curve's points
    lora_lr: float = 3e-4
    head_steps: int = 600  # table 1's distilled heads
    gist_steps: int = 200  # table 2's gist head + LoRA and the caption-dropout LoRA it is compared with
    gist_images: int = 40  # per known digit
    quick: bool = False


QUICK = Settings(per_digit=6, rounds=100, scales=(1.5, 5.0, 8.0), schedule_steps=(2, 4, 8), trainer_samples=24,
                 quick=True)


@dataclass(frozen=True)
class Row:
    name: str
    calls: float  # diffusion-model calls per image
    rep: metrics.Report | None  # None: a row with no images (e.g. a failed setting)
    method: str = ""  # the plot's series
    x: float = 0.0  # the plot's x (scale, steps, training steps, strength)
    extra: dict[str, metrics.Figure] = field(default_factory=dict)  # table-specific figures
    seconds: float = 0.0  # sampler wall time per image


def measure(judge: metrics.Judge, drawn: Drawn, settings: Settings, name: str, method: str = "", x: float = 0.0,
            **extra: metrics.Figure) -> Row:
    row = Row(name, drawn.calls, judge.report(drawn.pixels, drawn.labels, settings.rounds, settings.seed),
              method or name, x, extra, drawn.seconds)
    log.info("  %s: adherence %.3g, FD %.3g, Vendi %.3g (%.1f calls/image)", name, row.rep.adherence.value,
             row.rep.fd.value, row.rep.vendi.value, row.calls)  # progress: a line per row
    return row


COLUMNS: dict[str, Callable[[Row], object]] = {
    "adherence": lambda r: r.rep.adherence,
    "FD": lambda r: r.rep.fd,
    "Vendi": lambda r: r.rep.vendi,
    "pairwise": lambda r: r.rep.pairwise,
    "nn-dist ratio": lambda r: r.rep.memorization,
    "ms/image": lambda r: f"{1000 * r.seconds:.0f}",  # sampler wall time, this run's machine and load
}


def lines(title: str, rows: Sequence[Row], columns: Sequence[str] = ("adherence", "FD", "Vendi", "nn-dist ratio"),
          extra: Sequence[str] = ()) -> list[str]:
    """A markdown table: one row per Row, every figure with its 95% interval."""
    head = ["setting", "calls/image", *columns, *extra]
    out = [f"## {title}", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.name, f"{r.calls:.1f}"]
        cells += [str(COLUMNS[c](r)) if r.rep is not None else "-" for c in columns]
        cells += [str(r.extra[e]) if e in r.extra else "-" for e in extra]
        out.append("| " + " | ".join(cells) + " |")
    return out


def base_table(ev: Evidence, judge: metrics.Judge, s: Settings) -> list[Row]:
    """Has the model learned? Real images against the stock KSampler at several CFG scales, on the nine
    digits it was trained on, and on the held-out one it never saw."""
    real = judge.train.subset(torch.cat([torch.nonzero(judge.train.labels == d).flatten()[:s.per_digit]
                                         for d in data.SEEN]))
    rows = [Row("real training images", 0, judge.report(real.pixels, real.labels, s.rounds, s.seed), "real")]
    for cfg in (1.0, 3.0, 5.0, 8.0):
        drawn = ev.draw(data.SEEN, s.per_digit, s.seed, steps=s.steps, cfg=cfg)
        rows.append(measure(judge, drawn, s, f"KSampler euler {s.steps}, cfg {cfg:g}", "KSampler", cfg))
    held = ev.draw((data.HELD_OUT,), s.per_digit, s.seed, steps=s.steps, cfg=5.0)
    rows.append(measure(judge, held, s, f"held-out digit {data.HELD_OUT} (never trained), cfg 5", "held out", 5.0))
    return rows


def train(ev: Evidence, s: Settings) -> None:
    """What the tables compare that has to be trained first, with the pack's trainer nodes: the
    distilled heads (one reading negatives), the gist and its caption-dropout counterpart, the LoRAs on
    the unseen digit, the fitted schedules.
    Each is cached by its recipe and the checkpoint's build stamp; already trained ones only load."""
    from . import artifacts, diversity, fitted, guidance, negatives, trainer

    start = time.perf_counter()
    guidance.heads(ev, s)
    artifacts.distilled_head(ev, negatives.recipe(s))
    fitted.fit_all(ev, s)
    diversity.fine_tuned(ev, s)
    trainer.loras(ev, s)
    log.info("trained (or found) everything the tables need in %.1f min", (time.perf_counter() - start) / 60)


def run(ev: Evidence, judge: metrics.Judge, s: Settings, which: AbstractSet[int] = frozenset(range(7)),
        out: Path | None = None) -> None:
    """The tables ``which``, in order, each printed (and appended to ``out``) as soon as it is done."""
    from . import diversity, fitted, guidance, negatives, schedules, trainer

    tables: list[tuple[str, Callable[[], list[str]]]] = [
        ("0", lambda: lines(f"0. Has the model learned? (stock KSampler, euler {s.steps} steps, "
                            f"{s.per_digit} images per digit)", base_table(ev, judge, s))),
        ("1", lambda: guidance.table(ev, judge, s)),
        ("2", lambda: diversity.table(ev, judge, s)),
        ("3", lambda: schedules.table(ev, judge, s)),
        ("4", lambda: trainer.table(ev, judge, s)),
        ("5", lambda: negatives.table(ev, judge, s)),
        ("6", lambda: fitted.table(ev, judge, s)),
    ]
    for name, make in tables:
        if int(name) not in which:
            continue
        start = time.perf_counter()
        table = [*make(), f"(table {name}: {time.perf_counter() - start:.0f} s)", ""]
        for line in table:
            log.info(line)
        if out is not None:
            with out.open("a") as f:
                f.write("\n".join(table) + "\n")
