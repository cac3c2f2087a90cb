"""Drawing digits from the evidence model as a user's graph would: ComfyUI's CheckpointLoaderSimple,
CLIPTextEncode, KSampler (or SamplerCustomAdvanced with a GUIDER or SIGMAS from a node) and VAE
decode, read back to 8x8 ink for the judge. Every image of a draw is one row of one batch with its
own prompt, so a table row is one sampler run (one per digit for guiders that decide per batch, with
the same noise rows). Model calls are counted, not assumed; sampler time is measured."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import data

COUNT_KEY = "supercond.evidence.count"
# The sampler runs under bf16 autocast, as the model was trained: half the time of float32 on this
# CPU (AVX-512 bf16), the same for every row of every table. VAE decoding stays float32.
AUTOCAST = torch.bfloat16


@dataclass(frozen=True)
class Drawn:
    pixels: torch.Tensor  # (N, 8, 8) ink
    labels: torch.Tensor  # (N,) the digit each image was prompted with
    calls: float  # diffusion-model evaluations per image (NFE), counted
    seconds: float = 0.0  # sampler wall time per image (not the VAE decode)

    def __add__(self, other: Drawn) -> Drawn:
        n, m = len(self.labels), len(other.labels)
        return Drawn(torch.cat([self.pixels, other.pixels]), torch.cat([self.labels, other.labels]),
                     (self.calls * n + other.calls * m) / (n + m), (self.seconds * n + other.seconds * m) / (n + m))


class CallCounter:
    """A DIFFUSION_MODEL wrapper that adds up the batch rows the model is run on."""

    def __init__(self) -> None:
        self.rows = 0

    def __call__(self, executor: Any, *args: Any, **kwargs: Any) -> Any:
        self.rows += int(args[0].shape[0])
        return executor(*args, **kwargs)


def counted(model: Any) -> tuple[Any, CallCounter]:
    """A clone of ``model`` whose diffusion-model calls are counted (other clones are not touched)."""
    import comfy.patcher_extension as pe

    counter = CallCounter()
    m = model.clone()
    m.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, COUNT_KEY, counter)
    return m, counter


# (model, positive, negative, cfg) -> GUIDER, for SamplerCustomAdvanced
GuiderFactory = Callable[[Any, list, list, float], Any]


class BatchRows:
    """A NOISE for SamplerCustomAdvanced: rows [start, stop) of the noise RandomNoise(seed) gives a batch
    of ``size`` latents, so a batch split per prompt starts from the same noise as the whole batch."""

    def __init__(self, seed: int, size: int, start: int, stop: int) -> None:
        self.seed, self.size, self.start, self.stop = seed, size, start, stop

    def generate_noise(self, input_latent: dict) -> torch.Tensor:
        import comfy.sample

        samples = input_latent["samples"]
        full = comfy.sample.prepare_noise(torch.zeros(self.size, *samples.shape[1:]), self.seed)
        return full[self.start:self.stop]


@dataclass
class Evidence:
    """The loaded checkpoint and its encoded prompts."""

    model: Any
    clip: Any
    vae: Any
    positive: list  # CONDITIONING per digit, all ten (the held-out digit's caption too)
    negative: list  # the empty prompt
    path: Path
    memo: dict = field(default_factory=dict, repr=False)  # plain KSampler draws, shared between tables

    @classmethod
    def load(cls, checkpoint: Path) -> Evidence:
        import folder_paths
        import nodes

        # first in the list: ComfyUI's own folder may hold another evidence checkpoint under the same name
        folder_paths.add_model_folder_path("checkpoints", str(checkpoint.parent.parent), is_default=True)
        name = f"{checkpoint.parent.name}/{checkpoint.name}"
        found = folder_paths.get_full_path("checkpoints", name)
        if found is None or Path(found).resolve() != checkpoint.resolve():
            raise RuntimeError(f"CheckpointLoaderSimple would read {found} for {name}, not {checkpoint}")
        model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(name)
        encode = nodes.CLIPTextEncode().encode
        return cls(model, clip, vae, [encode(clip, data.caption(d))[0] for d in range(10)], encode(clip, "")[0],
                   checkpoint)

    def prompts(self, labels: torch.Tensor) -> list:
        """One CONDITIONING whose batch row i is the caption of ``labels[i]``."""
        rows = [self.positive[int(d)][0] for d in labels]
        extra = {k: torch.cat([r[1][k] for r in rows]) for k, v in rows[0][1].items() if isinstance(v, torch.Tensor)}
        return [[torch.cat([r[0] for r in rows]), extra]]

    def encode(self, pixels: torch.Tensor) -> dict:
        """(N, 8, 8) ink -> LATENT, through the checkpoint's VAE (VAEEncode)."""
        import nodes

        return nodes.VAEEncode().encode(self.vae, data.render(pixels))[0]

    def decode(self, latent: dict) -> torch.Tensor:
        import nodes

        with torch.no_grad():
            return data.read(nodes.VAEDecode().decode(self.vae, latent)[0]).detach()

    def draw(self, digits: tuple[int, ...], per_digit: int, seed: int, *, model: Any = None, steps: int = 20,
             cfg: float = 5.0, sampler: str = "euler", scheduler: str = "normal", sigmas: torch.Tensor | None = None,
             guider: GuiderFactory | None = None, batch_per_digit: bool = False, negative: list | None = None
             ) -> Drawn:
        """``per_digit`` images of each digit, one batch from one seed. ``batch_per_digit``: one sampler run
        per prompt (what a guider that decides for the whole batch needs, e.g. adaptive guidance), each
        on its rows of the whole batch's noise. ``negative``: a CONDITIONING instead of the empty prompt."""
        if batch_per_digit:
            size = len(digits) * per_digit
            parts = [self._draw((d,), per_digit, seed, model, steps, cfg, sampler, scheduler, sigmas, guider,
                                BatchRows(seed, size, i * per_digit, (i + 1) * per_digit), negative)
                     for i, d in enumerate(digits)]
            out = parts[0]
            for part in parts[1:]:
                out = out + part
            return out
        plain = (model is None or model is self.model) and sigmas is None and guider is None and negative is None
        key = (digits, per_digit, seed, steps, cfg, sampler, scheduler)
        if plain and key in self.memo:
            return self.memo[key]
        drawn = self._draw(digits, per_digit, seed, model, steps, cfg, sampler, scheduler, sigmas, guider, None,
                           negative)
        if plain:
            self.memo[key] = drawn
        return drawn

    def _draw(self, digits: tuple[int, ...], per_digit: int, seed: int, model: Any, steps: int, cfg: float,
              sampler: str, scheduler: str, sigmas: torch.Tensor | None, guider: GuiderFactory | None,
              noise: BatchRows | None, negative: list | None = None) -> Drawn:
        labels = torch.tensor(digits).repeat_interleave(per_digit)
        m, counter = counted(model if model is not None else self.model)
        latent = {"samples": torch.zeros(len(labels), 4, data.PX // 8, data.PX // 8)}
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=AUTOCAST):
            negative = negative if negative is not None else self.negative
            out = self._sample(m, self.prompts(labels), negative, latent, seed, steps, cfg, sampler, scheduler, sigmas,
                               guider, noise)
        seconds = (time.perf_counter() - start) / len(labels)
        return Drawn(self.decode(out), labels, counter.rows / len(labels), seconds)

    @staticmethod
    def _sample(model: Any, positive: list, negative: list, latent: dict, seed: int, steps: int, cfg: float,
                sampler: str, scheduler: str, sigmas: torch.Tensor | None, guider: GuiderFactory | None,
                noise: Any) -> dict:
        import nodes
        from comfy_extras import nodes_custom_sampler as cs

        if sigmas is None and guider is None and noise is None:  # the stock KSampler
            return nodes.common_ksampler(model, seed, steps, cfg, sampler, scheduler, positive, negative, latent)[0]
        if sigmas is None:
            sigmas = cs.BasicScheduler().get_sigmas(model, scheduler, steps, 1.0)[0]
        if guider is None:
            g = cs.CFGGuider().get_guider(model, positive, negative, cfg)[0]
        else:
            g = guider(model, positive, negative, cfg)
        noise = noise if noise is not None else cs.RandomNoise().get_noise(seed)[0]
        s = cs.KSamplerSelect().get_sampler(sampler)[0]
        return cs.SamplerCustomAdvanced().sample(noise, g, s, sigmas, latent)[0]
