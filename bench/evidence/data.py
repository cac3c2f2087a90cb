"""The digits: scikit-learn's 1,797 8x8 handwritten digits (43 writers), a seeded held-out split,
rendered as 64x64 px images, with captions ``a handwritten <word>``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PX = 64  # rendered size; each digit pixel becomes an 8x8 block, the codec's latent cell
GRID = 8  # the digits' own resolution
SPLIT_SEED = 20240101
TEST_FRACTION = 0.2
HELD_OUT = 5  # the base model never sees this digit: the trainer's table teaches it with a LoRA
SEEN = tuple(d for d in range(10) if d != HELD_OUT)


def caption(digit: int) -> str:
    return f"a handwritten {WORDS[digit]}"


@dataclass(frozen=True)
class Digits:
    pixels: torch.Tensor  # (N, 8, 8) ink in [0, 1]
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, keep: torch.Tensor) -> Digits:
        return Digits(self.pixels[keep], self.labels[keep])

    def of(self, digit: int) -> Digits:
        return self.subset(self.labels == digit)


def load(seed: int = SPLIT_SEED, test_fraction: float = TEST_FRACTION) -> tuple[Digits, Digits]:
    """(train, held-out test), stratified: the same share of every digit is held out."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    pixels = torch.from_numpy(raw.images).float() / 16.0  # the data's 17 grey levels, 0..16
    labels = torch.from_numpy(raw.target).long()
    gen = torch.Generator().manual_seed(seed)
    test = torch.zeros(len(labels), dtype=torch.bool)
    for d in range(10):
        idx = torch.nonzero(labels == d).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        test[idx[: round(len(idx) * test_fraction)]] = True
    return Digits(pixels[~test], labels[~test]), Digits(pixels[test], labels[test])


def render(pixels: torch.Tensor) -> torch.Tensor:
    """(N, 8, 8) ink -> ComfyUI IMAGE (N, 64, 64, 3): white ink on black, each pixel an 8x8 block."""
    big = pixels.repeat_interleave(PX // GRID, dim=1).repeat_interleave(PX // GRID, dim=2)
    return big.unsqueeze(-1).expand(-1, -1, -1, 3).contiguous()


def read(images: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE (N, H, W, 3) of any size -> (N, 8, 8) ink: grey, averaged over each cell."""
    grey = images.float().mean(dim=-1, keepdim=True).permute(0, 3, 1, 2)
    return torch.nn.functional.adaptive_avg_pool2d(grey, GRID)[:, 0].clamp(0, 1)
