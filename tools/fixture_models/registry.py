"""Which fixture files exist, how they are cached, and how each model family is loaded and checked.

Files are cached in groups, each with its own version and stamp, so adding or changing one
family regenerates only its files. The sd15 + sd3 pair keeps the stamp it had before the split
(``checkpoints/.supercond-fixtures.json``), so existing caches stay valid.
"""

from __future__ import annotations

import fcntl
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import flux, qwen_image, sd, sdxl, wan
from .common import comfyui_version, is_fresh, save_checkpoint, setup_comfy, write_stamp

if TYPE_CHECKING:
    import torch

log = logging.getLogger("supercond.fixtures")

LOCK_NAME = ".supercond-fixtures.lock"


@dataclass(frozen=True)
class FixtureFile:
    key: str
    filename: str
    build: Callable[[], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Group:
    """Files generated and cached together under one stamp (in ``folder``)."""

    name: str
    version: int
    folder: str  # checkpoints | diffusion_models | vae
    files: tuple[FixtureFile, ...]
    stamp_name: str = ""

    @property
    def stamp_file(self) -> str:
        return self.stamp_name or f".supercond-fixtures-{self.name}.json"


def _one(name: str, version: int, folder: str, filename: str, builder: Callable[[], Any]) -> Group:
    return Group(name, version, folder, (FixtureFile(name, filename, builder),))


GROUPS: tuple[Group, ...] = (
    Group("sd", sd.SD_VERSION, "checkpoints", (
        FixtureFile("sd15", "supercond_sd15_tiny.safetensors", sd.sd15_state_dict),
        FixtureFile("sd3", "supercond_sd3_tiny.safetensors", sd.sd3_state_dict),
    ), stamp_name=".supercond-fixtures.json"),
    _one("sdxl", sdxl.SDXL_VERSION, "checkpoints", "supercond_sdxl_tiny.safetensors", sdxl.sdxl_state_dict),
    _one("flux", flux.FLUX_VERSION, "diffusion_models", "supercond_flux_tiny.safetensors", flux.flux_state_dict),
    _one("chroma", flux.CHROMA_VERSION, "diffusion_models", "supercond_chroma_tiny.safetensors",
         flux.chroma_state_dict),
    _one("qwen_image", qwen_image.QWEN_IMAGE_VERSION, "diffusion_models", "supercond_qwen_image_tiny.safetensors",
         qwen_image.qwen_image_state_dict),
    _one("wan21", wan.WAN21_VERSION, "diffusion_models", "supercond_wan21_t2v_tiny.safetensors",
         wan.wan21_state_dict),
    _one("flux_vae", flux.FLUX_VAE_VERSION, "vae", "supercond_flux_vae.safetensors", flux.flux_vae_state_dict),
    _one("wan21_vae", wan.WAN21_VAE_VERSION, "vae", "supercond_wan21_vae.safetensors", wan.wan21_vae_state_dict),
)
GROUP_OF: dict[str, Group] = {f.key: g for g in GROUPS for f in g.files}


@dataclass(frozen=True)
class Family:
    """How a family is loaded (ComfyUI's loader nodes) and what ComfyUI must detect it as."""

    name: str
    files: dict[str, str]  # role (checkpoint | unet | vae) -> file key
    supported_model: str  # exact class in comfy.supported_models
    model_base: str  # exact class in comfy.model_base
    model_type: str  # comfy.model_base.ModelType name
    model_sampling: str  # base class in comfy.model_sampling
    shift: float | None  # model_sampling.shift, where it has one
    latent_channels: int
    scheduler: str
    cfg: float  # what a workflow for the family typically uses
    context_width: int = 0  # conditioning tokens are [1, n, context_width]
    pad_to: int | None = None  # n for a short prompt, where the encoder pads (None: n follows the prompt)
    pooled_width: int | None = None  # pooled_output is [1, pooled_width] (None: no pooled output)
    standin: str | None = None  # stand-in text encoder (tools/fixture_models/standins.py); None: the checkpoint's
    frames: int | None = None  # video: frames of a test clip (latent T = 1 + (frames - 1) // 4)
    five_d: bool = False  # latents are [B, C, T, H, W] (latent_formats.Wan21, also Qwen-Image's)

    def latent_shape(self, batch: int, size: int, frames: int | None = None) -> tuple[int, ...]:
        """An empty latent for a size x size image (a clip of ``frames`` frames for video families)."""
        side = size // 8
        if not self.five_d:
            return (batch, self.latent_channels, side, side)
        frames = frames or self.frames or 1
        return (batch, self.latent_channels, 1 + (frames - 1) // 4, side, side)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("sd15", {"checkpoint": "sd15"}, "SD15", "BaseModel", "EPS", "ModelSamplingDiscrete", None, 4,
           "normal", 4.0, context_width=768, pad_to=77, pooled_width=768),
    # CLIP-L only: SD3ClipModel pads its tokens to T5's 4096 and the pooled output with CLIP-G's 1280 zeros.
    Family("sd3", {"checkpoint": "sd3"}, "SD3", "SD3", "FLOW", "ModelSamplingDiscreteFlow", 3.0, 16,
           "sgm_uniform", 4.0, context_width=4096, pad_to=77, pooled_width=2048),
    Family("sdxl", {"checkpoint": "sdxl"}, "SDXL", "SDXL", "EPS", "ModelSamplingDiscrete", None, 4,
           "normal", 4.0, context_width=2048, pad_to=77, pooled_width=1280),
    Family("flux", {"unet": "flux", "vae": "flux_vae"}, "Flux", "Flux", "FLUX", "ModelSamplingFlux", 1.15, 16,
           "simple", 1.0, context_width=4096, pad_to=256, pooled_width=768, standin="flux"),
    Family("chroma", {"unet": "chroma", "vae": "flux_vae"}, "Chroma", "Chroma", "FLUX", "ModelSamplingFlux", 1.15,
           16, "simple", 4.0, context_width=4096, standin="chroma"),
    Family("qwen_image", {"unet": "qwen_image", "vae": "wan21_vae"}, "QwenImage", "QwenImage", "FLUX",
           "ModelSamplingFlux", 1.15, 16, "simple", 2.5, context_width=3584, standin="qwen_image", five_d=True),
    Family("wan21", {"unet": "wan21", "vae": "wan21_vae"}, "WAN21_T2V", "WAN21", "FLOW",
           "ModelSamplingDiscreteFlow", 8.0, 16, "simple", 5.0, context_width=4096, pad_to=512, standin="wan",
           frames=5, five_d=True),
)}


