"""SupercondLoadDataset: a folder of images + captions -> LATENT and CONDITIONING for the trainer,
encoded once and cached on disk by content; kornia flip / random-crop applied before encoding."""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from comfy_api.v0_0_2 import io, ui

from ...core.dataset import (
    EXAMPLE_BUCKETS_NAME,
    EXAMPLE_NAME,
    DatasetError,
    Item,
    bucket_for,
    content_key,
    fit_pair,
    list_items,
    make_buckets,
    process_caption,
)
from ...core.seeds import seeded_generator
from ..checked import CheckedNode
from ..inputs import MAX_SEED
from .dataset_files import load_image_and_mask, write_example, write_example_buckets

log = logging.getLogger("supercond")
CACHE_VERSION = "3"  # 2: keys include CLIP skip and LoRA patches; 3: image and text entries apart
CACHE_MAX_AGE_DAYS = 30  # entries nobody used for this long are removed
SHUFFLE_VARIANTS = 8
EXAMPLES = {EXAMPLE_NAME: write_example, EXAMPLE_BUCKETS_NAME: lambda p: write_example_buckets(p, 128)}


def _fingerprint(module: torch.nn.Module, backup: dict | None = None) -> str:
    """Cheap identity of a model's base weights (count, first, middle and last tensors' sums) for cache
    keys. ``backup``: ModelPatcher's originals of weights patched in place, so a model that is loaded
    with its LoRA applied reads the same as when it is not."""
    state = [(k, v) for k, v in module.state_dict().items() if torch.is_tensor(v) and v.numel()]
    if not state:
        return "none"
    picks = [state[0], state[len(state) // 2], state[-1]]
    sums = []
    for key, value in picks:
        original = (backup or {}).get(key)
        tensor = original.weight if original is not None else value
        sums.append(f"{float(tensor.float().sum()):.6e}")
    return f"{len(state)}:" + ":".join(sums)


def _describe(value, out: list[str], depth: int = 0) -> None:
    """A patch's content as text: tensors by shape and sums, adapters by their weights, numbers as is."""
    if depth > 4:
        out.append(type(value).__name__)
    elif torch.is_tensor(value):
        v = value.detach().float()
        out.append(f"T{tuple(v.shape)}:{float(v.sum()):.6e}:{float(v.abs().sum()):.6e}")
    elif isinstance(value, (tuple, list)):
        for item in value:
            _describe(item, out, depth + 1)
    elif hasattr(value, "weights"):  # comfy.weight_adapter adapters (LoRA, LoHa, ...)
        out.append(type(value).__name__)
        _describe(value.weights, out, depth + 1)
    elif value is None or isinstance(value, (str, int, float, bool)):
        out.append(repr(value))
    else:
        out.append(getattr(value, "__name__", type(value).__name__))


def encoder_identity(patcher, extra: str = "") -> str:
    """What decides an encoder's outputs: its base weights, every patch on them (a LoRA from LoraLoader,
    with its strengths) and ``extra`` settings (CLIPSetLastLayer's layer). Without the patches a cache
    keyed on weights alone returns the unpatched encoding after a LoRA is added."""
    parts = [_fingerprint(patcher.model, getattr(patcher, "backup", None)), extra]
    for key in sorted(getattr(patcher, "patches", {}), key=str):
        parts.append(str(key))
        _describe(patcher.patches[key], parts)
    return content_key(*parts)


def augment(pixels: torch.Tensor, resolution: int, random_crop: bool, seed: int) -> torch.Tensor:
    """[1, C, H, W] -> [1, C, res, res]: shorter side to res (x1.15 with random_crop), then a random
    (or centre) crop, seeded. Any channel count: a mask rides along as a 4th channel, cropped alike."""
    import kornia.augmentation as K
    from kornia.geometry.transform import resize

    h, w = pixels.shape[-2:]
    scale = resolution * (1.15 if random_crop else 1.0) / min(h, w)
    pixels = resize(pixels, (max(resolution, round(h * scale)), max(resolution, round(w * scale))),
                    interpolation="bilinear", antialias=True)
    crop = K.RandomCrop((resolution, resolution)) if random_crop else K.CenterCrop((resolution, resolution))
    with torch.random.fork_rng(devices=[]):  # kornia draws from the global RNG: seed it privately
        torch.manual_seed(int(seeded_generator(seed).initial_seed()))
        pixels = crop(pixels)
    return pixels.clamp(0, 1)


def fit(pixels: torch.Tensor, mask: torch.Tensor | None, bucket: tuple[int, int] | None, resolution: int,
        random_crop: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An image (and its mask, the same crop) at its training size: its bucket, or the square of old."""
    if bucket is not None:
        out, m, _ = fit_pair(pixels, mask, bucket, random_crop, seeded_generator(seed))
        return out, m
    both = augment(pixels if mask is None else torch.cat([pixels, mask], dim=1), resolution, random_crop, seed)
    return both[:, :3], (None if mask is None else both[:, 3:])


def _encode_text(clip, text: str) -> dict[str, torch.Tensor]:
    cond = clip.encode_from_tokens_scheduled(clip.tokenize(text))
    tokens, extra = cond[0]
    out = {"cross_attn": tokens}
    if isinstance(extra.get("pooled_output"), torch.Tensor):
        out["pooled_output"] = extra["pooled_output"]
    return out


def _cached(path: Path, make) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from ...core.files import WriteError, save_atomic

    if path.exists():
        try:
            value = load_file(str(path))
            os.utime(path)  # "last used", for pruning
            return value
        except Exception as e:  # a damaged cache entry is rebuilt, never trusted
            log.warning("supercond: rebuilding damaged cache entry %s (%s)", path.name, e)
    value = {k: v.detach().cpu().contiguous() for k, v in make().items()}
    try:
        save_atomic(path, value, {"supercond_cache": CACHE_VERSION})
    except WriteError as e:  # a cache only saves time: go on without it
        log.warning("supercond: dataset cache entry not kept (%s)", e)
    return value


def tidy_cache(folder: Path, max_age_days: float = CACHE_MAX_AGE_DAYS) -> tuple[int, int, int]:
    """Delete entries unused for ``max_age_days`` (a use touches them); (entries, bytes, removed) after."""
    cutoff = time.time() - max_age_days * 86400
    count, size, removed = 0, 0, 0
    for p in folder.glob("*.safetensors"):
        try:
            st = p.stat()
            if st.st_mtime < cutoff:
                p.unlink()
                removed += 1
                continue
        except OSError:
            continue
        count, size = count + 1, size + st.st_size
    return count, size, removed


@dataclass
class Settings:
    """What decides an image's encoding (the cache keys on all of it)."""
    resolution: int
    buckets: list[tuple[int, int]] | None
    flip: bool
    random_crop: bool
    seed: int

    def key(self) -> str:
        return f"{self.resolution}:{self.buckets}:{self.flip}:{self.random_crop}:{self.seed}"


def encode_image(item: Item, index: int, s: Settings, vae, vae_fp: str, cache: Path) -> dict[str, torch.Tensor]:
    """latent (+ flipped latent, + mask at latent size) of one image, cached by content and settings."""
    mask_bytes = Path(item.mask).read_bytes() if isinstance(item.mask, Path) else str(item.mask).encode()
    key = content_key(item.image.read_bytes(), mask_bytes, s.key(), str(index), vae_fp, "image", CACHE_VERSION)

    def make() -> dict[str, torch.Tensor]:
        pixels, mask = load_image_and_mask(item.image, item.mask)
        bucket = bucket_for(item.image, pixels.shape[-1], pixels.shape[-2], s.buckets) if s.buckets else None
        pixels, mask = fit(pixels, mask, bucket, s.resolution, s.random_crop, s.seed * 100003 + index)
        out = {"latent": vae.encode(pixels.permute(0, 2, 3, 1))}
        if s.flip:  # both flips cached: the trainer picks one per epoch, as kohya does
            out["flipped"] = vae.encode(pixels.flip(-1).permute(0, 2, 3, 1))
        if mask is not None:
            out["mask"] = F.interpolate(mask, size=out["latent"].shape[-2:], mode="area")  # kohya's reduction
        return out

    return _cached(cache / f"{key}.safetensors", make)


def captions(text: str, trigger: str, shuffle: bool, keep_tokens: int, seed: int, index: int) -> list[str]:
    """The caption with its trigger; with shuffle, SHUFFLE_VARIANTS seeded orders of its tags (the trainer
    uses one per epoch: the encoding is cached, so kohya's per-step shuffle becomes a per-epoch choice)."""
    if not shuffle:
        return [process_caption(text, trigger, False, keep_tokens, None)]
    out = []
    for v in range(SHUFFLE_VARIANTS):
        caption = process_caption(text, trigger, True, keep_tokens, seeded_generator(seed, 0xCA9, index, v))
        if caption not in out:
            out.append(caption)
    return out


class SupercondLoadDataset(CheckedNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SupercondLoadDataset",
            display_name="Load Training Dataset (Supercond)",
            category="supercond/training",
            description=("Images with same-name .txt (or .caption) captions from a folder under ComfyUI's input "
                         "directory, sub-folders included (<N>_<name> repeats each image N times, as kohya), "
                         "encoded once with the VAE and CLIP and cached on disk (a re-run is fast). Masks for "
                         "masked loss come from an image's alpha channel or a <name>_mask.png. "
                         f"Folder '{EXAMPLE_NAME}' (square) and '{EXAMPLE_BUCKETS_NAME}' (mixed aspect, masks, a "
                         "repeats folder) are built-in example sets, written on first use."),
            inputs=[
                io.String.Input("folder", default=EXAMPLE_NAME,
                                tooltip="Sub-folder of ComfyUI's input directory holding image + caption pairs."),
                io.Clip.Input("clip", tooltip="Encodes the captions (and the empty prompt, for caption dropout)."),
                io.Vae.Input("vae", tooltip="Encodes the images to latents."),
                io.Int.Input("resolution", default=512, min=64, max=4096, step=64,
                             tooltip="Training size in pixels: the square side, or with buckets the side of "
                                     "the square whose area every bucket stays within."),
                io.Boolean.Input("flip", default=False,
                                 tooltip="Horizontal flip augmentation: both flips are encoded and each epoch "
                                         "uses one at random (seeded), as kohya does."),
                io.Boolean.Input("random_crop", default=False,
                                 tooltip="Random crop (seeded) instead of a centre crop: from a 15% larger resize "
                                         "without buckets, along the longer side with them."),
                io.Int.Input("seed", default=0, min=0, max=MAX_SEED, tooltip="Seed of the augmentation."),
                io.Boolean.Input("buckets", default=False, optional=True,
                                 tooltip="Aspect-ratio buckets (kohya): sizes of about resolution^2 pixels in steps "
                                         "of 64, each image resized to cover its nearest bucket and cropped; a "
                                         "training batch holds one bucket. Off: every image a centre-cropped "
                                         "square, as before."),
                io.String.Input("trigger", default="", optional=True,
                                tooltip="Trigger word or prefix tags put first in every caption (unless it already "
                                        "starts with them); always kept in place when shuffling."),
                io.Boolean.Input("shuffle_tags", default=False, optional=True,
                                 tooltip=f"Shuffle the comma-separated tags after the first keep_tokens: "
                                         f"{SHUFFLE_VARIANTS} seeded orders are encoded and each epoch uses one."),
                io.Int.Input("keep_tokens", default=0, min=0, max=255, optional=True,
                             tooltip="Tags at the start that shuffle_tags leaves in place (the trigger counts)."),
            ],
            outputs=[
                io.Latent.Output(display_name="LATENT", tooltip="The training latents. With buckets of several "
                                 "sizes, samples holds the most common size (for previews) and the trainer reads "
                                 "all of them from the same LATENT."),
                io.Conditioning.Output(display_name="CONDITIONING", tooltip="One entry per image, for the trainer."),
            ],
        )

    @classmethod
    def execute(cls, folder, clip, vae, resolution, flip, random_crop, seed, buckets=False, trigger="",
                shuffle_tags=False, keep_tokens=0) -> io.NodeOutput:
        import folder_paths

        root = Path(folder_paths.get_input_directory()).resolve()
        path = (root / folder).resolve()
        if os.path.commonpath([root, path]) != str(root):
            raise DatasetError(f"folder {folder!r} is outside ComfyUI's input directory")
        if folder in EXAMPLES and not path.exists():
            EXAMPLES[folder](path)
            log.info("supercond: wrote the example dataset to %s", path)
        images = list_items(path)
        cache = Path(folder_paths.get_user_directory()) / "supercond_cache" / "dataset"
        vae_fp = encoder_identity(vae.patcher)
        clip_fp = encoder_identity(clip.patcher, f"layer {clip.layer_idx}")
        settings = Settings(resolution, make_buckets(resolution) if buckets else None, flip, random_crop, seed)

        def text(caption: str) -> dict[str, torch.Tensor]:
            return _cached(cache / f"{content_key('text', caption, clip_fp, CACHE_VERSION)}.safetensors",
                           lambda: _encode_text(clip, caption))

        empty = text("")
        encoded, conds = [], []
        for i, item in enumerate(images):
            encoded.append(encode_image(item, i, settings, vae, vae_fp, cache))
            texts = captions(item.caption, trigger, shuffle_tags, keep_tokens, seed, i)
            variants = [{**text(c), "text": c} for c in texts]  # the text: for text-encoder training
            extra = {"supercond_empty": empty, "supercond_text": texts[0],
                     **{k: v for k, v in variants[0].items() if k not in ("cross_attn", "text")}}
            if len(variants) > 1:
                extra["supercond_variants"] = variants
            conds.append([variants[0]["cross_attn"], extra])
        count, size, removed = tidy_cache(cache)
        log.info("supercond: %d images (%d with repeats); dataset cache %d entries, %.1f MiB%s", len(images),
                 sum(it.repeats for it in images), count, size / 2**20,
                 f", {removed} unused for {CACHE_MAX_AGE_DAYS} days removed" if removed else "")
        latent, conds = latent_output(images, encoded, conds)
        summary = describe(images, latent, count, size)
        return io.NodeOutput(latent, conds, ui=ui.PreviewText(summary))


def latent_output(images: list[Item], encoded: list[dict], conds: list) -> tuple[dict, list]:
    """Repeats expanded; ``samples`` plus the extras the trainer reads (see nodes/train/lora.py Data)."""
    order = [i for i, item in enumerate(images) for _ in range(item.repeats)]
    items = [encoded[i]["latent"] for i in order]
    sizes = Counter(tuple(t.shape) for t in items)
    common = sizes.most_common(1)[0][0]
    out: dict = {"samples": torch.cat([t for t in items if tuple(t.shape) == common])}
    if len(sizes) > 1:
        out["supercond_items"] = items
    if len(order) > len(images):
        out["supercond_image_ids"] = order
    if any("flipped" in e for e in encoded):
        out["supercond_flipped"] = [encoded[i]["flipped"] for i in order]
    if any("mask" in e for e in encoded):
        out["supercond_masks"] = [encoded[i].get("mask") for i in order]
    return out, [conds[i] for i in order]


def describe(images: list[Item], latent: dict, count: int, size: int) -> str:
    """The node's summary text: images, repeats, sizes, masks, cache."""
    items = latent.get("supercond_items", list(latent["samples"].split(1)))
    sizes = Counter(f"{t.shape[-1] * 8}x{t.shape[-2] * 8}" for t in items)
    masks = sum(1 for m in latent.get("supercond_masks") or [] if m is not None)
    lines = [f"{len(images)} images, {len(items)} with repeats",
             "sizes: " + ", ".join(f"{k} ({v})" for k, v in sorted(sizes.items())),
             f"masks: {masks}" + (", flips cached" if "supercond_flipped" in latent else ""),
             f"cache: {count} entries, {size / 2**20:.1f} MiB (unused {CACHE_MAX_AGE_DAYS} days: removed)"]
    return "\n".join(lines)


NODES: list[type[io.ComfyNode]] = [SupercondLoadDataset]
