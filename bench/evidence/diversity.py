"""Table 2: diversity. CADS (perturbing the positive branch only, or both) and sampling-time CEP
against plain CFG at a high scale, as diversity-against-adherence curves (lowering the scale is the
plain way to buy diversity); and seed 003's gist (a head and LoRA trained with rolled captions,
sampled single-pass) against a LoRA trained with caption dropout at the same budget and sampled with
two-pass CFG."""

from __future__ import annotations

from typing import Any

from . import artifacts, data, metrics, plots, report
from .sampling import Evidence

CADS_SCALES = (0.1, 0.25, 0.5)  # CADS noise_scale s (the paper's SD default 0.25)
CEP_GAMMAS = (1.0, 16.0, 64.0)  # CEP-U gamma, a fresh draw at every step (the paper trains with 1)
CFG_CURVE = (1.5, 3.0, 5.0)  # plain CFG below the table's scale
GIST_CFGS = (3.0, 5.0)
GIST_LR, GIST_RANK = 1e-4, 8  # SupercondTrainHead's default learning rate; the same for the dropout LoRA


def cads(model: Any, noise_scale: float, branch: str) -> Any:
    from supercond.nodes.perturb.nodes import SupercondCADS

    return SupercondCADS.execute(model, 0.6, 0.9, noise_scale, 1.0, "tokens", branch, "sigma", 0).result[0]


def cep(model: Any, gamma: float) -> Any:
    from supercond.nodes.perturb.nodes import SupercondCEP

    return SupercondCEP.execute(model, gamma, "uniform", "paper", "tokens", "positive", "every_step", 0).result[0]


def table(ev: Evidence, judge: metrics.Judge, s: report.Settings) -> list[str]:
    top = s.diversity_cfg

    def row(name: str, method: str, x: float, model: Any = None, cfg: float = top) -> report.Row:
        drawn = ev.draw(data.SEEN, s.per_digit, s.seed, steps=s.steps, cfg=cfg, model=model)
        return report.measure(judge, drawn, s, name, method, x)

    rows = [row(f"CFG {c:g}", "plain CFG", c, cfg=c) for c in (*CFG_CURVE, top)]
    for branch in ("positive", "both"):
        rows += [row(f"CADS {branch}, s {n:g}, cfg {top:g}", f"CADS ({branch})", n, cads(ev.model, n, branch))
                 for n in CADS_SCALES]
    rows += [row(f"CEP-U gamma {g:g}, cfg {top:g}", "CEP (sampling)", g, cep(ev.model, g)) for g in CEP_GAMMAS]
    gist, dropout = fine_tuned(ev, s)
    for c in GIST_CFGS:
        rows.append(row(f"gist head + LoRA, single-pass, cfg {c:g}", "gist (single-pass)", c, gist, c))
        rows.append(row(f"caption-dropout LoRA, two-pass, cfg {c:g}", "dropout LoRA (two-pass)", c, dropout, c))
    plots.series(rows, ("Vendi", "Vendi"), "", f"Table 2: diversity against adherence and FD ({s.per_digit} per digit)",
                 "evidence_diversity.png", against=("adherence", "FD"))
    budget = (f"Gist and dropout rows: both fine-tuned from the evidence model for {s.gist_steps} steps at batch 4 "
              f"on {s.gist_images} images of each known digit, LoRA rank {GIST_RANK}, lr {GIST_LR:g}; the gist also "
              "trains a last_block head.")
    return [*report.lines("2. Diversity: CADS, CEP and the gist against plain CFG", rows,
                          ("adherence", "FD", "Vendi", "pairwise")), "", budget]


def fine_tuned(ev: Evidence, s: report.Settings) -> tuple[Any, Any]:
    """(the gist's model sampled single-pass, the caption-dropout LoRA's model): the same images, steps,
    LoRA rank, learning rate, cosine schedule and batch (4, the head trainer's)."""
    from supercond.nodes.singlepass.nodes import SupercondSinglePass

    gist = artifacts.GistRecipe(images=s.gist_images, steps=s.gist_steps, learning_rate=GIST_LR, lora_rank=GIST_RANK)
    dropout = artifacts.LoraRecipe(digits=data.SEEN, images=s.gist_images, steps=s.gist_steps,
                                   learning_rate=GIST_LR, rank=GIST_RANK, caption_dropout=0.1,
                                   lr_schedule="cosine")  # SupercondTrainHead always decays to 0 (cosine)
    single = SupercondSinglePass.execute(artifacts.gist_model(ev, gist), 0, "head").result[0]
    return single, artifacts.with_lora(ev, artifacts.lora_steps(ev, dropout)[s.gist_steps])
