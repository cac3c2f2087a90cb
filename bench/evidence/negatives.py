"""Table 5: negative prompts at one model call per step.

A last_block head trained with ``negative_prompts`` (the captions of every known digit but 3) reads the
wired negative's tokens; the table prompts the other known digits with the negatives ``a handwritten
three`` and ``a handwritten five`` (held out: never training negatives; the model never saw a 5) and
``a handwritten eight`` (in the pool), and asks whether
single-pass with that negative does what two-pass CFG with it does. Two-pass CFG with a digit as the
negative pushes its images away from that digit: the judge's log-probability of the negative's digit
drops and, at high scales, adherence too (the guidance overshoots). Per row: those figures and each
image's pixel distance to the two-pass CFG image of the same seed with the same negative (the guidance
error on the trained model) and with the empty negative."""

from __future__ import annotations

import torch

from . import artifacts, data, guidance, metrics, plots, report
from .sampling import Drawn, Evidence

POOL = (0, 1, 2, 4, 6, 7, 8, 9)  # the head's training negatives: every known digit but 3
HELD_OUT_NEGATIVE = 3  # the grid shows this one (report.Settings.negatives: 3, 5 held out; 8 in the pool)


def per_image(values: torch.Tensor, labels: torch.Tensor, s: report.Settings) -> metrics.Figure:
    """The mean of per-image ``values`` with a bootstrap interval that redraws images within each prompt."""
    groups = [torch.nonzero(labels == d).flatten() for d in labels.unique()]
    return metrics.bootstrap(lambda g: float(values[torch.cat(g)].mean()), groups, s.rounds, s.seed)


def distance(a: Drawn, b: Drawn) -> torch.Tensor:
    """Per image: the pixel (L2, 8x8 ink) distance between two draws of the same seeds."""
    return (a.pixels - b.pixels).flatten(1).norm(dim=1)


def table(ev: Evidence, judge: metrics.Judge, s: report.Settings) -> list[str]:
    import nodes

    from supercond.nodes.singlepass.nodes import SupercondSinglePass

    def single(model: object) -> object:
        return SupercondSinglePass.execute(model, 0, "head").result[0]

    reads = single(artifacts.distilled_head(ev, recipe(s)))
    empty_only = guidance.heads(ev, s)["last_block"]
    rows, verdicts, shown = [], [], {}
    for neg_digit in s.negatives:
        word = data.caption(neg_digit)
        negative = nodes.CLIPTextEncode().encode(ev.clip, word)[0]
        digits = tuple(d for d in data.SEEN if d != neg_digit)
        where = "held out" if neg_digit not in POOL else "in the pool"
        for scale in s.negative_scales:
            def draw(model: object = None, neg: list | None = None, digits: tuple = digits, scale: float = scale
                     ) -> Drawn:
                return ev.draw(digits, s.per_digit, s.seed, steps=s.steps, cfg=scale, model=model, negative=neg)

            cfg_empty, cfg_neg = draw(), draw(neg=negative)
            todo = {
                "two-pass CFG, empty negative": (cfg_empty, cfg_empty),
                f"two-pass CFG, negative '{word}'": (cfg_neg, cfg_neg),
                "single-pass negative-reading head, empty negative": (draw(reads, ev.negative), cfg_empty),
                f"single-pass negative-reading head, negative '{word}'": (draw(reads, negative), cfg_neg),
                f"single-pass empty-only head, negative '{word}'": (draw(empty_only, negative), cfg_neg),
            }
            at = {}
            for name, (drawn, same) in todo.items():
                with torch.no_grad():
                    logp = judge.net(drawn.pixels).log_softmax(-1)[:, neg_digit]
                extra = {"log P(negative's digit)": per_image(logp, drawn.labels, s),
                         "distance to CFG, same negative": per_image(distance(drawn, same), drawn.labels, s),
                         "distance to CFG, empty negative": per_image(distance(drawn, cfg_empty), drawn.labels, s)}
                at[name] = report.measure(judge, drawn, s, f"{name}, cfg {scale:g}", name, scale, **extra)
                if neg_digit == HELD_OUT_NEGATIVE and scale == max(s.negative_scales):
                    shown[short(name, word, data.WORDS[neg_digit])] = drawn.pixels[:: s.per_digit]
            rows += at.values()
            verdicts.append(verdict(at, word, where, scale))
    plots.grid(shown, f"negative '{data.caption(HELD_OUT_NEGATIVE)}', cfg {max(s.negative_scales):g}, same seeds: "
               "the first image of each prompted digit", "evidence_negatives_grid.png")
    extra_columns = ("log P(negative's digit)", "distance to CFG, same negative", "distance to CFG, empty negative")
    return [*report.lines(f"5. Negative prompts at one call per step ({s.steps} steps; prompts: the known digits "
                          "but the negative's)", rows, ("adherence", "FD"), extra_columns), "", *verdicts]


def short(name: str, word: str, digit_word: str) -> str:
    """A row's name short enough for the grid's labels: "reading head, 'three'"."""
    for long, brief in (("two-pass ", ""), ("single-pass ", ""), ("negative-reading", "reading"), (word, digit_word),
                        (" negative", "")):
        name = name.replace(long, brief)
    return name


def recipe(s: report.Settings) -> artifacts.NegativeHeadRecipe:
    return artifacts.NegativeHeadRecipe(steps=s.head_steps, pool=POOL)


def verdict(at: dict[str, report.Row], word: str, where: str, scale: float) -> str:
    """Is the negative-reading head closer to CFG with the negative than the empty-only head is, and does
    the negative lower the log-probability of its digit as CFG's does?"""
    cfg = at[f"two-pass CFG, negative '{word}'"]
    cfg_empty = at["two-pass CFG, empty negative"]
    mine = at[f"single-pass negative-reading head, negative '{word}'"]
    other = at[f"single-pass empty-only head, negative '{word}'"]
    d_mine, d_other = mine.extra["distance to CFG, same negative"], other.extra["distance to CFG, same negative"]
    if d_mine.high < d_other.low:
        closer = "closer to CFG with the negative than the empty-only head"
    elif d_mine.low > d_other.high:
        closer = "further from CFG with the negative than the empty-only head"
    else:
        closer = "as far from CFG with the negative as the empty-only head (intervals overlap)"
    key = "log P(negative's digit)"
    return (f"- '{word}' ({where}), cfg {scale:g}: the head is {closer} ({d_mine.value:.3g} vs "
            f"{d_other.value:.3g}); log P of the negative's digit: CFG {cfg_empty.extra[key].value:.3g} -> "
            f"{cfg.extra[key].value:.3g} with the negative, the head {mine.extra[key].value:.3g}")
