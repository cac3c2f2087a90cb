"""Table 4: the LoRA trainer teaching the evidence model the digit it never saw (data.HELD_OUT).

SupercondTrainLoRA on a few dozen training images of that digit, captioned as the build captions
them, checkpoints every few steps loaded back with the stock LoraLoaderModelOnly and sampled with the
KSampler: adherence and FD against training steps, for plain eps loss, min-SNR-5, input
perturbation and offset noise at equal steps. Then CEP on and off on very few images (the paper's
memorization regime): FD and how close samples sit to those few images."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from . import artifacts, data, metrics, plots, report
from .sampling import Drawn, Evidence

DOZENS = 36  # images of the held-out digit for the curves
FEW = 8  # the memorization regime
CFG = 5.0


def recipes(s: report.Settings) -> dict[str, artifacts.LoraRecipe]:
    base = artifacts.LoraRecipe(digits=(data.HELD_OUT,), images=DOZENS, steps=s.lora_steps, save_every=s.lora_every,
                                learning_rate=s.lora_lr)
    return {
        "plain eps loss": base,
        "min-SNR 5": replace(base, loss_weighting="min_snr"),
        "input perturbation 0.1": replace(base, input_perturbation=0.1),
        "offset noise 0.1": replace(base, offset_noise=0.1),
    }


def few(s: report.Settings) -> dict[str, artifacts.LoraRecipe]:
    base = artifacts.LoraRecipe(digits=(data.HELD_OUT,), images=FEW, steps=s.lora_steps, learning_rate=s.lora_lr)
    return {f"{FEW} images, CEP off": base, f"{FEW} images, CEP-U gamma 1": replace(base, cep_gamma=1.0),
            f"{FEW} images, CEP-U gamma 8": replace(base, cep_gamma=8.0)}


def loras(ev: Evidence, s: report.Settings) -> dict[str, dict[int, str]]:
    """Every LoRA of the table (trained once, then cached): name -> {step: file under loras}."""
    return {name: artifacts.lora_steps(ev, r) for name, r in {**recipes(s), **few(s)}.items()}


def table(ev: Evidence, judge: metrics.Judge, s: report.Settings) -> list[str]:
    digit = (data.HELD_OUT,)

    def sample(model: Any = None) -> Drawn:
        return ev.draw(digit, s.trainer_samples, s.seed, steps=s.steps, cfg=CFG, model=model)

    rows = [report.measure(judge, sample(), s, "base model, no LoRA", "base", 0)]
    files = loras(ev, s)
    for name in recipes(s):
        for step, file in files[name].items():
            drawn = sample(artifacts.with_lora(ev, file))
            rows.append(report.measure(judge, drawn, s, f"{name}, {step} steps", name, step))
    curves = [replace(rows[0], method=m) for m in recipes(s)] + rows[1:]  # every curve starts at step 0
    plots.series(curves, ("adherence", "FD"), "LoRA training steps",
                 f"Table 4: teaching the unseen digit {data.HELD_OUT} ({DOZENS} images, {s.trainer_samples} samples)",
                 "evidence_trainer.png")
    shown = {}
    memo = []
    for name, recipe in few(s).items():
        reference = artifacts.training_images(recipe.digits, recipe.images, recipe.seed).pixels
        drawn = sample(artifacts.with_lora(ev, files[name][recipe.steps]))
        copying = judge.copying(drawn.pixels, reference, data.HELD_OUT, s.rounds, s.seed)
        memo.append(report.measure(judge, drawn, s, f"{name}, {recipe.steps} steps", name, recipe.steps,
                                   copying=copying))
        shown[name] = drawn.pixels[:12]
    shown["its training images"] = artifacts.training_images(digit, FEW, recipe.seed).pixels
    plots.grid(shown, f"LoRAs on {FEW} images of the unseen digit, CEP off and on", "evidence_trainer_few.png")
    return [*report.lines(f"4. LoRA trainer: the unseen digit {data.HELD_OUT}, {DOZENS} images, lr {s.lora_lr:g}, "
                          f"rank 8, batch 4 (cfg {CFG:g}, {s.trainer_samples} samples a row)", rows,
                          ("adherence", "FD", "Vendi")),
            "",
            *report.lines(f"4b. CEP in the memorization regime ({FEW} images; copying = nearest-training-image "
                          "distance to those images, samples over held-out real)", memo,
                          ("adherence", "FD", "Vendi"), ("copying",))]
