"""Image files for the dataset node (PIL only, no ComfyUI imports: tools use it too)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ...core.dataset import DatasetError, example_images
from ...core.files import write_atomic


def load_image(path: Path) -> torch.Tensor:
    """[1, 3, H, W] float in [0, 1]; unreadable files raise DatasetError naming the file."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DatasetError(f"cannot read image {path.name} in {path.parent}: {e}") from e
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)


def write_example(folder: Path) -> Path:
    """Write the built-in example set (PNG + .txt), each file atomically."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, (img, caption) in enumerate(example_images()):
        stem = folder / f"example_{i:02d}"
        arr = (img.numpy() * 255).round().astype(np.uint8)
        # Caption first: an image never sits there without its caption.
        write_atomic(stem.with_suffix(".txt"), ".txt", lambda tmp, c=caption: Path(tmp).write_text(c + "\n", encoding="utf-8"))
        write_atomic(stem.with_suffix(".png"), ".png", lambda tmp, a=arr: Image.fromarray(a).save(tmp, format="PNG"))
    return folder
