"""What the tables train on the evidence model, with the pack's own trainer nodes, cached like the build:
a file's name carries a digest of the checkpoint's build stamp and the recipe, so a second report
loads it with SupercondLoadHead / LoraLoaderModelOnly instead of training again."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from . import data
from .sampling import Evidence

log = logging.getLogger("supercond.evidence")
SUBFOLDER = "supercond_evidence"


def register_folders(models: Path) -> None:
    """Trained files go to ``models/loras``, ``models/supercond_heads`` and ``models/supercond_schedules``
    of the models folder the checkpoint lives in (first in ComfyUI's lists, so the trainers write there)."""
    import folder_paths

    folder_paths.add_model_folder_path("loras", str(models / "loras"), is_default=True)
    folder_paths.add_model_folder_path("supercond_heads", str(models / "supercond_heads"), is_default=True)
    folder_paths.add_model_folder_path("supercond_schedules", str(models / "supercond_schedules"), is_default=True)


def build_stamp(checkpoint: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(checkpoint), framework="pt") as f:
        return (f.metadata() or {}).get("supercond_evidence", "")


def prefix(ev: Evidence, name: str, recipe: Any) -> str:
    blob = json.dumps({"checkpoint": build_stamp(ev.path), "recipe": asdict(recipe)}, sort_keys=True)
    return f"{SUBFOLDER}/{name}_{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


RETRAIN = False  # scripts/evidence train --force: train again, overwriting the cached files


def _exists(folder: str, name: str) -> bool:
    """A cached file. The key is the recipe and the checkpoint's build stamp, not the trainers' code:
    after changing a trainer, ``train --force``."""
    import folder_paths

    return not RETRAIN and folder_paths.get_full_path(folder, name) is not None


@dataclass(frozen=True)
class HeadRecipe:
    """SupercondTrainHead in distill mode on the nine digits the model knows, empty negative."""

    head: str  # projection | last_block
    steps: int = 600
    learning_rate: float = 1e-3
    lora_rank: int = 8
    cfg_min: float = 1.5
    cfg_max: float = 8.0
    chains: int = 16  # trajectories in the pool, each step trains on all of them (an EmptyLatentImage's batch)
    seed: int = 0


@dataclass(frozen=True)
class NegativeHeadRecipe(HeadRecipe):
    """A last_block head that reads the negative prompt: the teacher draws each trajectory's negative from
    the captions of ``pool`` (digits), the empty prompt and the wired (empty) negative."""

    head: str = "last_block"
    pool: tuple[int, ...] = ()


def distilled_head(ev: Evidence, recipe: HeadRecipe) -> Any:
    """The evidence MODEL with a distilled head attached (trained once, then loaded); a
    ``NegativeHeadRecipe`` gives one that reads the negative prompt."""
    import nodes

    from supercond.nodes.singlepass.nodes import SupercondLoadHead
    from supercond.nodes.train.head import SupercondTrainHead

    reads = isinstance(recipe, NegativeHeadRecipe)
    stem = prefix(ev, "head_negatives" if reads else f"head_{recipe.head}", recipe)
    name = f"{stem}_{recipe.steps:06d}.safetensors"
    if _exists("supercond_heads", name):
        return SupercondLoadHead.execute(ev.model, name).result[0]
    what = f"negative-reading head on the negatives {recipe.pool}" if reads else f"{recipe.head} head"
    log.info("training the %s (%d steps; cached afterwards)", what, recipe.steps)
    positive = [entry for d in data.SEEN for entry in ev.positive[d]]  # Conditioning (Combine) of the prompts
    latent = nodes.EmptyLatentImage().generate(data.PX, data.PX, recipe.chains)[0]
    more = {"negative_prompts": "\n".join(data.caption(d) for d in recipe.pool), "clip": ev.clip} if reads else {}
    r = recipe
    out = SupercondTrainHead.execute(ev.model, positive, "distill", r.steps, r.learning_rate, r.head, r.lora_rank,
                                     r.cfg_min, r.cfg_max, r.seed, 0, stem, False, negative=ev.negative, latent=latent,
                                     **more)
    return out.result[0]


@dataclass(frozen=True)
class LoraRecipe:
    """SupercondTrainLoRA on ``images`` training images of ``digits`` (first of a seeded shuffle),
    captioned as in the build; ``empty`` attaches the empty prompt for caption dropout, as
    SupercondLoadDataset does. Saved every ``save_every`` steps so one run gives a curve."""

    digits: tuple[int, ...]
    images: int  # per digit
    steps: int
    save_every: int = 0
    learning_rate: float = 1e-4
    rank: int = 8
    batch_size: int = 4
    loss_weighting: str = "none"
    min_snr_gamma: float = 5.0
    cep_gamma: float = 0.0
    input_perturbation: float = 0.0
    offset_noise: float = 0.0
    caption_dropout: float = 0.0
    lr_schedule: str = "constant"
    seed: int = 0


def training_images(digits: tuple[int, ...], per_digit: int, seed: int = 0) -> data.Digits:
    train = data.load()[0]
    gen = torch.Generator().manual_seed(seed)
    keep = []
    for d in digits:
        idx = torch.nonzero(train.labels == d).flatten()
        keep.append(idx[torch.randperm(len(idx), generator=gen)[:per_digit]])
    return train.subset(torch.cat(keep))


def dataset(ev: Evidence, images: data.Digits, empty: bool) -> tuple[dict, list]:
    """(LATENT, CONDITIONING with one entry per latent) as SupercondLoadDataset would give them."""
    latent = ev.encode(images.pixels)
    extra = {"supercond_empty": {"cross_attn": ev.negative[0][0]}} if empty else {}
    conds = [[ev.positive[int(d)][0][0], dict(extra)] for d in images.labels]
    return latent, conds


def lora_steps(ev: Evidence, recipe: LoraRecipe) -> dict[int, str]:
    """Train (unless cached) and return {step: LoRA file name under loras} for every saved step."""
    from supercond.nodes.train.lora import SupercondTrainLoRA

    stem = prefix(ev, "lora_" + "".join(map(str, recipe.digits)), recipe)
    every = range(recipe.save_every, recipe.steps + 1, recipe.save_every) if recipe.save_every else ()
    saved = sorted({*every, recipe.steps})
    names = {s: f"{stem}_{s:06d}.safetensors" for s in saved}
    if all(_exists("loras", n) for n in names.values()):
        return names
    log.info("training a LoRA on %d images of %s (%d steps; cached afterwards)", recipe.images, recipe.digits,
             recipe.steps)
    latent, conds = dataset(ev, training_images(recipe.digits, recipe.images, recipe.seed), recipe.caption_dropout > 0)
    r = recipe
    SupercondTrainLoRA.execute(ev.model, latent, conds, r.steps, r.learning_rate, r.rank, float(r.rank), r.batch_size,
                               1, "auto", r.loss_weighting, r.min_snr_gamma, r.cep_gamma, "uniform",
                               r.input_perturbation, r.offset_noise, 0, r.caption_dropout, r.seed, False, r.lr_schedule,
                               0, 1.0, r.save_every, stem, False)
    return names


def with_lora(ev: Evidence, name: str, model: Any = None) -> Any:
    import nodes

    return nodes.LoraLoaderModelOnly().load_lora_model_only(model if model is not None else ev.model, name, 1.0)[0]


@dataclass(frozen=True)
class GistRecipe:
    """SupercondTrainHead in gist mode (seed 003): rolled captions on a captioned set of the nine known
    digits, a last_block head and a LoRA of the model trained jointly."""

    images: int  # per digit
    steps: int
    learning_rate: float = 1e-4
    lora_rank: int = 8
    seed: int = 0


def gist_model(ev: Evidence, recipe: GistRecipe) -> Any:
    """The evidence MODEL with the gist's LoRA and head (trained once, then loaded)."""
    from supercond.nodes.singlepass.nodes import SupercondLoadHead
    from supercond.nodes.train.head import SupercondTrainHead

    stem = prefix(ev, "gist", recipe)
    name = f"{stem}_{recipe.steps:06d}.safetensors"
    if _exists("supercond_heads", name) and _exists("loras", name):
        return SupercondLoadHead.execute(with_lora(ev, name), name).result[0]
    log.info("training the gist head and LoRA (%d steps; cached afterwards)", recipe.steps)
    latent, conds = dataset(ev, training_images(data.SEEN, recipe.images, recipe.seed), False)
    out = SupercondTrainHead.execute(ev.model, conds, "gist", recipe.steps, recipe.learning_rate, "last_block",
                                     recipe.lora_rank, 3.0, 9.0, recipe.seed, 0, stem, False, latent=latent)
    return out.result[0]
