"""Sample images from the model being trained (SupercondTrainLoRA's ``sample_every``): prompts in
kohya's sample-prompt format, ComfyUI's own sampler, fixed seeds; each image saved beside the
checkpoints and a grid of them shown live in the node through ComfyUI's progress-bar preview."""

from __future__ import annotations

import logging
import shlex
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...core.files import write_atomic
from ..errors import InputError

log = logging.getLogger("supercond")

SAMPLER, SCHEDULER = "euler", "normal"  # the documented defaults (README: training previews)
_OPTIONS = {"--n": "negative", "--s": "steps", "--l": "cfg", "--d": "seed", "--w": "width", "--h": "height"}


@dataclass(frozen=True)
class SamplePrompt:
    text: str
    negative: str = ""
    steps: int = 20
    cfg: float = 5.0
    seed: int = 0
    width: int | None = None  # pixels; None: the first training image's size
    height: int | None = None


def parse_prompts(text: str, seed: int, cfg: float) -> list[SamplePrompt]:
    """One prompt per line; kohya's options after the prompt: ``--n`` negative, ``--s`` steps, ``--l``
    cfg, ``--d`` seed, ``--w`` / ``--h`` size. Line k's seed defaults to ``seed + k``. Empty lines and
    lines starting with # are skipped."""
    out = []
    for k, line in enumerate(x.strip() for x in text.splitlines()):
        if not line or line.startswith("#"):
            continue
        try:
            words = shlex.split(line)
        except ValueError as e:
            raise InputError(f"sample_prompts line {k + 1} cannot be read ({e}): {line!r}") from None
        prompt, fields, i = [], {}, 0
        while i < len(words):
            if words[i] in _OPTIONS:
                if i + 1 >= len(words):
                    raise InputError(f"sample_prompts line {k + 1}: {words[i]} needs a value")
                fields[_OPTIONS[words[i]]] = words[i + 1]
                i += 2
            else:
                prompt.append(words[i])
                i += 1
        out.append(_typed(" ".join(prompt), fields, k, SamplePrompt(text="", seed=seed + k, cfg=cfg)))
    return out


def _typed(text: str, fields: dict[str, str], k: int, base: SamplePrompt) -> SamplePrompt:
    kinds = {"negative": str, "steps": int, "cfg": float, "seed": int, "width": int, "height": int}
    values: dict[str, Any] = {}
    for name, raw in fields.items():
        try:
            values[name] = kinds[name](raw)
        except ValueError:
            raise InputError(f"sample_prompts line {k + 1}: {name} must be a {kinds[name].__name__}, got {raw!r}") from None
    p = replace(base, text=text, **values)
    if p.steps < 1 or p.steps > 200:
        raise InputError(f"sample_prompts line {k + 1}: steps must be 1-200, got {p.steps}")
    if any(v is not None and (v < 16 or v > 4096) for v in (p.width, p.height)):
        raise InputError(f"sample_prompts line {k + 1}: width and height must be 16-4096 pixels")
    return p


def default_cfg(model: Any) -> float:
    """5 for models sampled with CFG; 1 for guidance-distilled ones (Flux dev reads a guidance input)."""
    from .. import family as fm

    return 1.0 if fm.family_of(model, "SupercondTrainLoRA").guidance_distilled else 5.0


def row_conditioning(row: dict) -> list:
    """A trainer cond row (tokens + extras) -> CONDITIONING for ComfyUI's sampler."""
    extra = {k: v for k, v in row.items() if k != "cross_attn"}
    return [[row["cross_attn"], extra]]


class Previewer:
    """Renders the sample prompts with the model as it is (the trainer's LoRA hooks attached)."""

    def __init__(self, model: Any, prompts: list[SamplePrompt], encode, fallback: list, empty: list | None,
                 latent_template: torch.Tensor, vae: Any | None, folder: Path, stem: str, writes: bool = True) -> None:
        self.model, self.prompts, self.vae = model, prompts, vae
        self.writes = writes  # False: sample only (a rank of a sharded base, which must take part)
        self.folder, self.stem = folder, stem
        self.template = latent_template  # one raw training latent [1, C, (T,) h, w]: channels and default size
        self.conds = [self._conds(p, encode, fallback, empty) for p in prompts]

    @staticmethod
    def _conds(p: SamplePrompt, encode, fallback: list, empty: list | None) -> tuple[list, list]:
        if encode is None:
            positive = fallback  # no CLIP: the first training caption
            negative = empty if empty is not None else [[torch.zeros_like(fallback[0][0]), {}]]
            return positive, negative
        return encode(p.text), encode(p.negative)

    def _latent(self, p: SamplePrompt) -> torch.Tensor:
        shape = list(self.template.shape)
        factor = 8
        if self.vae is not None and hasattr(self.vae, "spacial_compression_encode"):
            factor = int(self.vae.spacial_compression_encode())
        if p.height is not None:
            shape[-2] = max(1, p.height // factor)
        if p.width is not None:
            shape[-1] = max(1, p.width // factor)
        return torch.zeros([1, *shape[1:]])

    def render(self, step: int) -> list[Path]:
        """Sample every prompt, save ``<stem>_<step>_sample_<k>.png``; returns the files (none if not ``writes``)."""
        import comfy.sample

        files = []
        for k, (p, (pos, neg)) in enumerate(zip(self.prompts, self.conds, strict=True)):
            latent = self._latent(p)
            noise = comfy.sample.prepare_noise(latent, p.seed)
            with torch.no_grad():
                out = comfy.sample.sample(self.model, noise, p.steps, p.cfg, SAMPLER, SCHEDULER, pos, neg, latent,
                                          disable_pbar=True, seed=p.seed)
                if not self.writes:
                    continue
                image = self._to_image(out)
            path = self.folder / f"{self.stem}_{step:06d}_sample_{k:02d}.png"
            write_atomic(path, ".png", lambda tmp, im=image: im.save(tmp, format="PNG"))
            files.append(path)
        return files

    def _to_image(self, latent: torch.Tensor):
        from PIL import Image

        if self.vae is not None:
            pixels = self.vae.decode(latent)
            while pixels.dim() > 4:  # video VAEs: [B, T, H, W, 3] -> the first frame
                pixels = pixels[:, 0]
            arr = (pixels[0].clamp(0, 1).float().cpu().numpy() * 255).round().astype(np.uint8)
            return Image.fromarray(arr)
        import latent_preview

        fmt = self.model.model.latent_format
        if fmt.latent_rgb_factors is None:
            raise InputError("this model has no latent-to-RGB preview: connect a vae to see training samples")
        previewer = latent_preview.Latent2RGBPreviewer(fmt.latent_rgb_factors, fmt.latent_rgb_factors_bias)
        return previewer.decode_latent_to_preview(fmt.process_in(latent.float()))


def grid(files: list[Path], max_side: int = 1024):
    """The saved samples side by side, as one image for the node's live preview."""
    from PIL import Image

    images = [Image.open(f).convert("RGB") for f in files]
    height = max(im.height for im in images)
    width = sum(im.width for im in images)
    out = Image.new("RGB", (width, height), (24, 24, 24))
    x = 0
    for im in images:
        out.paste(im, (x, 0))
        x += im.width
    out.thumbnail((max_side, max_side))
    return out
