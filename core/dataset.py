"""Image-caption datasets: listing and checking a folder, content keys for the cache, and the
built-in example set (synthetic shapes drawn with torch, so nothing is downloaded)."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
EXAMPLE_NAME = "supercond_example"


class DatasetError(ValueError):
    """A dataset problem; the message names the file."""


def list_pairs(folder: Path) -> list[tuple[Path, str]]:
    """(image, caption) pairs of a folder, sorted by name; every image needs a same-name .txt."""
    if not folder.is_dir():
        raise DatasetError(f"dataset folder {folder} does not exist")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if not images:
        raise DatasetError(f"dataset folder {folder} has no images ({', '.join(IMAGE_EXTS)})")
    pairs = []
    for img in images:
        cap = img.with_suffix(".txt")
        if not cap.is_file():
            raise DatasetError(f"{img.name} has no caption file {cap.name} in {folder}")
        pairs.append((img, cap.read_text(encoding="utf-8").strip()))
    return pairs


def content_key(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else p.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def example_images(size: int = 256, count: int = 8) -> list[tuple[torch.Tensor, str]]:
    """(image [H, W, 3] in [0, 1], caption): discs and squares in a few colours on a gradient."""
    colours = {"red": (0.9, 0.15, 0.1), "blue": (0.1, 0.3, 0.9), "green": (0.15, 0.75, 0.2), "yellow": (0.95, 0.85, 0.1)}
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    out = []
    for i in range(count):
        name, rgb = list(colours.items())[i % len(colours)]
        shape = "disc" if i % 2 == 0 else "square"
        cx, cy = 0.35 + 0.3 * math.sin(i * 1.7) * 0.5, 0.5 + 0.25 * math.cos(i * 2.3) * 0.5
        r = 0.18 + 0.04 * (i % 3)
        mask = ((xx - cx) ** 2 + (yy - cy) ** 2 < r * r) if shape == "disc" else (
            ((xx - cx).abs() < r) & ((yy - cy).abs() < r))
        bg = torch.stack([0.85 - 0.3 * yy, 0.85 - 0.2 * yy, 0.9 - 0.1 * xx], dim=-1)
        img = torch.where(mask[..., None], torch.tensor(rgb), bg)
        out.append((img.clamp(0, 1), f"a {name} {shape} on a pale background, supercond style"))
    return out
