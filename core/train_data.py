"""What the LoRA trainer draws its batches from: the encoded items (one latent each, possibly of
several bucket sizes), their optional masks, flipped latents and caption variants, and which items
make up the batch at any position of the run.

Every choice is a function of (seed, epoch, item) so the batch of any step is known without
replaying the ones before it, which is what makes resume exact. A dataset of one size keeps the
original order (positions run through seeded permutations across epoch ends), so runs without
buckets are unchanged; with several sizes, each epoch's batches are made bucket by bucket, as kohya
does, so a batch never mixes sizes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .seeds import seeded_generator

Cond = dict[str, Any]
_PERM, _FLIP, _VARIANT, _BUCKETS, _SPLIT = 1, 10, 11, 12, 13  # 1: the permutation stream epoch_indices always used


class DataError(ValueError):
    """Inconsistent training data: the message says what does not fit."""


def epoch_indices(n: int, batch: int, first: int, seed: int) -> torch.Tensor:
    """Dataset indices of sample positions ``first .. first + batch - 1`` of a run: positions run
    through epochs, each a seeded permutation (no repeats within one)."""
    return _positions(n, batch, first, seed)[0]


def _positions(n: int, batch: int, first: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    pos = first + torch.arange(batch)
    epoch = pos.div(n, rounding_mode="floor")
    out = torch.empty(batch, dtype=torch.long)
    for e in epoch.unique().tolist():
        perm = torch.randperm(n, generator=seeded_generator(seed, _PERM, e))
        out[epoch == e] = perm[pos[epoch == e] % n]
    return out, epoch


@dataclass
class Drawn:
    """One micro-batch's items: latents (flips applied), masks or None, one cond row each."""
    indices: torch.Tensor
    x0: torch.Tensor
    mask: torch.Tensor | None
    rows: list[Cond]


