"""``scripts/evidence build``: train the evidence model, deterministically from a seed, and write it
as one SD1.x checkpoint that CheckpointLoaderSimple reads (UNet, CLIP-L, the exact digit codec as
its TAESD-format VAE). Cached: a second run with the same settings only prints the path.

The UNet has SD1.x's layout (model_channels 320 and context_dim 768 are what ComfyUI detects SD1.x
by) cut to one level without a middle block for 8x8 latents (19M parameters; with SD1.x's middle
block 26M and 1.5x the time a step on this 2-core CPU). It is trained from scratch with SD1.x's own
eps objective and noise schedule, on the conditioning ComfyUI's CLIPTextEncode produces for each
caption, with 10% of captions dropped to the empty prompt so CFG has a real unconditional
prediction. One digit (``data.HELD_OUT``) is left out of its training data, so the trainer's table
has something new to teach it. The CLIP-L keeps its seeded random weights: its outputs differ per
caption, which is all conditioning needs.
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from . import codec, data

log = logging.getLogger("supercond.evidence")
VERSION = 2  # bump when what a given config produces changes
FILENAME = "supercond_evidence/digits_sd15.safetensors"


def unet_config() -> dict[str, Any]:
    """The SD1.x fixture's one-level UNet (tools/fixture_models/sd.py), sized for 8x8 latents and without
    its middle block (-2: ComfyUI's detection reads a checkpoint without middle_block keys so)."""
    from supercond.tools.fixture_models.sd import SD15_UNET

    return {**SD15_UNET, "image_size": 8, "transformer_depth_middle": -2}


@dataclass(frozen=True)
class BuildConfig:
    seed: int = 0
    steps: int = 2500
    batch: int = 32
    lr: float = 4e-4
    warmup: int = 100
    ema: float = 0.998
    bf16: bool = True  # autocast: 0.60 s a step instead of 1.12 in fp32 on a 2-core AVX-512 CPU; weights stay fp32
    caption_dropout: float = 0.1
    min_snr: float = 5.0  # min-SNR-gamma weighting (Hang et al. 2023): high-noise steps get their share
    held_out: int = data.HELD_OUT  # this digit's images are left out of training (-1: none)
    limit: int = 0  # train on the first N training images only (0: all); the CI miniature uses it
    unet: dict = None  # type: ignore[assignment]  # None: unet_config()

    def stamp(self) -> str:
        return json.dumps({"version": VERSION, **asdict(self), "unet": self.unet or unet_config()}, sort_keys=True)


def checkpoint_path(models: Path) -> Path:
    return Path(models) / "checkpoints" / FILENAME


def cached(path: Path, cfg: BuildConfig) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("supercond_evidence") == cfg.stamp()
    except (OSError, ValueError, RuntimeError):
        return False


def build(models: Path, cfg: BuildConfig = BuildConfig(), force: bool = False) -> Path:
    """Train (unless a file with the same settings is there) and return the checkpoint's path."""
    path = checkpoint_path(models)
    if cached(path, cfg) and not force:
        log.info("cached: %s", path)
        return path
    from supercond.tools.fixture_models import common, sd

    train, _test = data.load()
    train = train.subset(train.labels != cfg.held_out)
    if cfg.limit:
        train = train.subset(torch.arange(min(cfg.limit, len(train))))
    mean, std = float(train.pixels.mean()), float(train.pixels.std())
    clip_sd = common.prefixed(common.build(sd.clip_l), "cond_stage_model.transformer.", drop=("text_projection.weight",))
    vae_sd = {f"first_stage_model.{k}": v for k, v in codec.state_dict(mean, std).items()}
    unet_cfg = cfg.unet or unet_config()
    unet = common.build(lambda: _unet(unet_cfg))  # torch's default init under the fixtures' seed
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        # The same CLIP and VAE, read back through ComfyUI, make the training data exactly as a graph would.
        start = Path(tmp) / "start.safetensors"
        _save(start, {**common.prefixed(unet, "model.diffusion_model."), **clip_sd, **vae_sd}, "start")
        conds, empty, latents, sigmas = _encode(start, train)
    trained = train_unet(unet, conds, empty, latents, train.labels, sigmas, cfg)
    _save(path, {**common.prefixed(trained, "model.diffusion_model."), **clip_sd, **vae_sd}, cfg.stamp())
    log.info("wrote %s", path)
    return path


def _unet(cfg: dict) -> torch.nn.Module:
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    from supercond.tools.fixture_models.common import comfy_ops

    return UNetModel(**cfg, dtype=torch.float32, device="cpu", operations=comfy_ops())


def _save(path: Path, tensors: dict[str, torch.Tensor], stamp: str) -> None:
    from safetensors.torch import save_file

    from supercond.tools.fixture_models.common import write_atomically

    tensors = {k: v.detach().float().contiguous() for k, v in tensors.items()}
    write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata={"supercond_evidence": stamp}))


