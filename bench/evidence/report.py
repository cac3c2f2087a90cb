"""``scripts/evidence report``: the tables, every sample drawn through ComfyUI's own loader, text
encoder, KSampler and VAE decode, as a user's graph would, and read by the metrics' judge."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import data, metrics

log = logging.getLogger("supercond.evidence")


@dataclass
class Evidence:
    """The loaded checkpoint and its encoded prompts."""

    model: Any
    clip: Any
    vae: Any
    positive: list  # per digit
    negative: list  # the empty prompt

    @classmethod
    def load(cls, checkpoint: Path) -> Evidence:
        import folder_paths
        import nodes

        folder_paths.add_model_folder_path("checkpoints", str(checkpoint.parent.parent))
        name = f"{checkpoint.parent.name}/{checkpoint.name}"
        model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(name)
        encode = nodes.CLIPTextEncode().encode
        return cls(model, clip, vae, [encode(clip, data.caption(d))[0] for d in range(10)], encode(clip, "")[0])

    def sample(self, digit: int, n: int, seed: int, *, model: Any = None, steps: int = 20, cfg: float = 5.0,
               sampler: str = "euler", scheduler: str = "normal") -> torch.Tensor:
        """``n`` images of ``digit`` from one seeded batch, read back as (n, 8, 8) ink."""
        import nodes

        latent = nodes.EmptyLatentImage().generate(data.PX, data.PX, n)[0]
        out = nodes.common_ksampler(model or self.model, seed, steps, cfg, sampler, scheduler,
                                    self.positive[digit], self.negative, latent)[0]
        with torch.no_grad():
            return data.read(self.vae.decode(out["samples"])).detach()

    def sample_all(self, per_digit: int, seed: int, **kw) -> tuple[torch.Tensor, torch.Tensor]:
        pix = [self.sample(d, per_digit, seed + 1000 * d, **kw) for d in range(10)]
        return torch.cat(pix), torch.arange(10).repeat_interleave(per_digit)


def row(name: str, calls: float, rep: metrics.Report) -> str:
    return (f"{name:<28}{calls:>7.0f}  {rep.adherence!s:<24}{rep.fd!s:<26}{rep.vendi!s:<24}"
            f"{rep.memorization!s:<24}")


HEAD = f"{'sampler':<28}{'calls':>7}  {'adherence':<24}{'FD':<26}{'Vendi':<24}{'nn-dist ratio':<24}"


def base_table(ev: Evidence, judge: metrics.Judge, per_digit: int, seed: int, rounds: int) -> list[str]:
    """Has the model learned? Real images against the stock KSampler at several CFG scales."""
    lines = [HEAD]
    real = judge.train.subset(torch.cat([torch.nonzero(judge.train.labels == d).flatten()[:per_digit]
                                         for d in range(10)]))
    lines.append(row("real (training images)", 0, judge.report(real.pixels, real.labels, rounds, seed)))
    for cfg in (1.0, 3.0, 5.0, 8.0):
        pix, lab = ev.sample_all(per_digit, seed, cfg=cfg)
        calls = 20 * (1 if cfg == 1.0 else 2)
        lines.append(row(f"KSampler euler 20, cfg {cfg:g}", calls, judge.report(pix, lab, rounds, seed)))
    return lines