class TrainData:
    """Items for the trainer. ``latents``: a [N, ...] tensor or N tensors [1, ...] (sizes may differ);
    ``conds``: one row per item (or one for all), or per item a list of caption variants (one is used
    per epoch); ``masks``: per item a [1, 1, h, w] weight at latent size, or None; ``flipped``: per item
    its horizontally flipped latent (each epoch uses one of the two at random, as kohya does)."""

    def __init__(self, latents: torch.Tensor | Sequence[torch.Tensor], conds: Sequence[Cond | Sequence[Cond]],
                 masks: Sequence[torch.Tensor | None] | None = None,
                 flipped: Sequence[torch.Tensor] | None = None) -> None:
        if torch.is_tensor(latents):
            latents = list(latents.split(1)) if latents.shape[0] else []
        items = [t.detach().float().cpu() for t in latents]
        n = len(items)
        if n == 0:
            raise DataError("the dataset is empty: no latents to train on")
        if len(conds) not in (1, n):
            raise DataError(f"{n} latents but {len(conds)} conditionings: give one per latent, or one for all")
        if any(not torch.isfinite(t).all() for t in items):
            raise DataError("the latents contain NaN or Inf values")
        for name, extra in (("masks", masks), ("flipped latents", flipped)):
            if extra is not None and len(extra) != n:
                raise DataError(f"{n} latents but {len(extra)} {name}")
        self.n = n
        self.shapes = sorted({tuple(t.shape[1:]) for t in items})
        self.stacked = torch.cat(items) if len(self.shapes) == 1 else None  # fast indexing, one size
        self.items = items
        self.flipped = [f.detach().float().cpu() for f in flipped] if flipped is not None else None
        self.masks = self._masks(masks, items)
        self.conds = [list(c) if isinstance(c, (list, tuple)) else [c] for c in conds]
        self.buckets = [[i for i, t in enumerate(items) if tuple(t.shape[1:]) == s] for s in self.shapes]

    @staticmethod
    def _masks(masks: Sequence[torch.Tensor | None] | None, items: list[torch.Tensor]) -> list | None:
        if masks is None or all(m is None for m in masks):
            return None
        out = []
        for i, (m, t) in enumerate(zip(masks, items, strict=True)):
            if m is None:
                out.append(None)
                continue
            m = m.detach().float().cpu()
            if m.shape[-2:] != t.shape[-2:]:
                raise DataError(f"item {i}: mask {list(m.shape[-2:])} does not match its latent {list(t.shape[-2:])}")
            out.append(m)
        return out

    @property
    def multi_size(self) -> bool:
        return self.stacked is None

    # -- which items at which position ---------------------------------------------------------------
    def batches_per_epoch(self, batch: int) -> int:
        return sum(math.ceil(len(b) / batch) for b in self.buckets)

    def draw_indices(self, batch: int, position: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(item indices, their epoch) of the micro-batch at ``position`` (counted in micro-batches)."""
        if not self.multi_size:
            return _positions(self.n, batch, position * batch, seed)
        per_epoch = self.batches_per_epoch(batch)
        epoch, j = divmod(position, per_epoch)
        chunks = []
        for b, members in enumerate(self.buckets):
            perm = torch.randperm(len(members), generator=seeded_generator(seed, _BUCKETS, epoch, b))
            ids = torch.tensor(members)[perm]
            chunks += list(ids.split(batch))
        order = torch.randperm(len(chunks), generator=seeded_generator(seed, _BUCKETS, epoch, -1))
        idx = chunks[int(order[j])]
        return idx, torch.full_like(idx, epoch)

    # -- the items themselves --------------------------------------------------------------------------
    def draw(self, idx: torch.Tensor, epochs: torch.Tensor, seed: int) -> Drawn:
        pairs = list(zip(idx.tolist(), epochs.tolist(), strict=True))
        if self.flipped is None and self.stacked is not None:
            x0 = self.stacked[idx]
        else:
            x0 = torch.cat([self._latent(i, e, seed) for i, e in pairs])
        mask = None
        if self.masks is not None:
            ones = torch.ones((1, 1, *x0.shape[-2:]))
            mask = torch.cat([self._flip_if(self.masks[i] if self.masks[i] is not None else ones, i, e, seed)
                              for i, e in pairs])
        rows = [self._row(i, e, seed) for i, e in pairs]
        return Drawn(idx, x0, mask, rows)

    def flips(self, i: int, epoch: int, seed: int) -> bool:
        return self.flipped is not None and bool(
            torch.rand((), generator=seeded_generator(seed, _FLIP, epoch, i)) < 0.5)

    def _latent(self, i: int, epoch: int, seed: int) -> torch.Tensor:
        return self.flipped[i] if self.flips(i, epoch, seed) else self.items[i]

    def _flip_if(self, mask: torch.Tensor, i: int, epoch: int, seed: int) -> torch.Tensor:
        return mask.flip(-1) if self.flips(i, epoch, seed) else mask

    def _row(self, i: int, epoch: int, seed: int) -> Cond:
        variants = self.conds[i if len(self.conds) > 1 else 0]
        if len(variants) == 1:
            return variants[0]
        pick = torch.randint(len(variants), (), generator=seeded_generator(seed, _VARIANT, epoch, i))
        return variants[int(pick)]

    def tensors(self) -> list[tuple[str, Any]]:
        """Everything the run trains on, in a fixed order, for the resume digest."""
        out: list[tuple[str, Any]] = [("latent", t) for t in self.items]
        out += [("flipped", t) for t in self.flipped or []]
        out += [("mask", t) for t in self.masks or [] if t is not None]
        for variants in self.conds:
            for row in variants:
                out += sorted(row.items())
        return out


def split_validation(image_ids: Sequence[int], share: float, seed: int) -> tuple[list[int], list[int]]:
    """(training items, held-out items) with ``share`` of the distinct images held out (a seeded choice,
    at least one image each side), so a repeated image never lands on both sides."""
    distinct = sorted(set(image_ids))
    if share <= 0:
        return list(range(len(image_ids))), []
    if len(distinct) < 2:
        raise DataError("validation needs at least 2 distinct images (one to train on, one held out)")
    count = min(len(distinct) - 1, max(1, round(share * len(distinct))))
    perm = torch.randperm(len(distinct), generator=seeded_generator(seed, _SPLIT))
    held = {distinct[int(j)] for j in perm[:count]}
    train = [i for i, v in enumerate(image_ids) if v not in held]
    val = [i for i, v in enumerate(image_ids) if v in held]
    return train, val
