"""Initial and training noise: ComfyUI-compatible seeded noise, offset noise and pyramid
(multi-resolution) noise. Pure torch, one implementation for sampling and for the trainer.

- ``seeded_noise`` reproduces ComfyUI's ``comfy.sample.prepare_noise`` bit for bit (same seed,
  same ``batch_index`` handling) without touching the global RNG.
- ``structure_noise`` adds offset noise (Guttenberg 2023, kohya's ``noise_offset``) and pyramid
  noise (kohya's ``pyramid_noise_like``), in kohya's order, with one private generator per batch
  row, seeded from (seed, the row's batch index), so a row's noise does not depend on the rest of
  the batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .seeds import seeded_generator

_SALT = 0x0FF5E7


class NoiseError(ValueError):
    """Bad input to a noise function: the message says what was wrong."""


def seeded_noise(like: torch.Tensor, seed: int, batch_index: Sequence[int] | None = None) -> torch.Tensor:
    """Unit Gaussian noise shaped like ``like`` exactly as ComfyUI's RandomNoise draws it (CPU).

    Without batch_index the whole tensor is one draw; with it, draws for indices 0..max are made one
    latent at a time and picked by index (so latent 3 of a batch equals latent 3 drawn alone).
    """
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    kw = dict(dtype=like.dtype, layout=like.layout, generator=gen, device="cpu")
    if batch_index is None:
        return torch.randn(like.size(), **kw)
    inds = [int(i) for i in batch_index]
    draws: dict[int, torch.Tensor] = {}
    wanted = set(inds)
    for i in range(max(inds) + 1):
        n = torch.randn([1, *like.shape[1:]], **kw)
        if i in wanted:
            draws[i] = n
    return torch.cat([draws[i] for i in inds], dim=0)


def row_generators(seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    """One private CPU generator per batch row, from (seed, the row's batch index)."""
    return [seeded_generator(int(seed), _SALT, int(i)) for i in indices]


def offset_component(shape: Sequence[int], generators: Sequence[torch.Generator]) -> torch.Tensor:
    """delta ~ N(0, 1) per (row, channel), shaped [B, C, 1, ...] to broadcast over space (and time)."""
    b, c = shape[0], shape[1]
    rows = [torch.randn((1, c), generator=g, dtype=torch.float32) for g in generators[:b]]
    return torch.cat(rows).view(b, c, *([1] * (len(shape) - 2)))


def pyramid_noise(noise: torch.Tensor, generators: Sequence[torch.Generator], iterations: int,
                  discount: float) -> torch.Tensor:
    """kohya's ``pyramid_noise_like`` (multi-resolution noise), per row: for levels i = 0, 1, ... (at
    most ``iterations``) draw r ~ U(2, 4) and noise at (H, W) / r^i, upsample it bilinearly and add it
    weighted discount^i; stop once a side is 1. Level 0 is a second full-resolution draw, as in kohya.
    Not renormalised (``structure_noise`` does that). The one difference from kohya: each row draws its
    own r and noise from its own generator (kohya: one r per level for the batch, global RNG), so a
    row's noise does not depend on the rest of the batch. Axes between channel and the last two
    (video frames) get their own draws."""
    h, w = noise.shape[-2:]
    flat = noise.float().reshape(noise.shape[0], -1, h, w)
    out = []
    for row, g in zip(flat, generators, strict=False):
        acc = row.clone()
        for i in range(iterations):
            r = float(torch.rand((), generator=g)) * 2 + 2
            hn, wn = max(1, int(h / r**i)), max(1, int(w / r**i))
            small = torch.randn((1, row.shape[0], hn, wn), generator=g, dtype=torch.float32)
            acc += F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)[0] * discount**i
            if hn == 1 or wn == 1:
                break
        out.append(acc)
    return torch.stack(out).reshape(noise.shape)


def structure_noise(noise: torch.Tensor, generators: Sequence[torch.Generator], offset: float = 0.0,
                    pyramid_iterations: int = 0, pyramid_discount: float = 0.3,
                    normalize: bool = True) -> torch.Tensor:
    """Offset noise, then pyramid noise, on top of unit noise [B, C, ...] (one generator per row), in
    kohya's order (``apply_noise_offset`` then ``pyramid_noise_like``).

    normalize=False (training, as kohya): n + offset*delta, then pyramid noise added and the sum
    divided by its std over the whole batch. normalize=True (sampling, SupercondOffsetNoise): unit
    variance per row: n + offset*delta divided by sqrt(1 + offset^2) without pyramid noise, by the
    row's own std with it. offset 0 and iterations 0 return ``noise`` itself.
    """
    if offset < 0 or not math.isfinite(offset):
        raise NoiseError(f"offset must be a finite number >= 0, got {offset}")
    if pyramid_iterations < 0:
        raise NoiseError(f"pyramid_iterations must be >= 0, got {pyramid_iterations}")
    if not 0.0 < pyramid_discount <= 1.0 and pyramid_iterations > 0:
        raise NoiseError(f"pyramid_discount must be in (0, 1], got {pyramid_discount}")
    if noise.dim() < 3:
        raise NoiseError(f"expected noise shaped [batch, channels, ..., height, width], got {list(noise.shape)}")
    if len(generators) < noise.shape[0]:
        raise NoiseError(f"need one generator per batch row: {len(generators)} for {noise.shape[0]} rows")
    if offset == 0 and pyramid_iterations == 0:
        return noise
    out = noise.float()
    if offset > 0:
        out = out + offset * offset_component(out.shape, generators)
    if pyramid_iterations > 0:
        out = pyramid_noise(out, generators, pyramid_iterations, pyramid_discount)
        if normalize:
            out = out / out.flatten(1).std(dim=1).view(-1, *([1] * (out.dim() - 1)))
        else:
            out = out / out.std()
    elif normalize:
        out = out / math.sqrt(1.0 + offset * offset)
    return out.to(noise.dtype)
