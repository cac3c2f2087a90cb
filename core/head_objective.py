"""Objectives for training a second (unconditional) output head, pure torch.

Two ways to get a head (seed 003 and research/singlepass.md section 4):

- **gist** (madebyollin's single-pass superconditioning): about 10% of a batch gets a swapped
  caption (the gist rolls the batch's captions by one; here it is drawn from the dataset's
  captions, see ``swap_captions``). A caption drawn independently of the image carries no
  information about it, so the second output trained on those samples learns the unconditional
  prediction; the first output is trained on the others only.
- **distill**: a frozen model teaches the head its own prediction for the empty prompt. The guided
  error is ``(s - 1) * (u_hat - u)`` at scale ``s``, so each sample is weighted by ``(s - 1)^2``
  for a scale drawn from the range the head will be used at, plus a flat term so the head is
  still learned near ``s = 1``. The flat term equals the range's mean ``(s - 1)^2`` (half the
  weight is flat): on the toy bench a small floor (0.25) starved the low scales (direction error
  0.22 vs 0.08 unweighted at s = 1.5) and gained nothing measurable at s = 8.

Per-sample errors are means over every non-batch axis, so the loss scale does not depend on the
latent size.
"""

from __future__ import annotations

import torch

GIST_FRACTION = 0.1  # the gist's share of swapped ("rolled") captions
DISTILL_FLOOR = 0.25  # the least flat term of the distillation weight, (s - 1)^2 + floor
FLAT_SHARE = 1.0  # the flat term as a multiple of the range's mean (s - 1)^2


class HeadTrainError(ValueError):
    """Bad head-training input: the message says what was wrong and what to do."""


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


# -- gist ------------------------------------------------------------------------------------------
def swap_captions(captions: torch.Tensor, pool: torch.Tensor, fraction: float, generator: torch.Generator,
                  draw_generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(caption per sample, swapped mask): about ``fraction`` of the samples take a caption drawn from
    ``pool`` (the dataset's caption per item, so each caption by its frequency, the sample's own
    included) instead of their own. The draw ignores the image, so the swapped samples teach the head
    the prediction averaged over captions: the unconditional one. (Taking another sample's caption, as
    the gist's roll does, excludes the sample's own: on a small dataset that teaches "not this
    caption".) The mask is drawn first, as a CFG dropout mask would be; the replacements come from
    ``draw_generator`` when given, so ``generator`` then advances exactly as a dropout run's does."""
    if not 0.0 < fraction < 1.0:
        raise HeadTrainError(f"the rolled fraction must be in (0, 1), got {fraction}")
    if pool.numel() < 2 or bool((pool == pool[0]).all()):
        raise HeadTrainError("gist mode swaps captions: it needs a dataset with at least 2 different captions")
    swapped = torch.rand(len(captions), generator=generator) < fraction
    drawn = pool[torch.randint(len(pool), (len(captions),), generator=draw_generator or generator)]
    return torch.where(swapped, drawn, captions), swapped


def gist_loss(pred_cond: torch.Tensor, pred_uncond: torch.Tensor, target: torch.Tensor,
              rolled: torch.Tensor) -> torch.Tensor:
    """Each sample supervises exactly one output: the unconditional one if its caption was rolled,
    else the conditional one (the gist's masked sum, averaged over the batch)."""
    rolled = rolled.to(pred_cond.device)
    per_cond = per_sample_mse(pred_cond, target)
    per_uncond = per_sample_mse(pred_uncond, target)
    return torch.where(rolled, per_uncond, per_cond).mean()


# -- distillation ----------------------------------------------------------------------------------
def check_scale_range(cfg_min: float, cfg_max: float) -> None:
    if not (1.0 <= cfg_min <= cfg_max):
        raise HeadTrainError(f"need 1 <= cfg_min <= cfg_max, got cfg_min {cfg_min} and cfg_max {cfg_max}")


def sample_scales(n: int, cfg_min: float, cfg_max: float, generator: torch.Generator) -> torch.Tensor:
    check_scale_range(cfg_min, cfg_max)
    return cfg_min + (cfg_max - cfg_min) * torch.rand(n, generator=generator)


def guidance_weight(scales: torch.Tensor, floor: float = DISTILL_FLOOR) -> torch.Tensor:
    return (scales - 1.0).pow(2) + floor


def mean_square_gap(cfg_min: float, cfg_max: float) -> float:
    """E[(s - 1)^2] for s uniform on [cfg_min, cfg_max] (closed form)."""
    check_scale_range(cfg_min, cfg_max)
    a, b = cfg_min - 1.0, cfg_max - 1.0
    return a * a if b == a else (b**3 - a**3) / (3.0 * (b - a))


def distill_floor(cfg_min: float, cfg_max: float) -> float:
    return max(FLAT_SHARE * mean_square_gap(cfg_min, cfg_max), DISTILL_FLOOR)


def mean_guidance_weight(cfg_min: float, cfg_max: float, floor: float = DISTILL_FLOOR) -> float:
    """E[(s - 1)^2] + floor for s uniform on [cfg_min, cfg_max]."""
    return mean_square_gap(cfg_min, cfg_max) + floor


def distill_loss(uncond_hat: torch.Tensor, uncond_teacher: torch.Tensor, scales: torch.Tensor,
                 cfg_min: float, cfg_max: float, floor: float | None = None) -> torch.Tensor:
    """Scale-weighted error of the head's unconditional prediction against the teacher's, normalised
    by the mean weight of the range so the learning rate means the same for any range. ``floor``
    defaults to ``distill_floor`` (half the weight flat)."""
    floor = distill_floor(cfg_min, cfg_max) if floor is None else floor
    w = guidance_weight(scales.to(uncond_hat.device).float(), floor) / mean_guidance_weight(cfg_min, cfg_max, floor)
    return (w * per_sample_mse(uncond_hat, uncond_teacher)).mean()


def guided(cond: torch.Tensor, uncond: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    return uncond + scale * (cond - uncond)


def guidance_errors(cond: torch.Tensor, uncond: torch.Tensor, uncond_hat: torch.Tensor,
                    scale: float) -> dict[str, float]:
    """How far single-pass guidance is from two-pass CFG at one scale:

    - ``rel_guided``: |guided_hat - guided| / |guided|, the error of what the sampler uses;
    - ``rel_delta``: |u_hat - u| / |c - u|, the error of the guidance direction (scale-free).
    """
    g = guided(cond, uncond, scale).float()
    g_hat = guided(cond, uncond_hat, scale).float()
    eps = torch.finfo(torch.float32).tiny
    return {"rel_guided": float((g_hat - g).norm() / g.norm().clamp_min(eps)),
            "rel_delta": float((uncond_hat.float() - uncond.float()).norm()
                               / (cond.float() - uncond.float()).norm().clamp_min(eps))}
