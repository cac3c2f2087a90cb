"""Image files for the dataset node (PIL only, no ComfyUI imports: tools use it too)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ...core.dataset import (
    ALPHA,
    DatasetError,
    example_bucket_plan,
    example_caption,
    example_images,
    example_shape,
    open_checked,
)
from ...core.files import write_atomic

log = logging.getLogger("supercond")


def load_image(path: Path) -> torch.Tensor:
    """[1, 3, H, W] float in [0, 1]; unreadable, truncated or oversized files raise DatasetError naming
    the file."""
    return load_image_and_mask(path, None)[0]


def load_image_and_mask(path: Path, mask_spec: Path | str | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(pixels [1, 3, H, W], mask [1, 1, H, W] or None), floats in [0, 1], EXIF rotation applied to both.
    ``mask_spec`` (Item.mask): ``"alpha"`` takes the image's alpha channel (an all-opaque one is no mask:
    None), a path reads that grey-scale file (white = trained) which must match the image's size, None
    gives no mask. Decoding is strict (see core.dataset.strict_pil): truncated files and decompression
    bombs raise DatasetError naming the file."""
    from PIL import ImageOps

    path = Path(path)
    with open_checked(path) as im:
        im = ImageOps.exif_transpose(im)
        pixels = _to_tensor(im, "RGB")
        mask = _to_tensor(im, "RGBA")[:, 3:] if mask_spec == ALPHA else None
    if mask is not None and bool((mask >= 1).all()):
        mask = None
    elif mask_spec not in (None, ALPHA):
        mask = _load_mask(Path(mask_spec), path, pixels.shape[-2:])
    return pixels, mask


def _load_mask(mask_path: Path, image: Path, size: torch.Size) -> torch.Tensor:
    from PIL import ImageOps

    with open_checked(mask_path) as im:
        mask = _to_tensor(ImageOps.exif_transpose(im), "L")
    if mask.shape[-2:] != size:
        raise DatasetError(f"mask {mask_path.name} is {mask.shape[-1]}x{mask.shape[-2]} but its image "
                           f"{image.name} is {size[-1]}x{size[-2]} (in {image.parent}): save the mask at the "
                           f"image's size")
    if not bool(mask.any()):
        log.warning("supercond: mask %s is all black: nothing of %s is trained", mask_path.name, image.name)
    return mask


def _to_tensor(im, mode: str) -> torch.Tensor:
    """[1, C, H, W] float in [0, 1]; 16-bit and float grey-scale images are scaled, not clipped to white."""
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        arr = np.asarray(im, dtype=np.float32)
        arr = arr / (65535.0 if im.mode != "F" else max(1.0, float(arr.max())))
        arr = np.clip(arr, 0.0, 1.0)[..., None]
        channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
        alpha = [np.ones_like(arr)] if channels == 4 else []
        arr = np.concatenate([arr] * min(channels, 3) + alpha, axis=-1)
    else:
        arr = np.asarray(im.convert(mode), dtype=np.float32) / 255.0
        arr = arr[..., None] if arr.ndim == 2 else arr
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).unsqueeze(0)


def write_example(folder: Path) -> Path:
    """Write the built-in example set (PNG + .txt), each file atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (img, caption) in enumerate(example_images()):
        _write_pair(folder / f"example_{i:02d}", img, caption)
    return folder


def write_example_buckets(folder: Path, size: int = 64) -> Path:
    """Write the mixed-aspect example set (core.dataset.example_bucket_plan): 8 PNGs in 3:2, 2:3 and 1:1 at
    ``size`` px on the short side, tag captions, three ``_mask.png`` masks (white on the shape), one image
    with the shape in its alpha channel, two images in a ``2_repeat`` sub-folder; each file atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (stem, w, h, mask_kind) in enumerate(example_bucket_plan(size)):
        img, shape_mask, name, shape = example_shape(i, w, h)
        alpha = shape_mask if mask_kind == ALPHA else None
        if mask_kind == "file":
            _write_png(folder / f"{stem}_mask.png", shape_mask.float()[..., None])
        _write_pair(folder / stem, img, example_caption(name, shape), alpha)
    return folder


def _write_pair(stem: Path, img: torch.Tensor, caption: str, alpha: torch.Tensor | None = None) -> None:
    # Caption first: an image never sits there without its caption.
    write_atomic(stem.with_suffix(".txt"), ".txt",
                 lambda tmp: Path(tmp).write_text(caption + "\n", encoding="utf-8"))
    if alpha is not None:
        img = torch.cat([img, alpha.float()[..., None]], dim=-1)
    _write_png(stem.with_suffix(".png"), img)


def _write_png(path: Path, img: torch.Tensor) -> None:
    """[H, W, C] in [0, 1] (C 1, 3 or 4) as an 8-bit PNG, atomically."""
    from PIL import Image

    arr = (img.numpy() * 255).round().astype(np.uint8)
    arr = arr[..., 0] if arr.shape[-1] == 1 else arr
    write_atomic(path, ".png", lambda tmp: Image.fromarray(arr).save(tmp, format="PNG"))