def file_path(out: Path, key: str) -> Path:
    group = GROUP_OF[key]
    name = next(f.filename for f in group.files if f.key == key)
    return Path(out).expanduser().resolve() / group.folder / name


def groups_for(families: Iterable[str]) -> list[Group]:
    names = list(families)
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown fixture families {unknown}; known: {list(FAMILIES)}")
    keys = {key for n in names for key in FAMILIES[n].files.values()}
    return [g for g in GROUPS if any(f.key in keys for f in g.files)]


def expected_stamp(comfyui: Path, group: Group) -> dict[str, Any]:
    return {
        "fixture_version": group.version,
        "comfyui_version": comfyui_version(comfyui),
        "files": {f.key: f.filename for f in group.files},
    }


@contextmanager
def locked(out: Path) -> Iterator[None]:
    """One generator per models directory: parallel test sessions share the cache."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK_NAME, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_groups(comfyui: Path, out: Path, families: Iterable[str], *, force: bool = False) -> dict[str, Path]:
    """Generate each selected family's stale or missing groups; return {file key: path} of all their files.

    A fresh cache imports neither torch nor ComfyUI (stamps only).
    """
    comfyui = Path(comfyui).expanduser().resolve()
    out = Path(out).expanduser().resolve()
    groups = groups_for(families)
    paths: dict[str, Path] = {}
    with locked(out):
        for group in groups:
            folder = out / group.folder
            stamp_path = folder / group.stamp_file
            stamp = expected_stamp(comfyui, group)
            paths.update({f.key: folder / f.filename for f in group.files})
            regenerated = force or not is_fresh(stamp_path, stamp)
            if regenerated:
                generate(comfyui, group, folder, stamp_path, stamp)
            else:
                log.info("fixtures %s up to date in %s", group.name, folder)
            if group.name == "sd":
                sd.ensure_lora(comfyui, out, paths["sd15"], force=regenerated)
    return paths


def generate(comfyui: Path, group: Group, folder: Path, stamp_path: Path, stamp: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    # Drop the stamp first so an interrupted run is never mistaken for a complete one.
    stamp_path.unlink(missing_ok=True)
    setup_comfy(comfyui)
    for fixture in group.files:
        start = time.perf_counter()
        path = folder / fixture.filename
        save_checkpoint(path, fixture.build(), fixture.key, group.version)
        log.info("generated %s (%.0f MiB) in %.1f s", path.name, path.stat().st_size / 2**20,
                 time.perf_counter() - start)
    write_stamp(stamp_path, stamp)