@torch.no_grad()
def _encode(checkpoint: Path, train: data.Digits):
    """Per-digit caption conditioning, the empty prompt's, the training latents as the model sees
    them, and the model's 1000 discrete sigmas: all through ComfyUI's loader, CLIP and VAE."""
    import comfy.sd

    model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(checkpoint), output_vae=True, output_clip=True)[:3]
    kind = type(model.model.model_config).__name__
    if kind != "SD15" or type(vae.first_stage_model).__name__ != "TAESD":
        raise RuntimeError(f"ComfyUI read the evidence checkpoint as {kind} with a "
                           f"{type(vae.first_stage_model).__name__} VAE, not SD15 with its TAESD codec")

    def text(caption: str) -> torch.Tensor:
        return clip.encode_from_tokens_scheduled(clip.tokenize(caption))[0][0].float()

    conds = torch.cat([text(data.caption(d)) for d in range(10)])
    latents = model.model.process_latent_in(vae.encode(data.render(train.pixels)).float())
    sigmas = model.get_model_object("model_sampling").sigmas.float().clone()
    return conds, text(""), latents, sigmas


def train_unet(unet: torch.nn.Module, conds: torch.Tensor, empty: torch.Tensor, latents: torch.Tensor,
               labels: torch.Tensor, sigmas: torch.Tensor, cfg: BuildConfig) -> torch.nn.Module:
    """SD1.x's eps objective in ComfyUI's parameterization: the UNet sees (x0 + sigma eps) /
    sqrt(sigma^2 + 1) at timestep t and predicts eps. Returns the EMA weights."""
    from tqdm import tqdm

    gen = torch.Generator().manual_seed(cfg.seed)
    unet.train()
    for p in unet.parameters():
        p.requires_grad_(True)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup))
    n = latents.shape[0]
    bar = tqdm(range(cfg.steps), desc="evidence model", unit="step")
    for _ in bar:
        idx = torch.randint(0, n, (cfg.batch,), generator=gen)
        x0 = latents[idx]
        t = torch.randint(0, len(sigmas), (cfg.batch,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        s = sigmas[t].view(-1, 1, 1, 1)
        xc = (x0 + s * eps) / (s * s + 1).sqrt()
        drop = torch.rand(cfg.batch, generator=gen) < cfg.caption_dropout
        context = torch.where(drop.view(-1, 1, 1), empty.expand(cfg.batch, -1, -1), conds[labels[idx]])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            pred = unet(xc, t.float(), context=context)
        snr = 1 / s.flatten().square()
        weight = snr.clamp(max=cfg.min_snr) / snr if cfg.min_snr else torch.ones_like(snr)
        loss = (weight * (pred.float() - eps).square().mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), unet.parameters(), strict=True):
                e.lerp_(p, 1 - cfg.ema)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    return ema


def trial(steps: int) -> BuildConfig:
    return replace(BuildConfig(), steps=steps)


def miniature() -> BuildConfig:
    """The same pipeline, seconds long: what CI runs so the build cannot rot."""
    return replace(BuildConfig(), steps=3, batch=4, warmup=1, limit=16)
