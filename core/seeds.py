"""Private, seeded random generators: every random draw in the pack comes from one of these, so a
seed reproduces a result on any device and the global RNG is never touched."""

from __future__ import annotations

import torch


def seeded_generator(*parts: int) -> torch.Generator:
    """A private CPU generator seeded from several integers (mixed, so nearby seeds differ)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    g = torch.Generator(device="cpu")
    g.manual_seed(h & 0x7FFFFFFFFFFFFFFF)
    return g
