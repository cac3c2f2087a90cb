"""Image-caption datasets: listing and checking a folder (kohya-style repeat folders, captions, masks),
caption shuffling, aspect-ratio buckets, content keys for the cache, and the built-in example set
(synthetic shapes drawn with torch, so nothing is downloaded). No ComfyUI imports: tools and tier-A
tests use it."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import re
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_EXTS = (".txt", ".caption")  # in order of precedence: a .txt beside a .caption wins
MASK_SUFFIX = "_mask.png"
ALPHA = "alpha"
EXAMPLE_NAME = "supercond_example"
EXAMPLE_BUCKETS_NAME = "supercond_example_buckets"
# PIL's own default limit, used when some other code has switched PIL's check off (MAX_IMAGE_PIXELS = None).
DEFAULT_MAX_PIXELS = int(1024 * 1024 * 1024 // 4 // 3)
_REPEATS = re.compile(r"^(\d+)_(.+)$")
_LISTED = 5  # files named in one message
_PIL_LOCK = threading.RLock()

log = logging.getLogger("supercond")


class DatasetError(ValueError):
    """A dataset problem; the message names the file and says what to do."""


# -- listing a folder -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Item:
    """One training image. ``repeats``: how many times it counts per epoch (kohya's ``<N>_<name>``
    folders); ``mask``: a ``<stem>_mask.png`` path, ``"alpha"`` (the image's own alpha channel) or None;
    ``size``: (width, height) as displayed (EXIF rotation applied), read from the header only."""

    image: Path
    caption: str
    repeats: int = 1
    mask: Path | str | None = None
    size: tuple[int, int] = (0, 0)


def list_items(folder: Path) -> list[Item]:
    """Every training image under ``folder`` and its sub-folders, depth first: a folder's images by name,
    then its sub-folders by name. Hidden entries (``.name``) are skipped, ``*_mask.png`` files are masks,
    never images. A caption is the same-name ``.txt`` or ``.caption`` (``.txt`` wins when both exist),
    read as UTF-8 (a BOM is dropped) and stripped; an empty caption is allowed (logged at info: such an
    image trains on the trigger word or the empty prompt). Symbolic links must stay inside ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"dataset folder {folder} does not exist: create it and put images with "
                           f"same-name .txt captions in it")
    root = folder.resolve()
    found: list[tuple[Path, int]] = []
    _walk(root, root, 1, found, set())
    if not found:
        raise DatasetError(f"dataset folder {folder} has no images ({', '.join(IMAGE_EXTS)}) in it or its "
                           f"sub-folders: add some, each with a same-name .txt caption")
    captions = _read_captions(root, [img for img, _ in found])
    items = [Item(img, cap, reps, *_probe_mask(root, img))
             for (img, reps), cap in zip(found, captions, strict=True)]
    _log_empty(root, items)
    return items


def list_pairs(folder: Path) -> list[tuple[Path, str]]:
    """(image, caption) pairs, once per image (repeats not expanded): list_items for older callers."""
    return [(item.image, item.caption) for item in list_items(folder)]


def expand_repeats(items: list[Item]) -> list[Item]:
    """Each item ``repeats`` times in a row, the way an epoch sees them."""
    return [item for item in items for _ in range(item.repeats)]


def repeats_of(name: str, inherited: int) -> int:
    """A sub-folder's repeats: N for ``<N>_<name>`` (kohya), else the parent's."""
    m = _REPEATS.match(name)
    if m is None:
        return inherited
    n = int(m.group(1))
    if n < 1:
        raise DatasetError(f"sub-folder {name} asks for {n} repeats: name it with 1 or more "
                           f"(like 1_{m.group(2)}), or move it out of the dataset")
    if n > 100:
        log.warning("supercond: sub-folder %s repeats its images %d times (kohya's <N>_<name>); rename it "
                    "if the number is not meant as repeats", name, n)
    return n


def _walk(root: Path, folder: Path, repeats: int, out: list[tuple[Path, int]], seen: set[Path]) -> None:
    real = _inside(root, folder)
    if real in seen:  # a link back to a folder already walked: no loop, no double count
        return
    seen.add(real)
    entries = sorted((p for p in folder.iterdir() if not p.name.startswith(".")), key=lambda p: p.name)
    for path in entries:
        if _is_image(path) and path.is_file():
            _inside(root, path)
            out.append((path, repeats))
    for path in entries:
        if path.is_dir():
            _walk(root, path, repeats_of(path.name, repeats), out, seen)
    _warn_orphan_masks(root, entries)


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTS and not path.name.lower().endswith(MASK_SUFFIX)


def _inside(root: Path, path: Path) -> Path:
    """The real path, refusing a symbolic link that leads out of the dataset (it could read any file)."""
    real = path.resolve()
    if real != root and root not in real.parents:
        raise DatasetError(f"{_rel(root, path)} in dataset {root} is a symbolic link to {real}, outside the "
                           f"dataset folder: copy the file into the folder instead of linking it")
    return real


def _rel(root: Path, path: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _warn_orphan_masks(root: Path, entries: list[Path]) -> None:
    stems = {p.stem for p in entries if _is_image(p)}
    for p in entries:
        if p.name.lower().endswith(MASK_SUFFIX) and p.name[: -len(MASK_SUFFIX)] not in stems:
            log.warning("supercond: mask %s has no image %s.* beside it; it is ignored",
                        _rel(root, p), p.name[: -len(MASK_SUFFIX)])


def caption_file(image: Path) -> Path | None:
    """The image's caption file: ``<stem>.txt``, else ``<stem>.caption``, else None."""
    for ext in CAPTION_EXTS:
        cap = image.with_suffix(ext)
        if cap.is_file():
            return cap
    return None


def _read_captions(root: Path, images: list[Path]) -> list[str]:
    files = [caption_file(img) for img in images]
    missing = [img for img, cap in zip(images, files, strict=True) if cap is None]
    if missing:
        raise DatasetError(_missing_message(root, missing))
    return [read_caption(root, cap) for cap in files]


def _missing_message(root: Path, missing: list[Path]) -> str:
    if len(missing) == 1:
        img = missing[0]
        return (f"{_rel(root, img)} has no caption file ({img.stem}.txt or {img.stem}.caption) in "
                f"{img.parent}: write one (UTF-8 text), or move the image out of the dataset")
    names = ", ".join(_rel(root, p) for p in missing[:_LISTED])
    more = f" and {len(missing) - _LISTED} more" if len(missing) > _LISTED else ""
    return (f"a folder with images and no captions: {len(missing)} images in {root} have no caption file "
            f"(same-name .txt or .caption): {names}{more}; write one for each (UTF-8 text), or move them out")


def read_caption(root: Path, path: Path) -> str:
    """A caption file's text, stripped; not UTF-8 (or unreadable) -> DatasetError naming the file."""
    _inside(root, path)
    try:
        return path.read_bytes().decode("utf-8-sig").strip()
    except UnicodeDecodeError as e:
        raise DatasetError(f"caption {_rel(root, path)} in {root} is not UTF-8 text (byte {e.start} is "
                           f"{e.object[e.start:e.start + 1]!r}): save it as UTF-8") from e
    except OSError as e:
        raise DatasetError(f"cannot read caption {_rel(root, path)} in {root}: {e}") from e


def _probe_mask(root: Path, image: Path) -> tuple[Path | str | None, tuple[int, int]]:
    """(mask, displayed size): a ``_mask.png`` beside the image wins over its alpha channel."""
    mask_file = image.with_name(image.stem + MASK_SUFFIX)
    has_alpha, size = probe_image(root, image)
    if mask_file.is_file():
        _inside(root, mask_file)
        return mask_file, size
    return (ALPHA if has_alpha else None), size


def probe_image(root: Path, image: Path) -> tuple[bool, tuple[int, int]]:
    """(has alpha, (width, height) as displayed) from the header alone: nothing is decoded."""
    with open_checked(image, root) as im:
        has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
        w, h = im.size
        if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF orientations that turn the image a quarter
            w, h = h, w
    return has_alpha, (w, h)


@contextlib.contextmanager
def strict_pil() -> Iterator[None]:
    """For our loads only: a truncated file is an error (even if other code set PIL's
    LOAD_TRUNCATED_IMAGES) and PIL's decompression-bomb warning is an error too. PIL's settings are
    restored on exit; the lock keeps two of our loads from interleaving the switch."""
    from PIL import Image, ImageFile

    with _PIL_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        before = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = before


@contextlib.contextmanager
def open_checked(path: Path, root: Path | None = None) -> Iterator[object]:
    """PIL's Image.open under strict_pil, every failure a DatasetError naming the file; the pixel limit is
    PIL's MAX_IMAGE_PIXELS, or PIL's default when other code switched it off."""
    from PIL import Image

    where = f"{_rel(root, path)} in {root}" if root is not None else f"{path.name} in {path.parent}"
    limit = Image.MAX_IMAGE_PIXELS or DEFAULT_MAX_PIXELS
    with strict_pil():
        try:
            with Image.open(path) as im:
                if im.width * im.height > limit:
                    raise Image.DecompressionBombWarning(f"{im.width}x{im.height} pixels")
                yield im
        except DatasetError:
            raise
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
            raise DatasetError(f"image {where} is too large for a safe load ({e}; the limit is PIL's "
                               f"decompression-bomb guard of {limit} pixels): downscale it") from e
        except (OSError, ValueError, SyntaxError, EOFError) as e:
            raise DatasetError(f"cannot read image {where}: {e}; re-save it or remove it from the "
                               f"dataset") from e


def _log_empty(root: Path, items: list[Item]) -> None:
    empty = [_rel(root, it.image) for it in items if not it.caption]
    if empty:
        more = f" and {len(empty) - _LISTED} more" if len(empty) > _LISTED else ""
        log.info("supercond: %d image(s) in %s have an empty caption (trained on the trigger word or the "
                 "empty prompt): %s%s", len(empty), root, ", ".join(empty[:_LISTED]), more)


# -- captions -----------------------------------------------------------------------------------------------
def split_tags(text: str) -> list[str]:
    """Comma-separated tags, stripped, empty ones dropped."""
    return [t.strip() for t in text.split(",") if t.strip()]


def process_caption(text: str, trigger: str, shuffle: bool, keep_tokens: int,
                    generator: torch.Generator | None) -> str:
    """kohya's caption handling: tags are comma-separated; the first ``keep_tokens`` tags stay in place
    and, with ``shuffle``, the rest are permuted (drawn from ``generator`` only). ``trigger`` (one or
    more comma-separated tags) is put first unless the caption already starts with it (case-insensitive)
    and is always kept: it counts towards ``keep_tokens``, so keep_tokens 1 with a trigger keeps just the
    trigger, 0 keeps it too. With nothing to prepend and shuffle off, the text comes back unchanged."""
    tags, lead = split_tags(text), split_tags(trigger)
    starts = [t.casefold() for t in tags[: len(lead)]] == [t.casefold() for t in lead]
    if not starts:
        tags = lead + tags
    if starts and not shuffle:
        return text.strip()
    keep = max(int(keep_tokens), len(lead))
    head, rest = tags[:keep], tags[keep:]
    if shuffle and len(rest) > 1:
        rest = [rest[i] for i in torch.randperm(len(rest), generator=generator).tolist()]
    return ", ".join(head + rest)


# -- aspect-ratio buckets -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class CropPlan:
    """Where an image goes in its bucket: resized to ``resized`` (height, width), then cropped at
    (``top``, ``left``) to ``bucket`` (width, height). One plan serves the image and its mask."""

    resized: tuple[int, int]
    top: int
    left: int
    bucket: tuple[int, int]


def bucket_limits(resolution: int, step: int = 64) -> tuple[int, int]:
    """Default (min_size, max_size): kohya's 256 and 1024 at 512 scaled, i.e. resolution / 2 and
    resolution * 2, on the step grid, never under one step (64 px with step 64 -> 64 and 128)."""
    low = max(step, (resolution // 2) // step * step)
    return low, max(low, (resolution * 2) // step * step)


def make_buckets(resolution: int, step: int = 64, min_size: int | None = None,
                 max_size: int | None = None) -> list[tuple[int, int]]:
    """kohya's bucket list, sorted: (width, height) pairs, both multiples of ``step`` within
    [min_size, max_size] (bucket_limits when None), area at most resolution^2: for each width the tallest
    height that fits, and its transpose, plus the largest square. With step 64 a 64 px resolution has
    only the square; use step 8 or 16 for tiny test resolutions."""
    if step < 1 or resolution < step:
        raise DatasetError(f"bucket resolution {resolution} is smaller than the bucket step {step}: "
                           f"raise the resolution or lower the step")
    lo, hi = bucket_limits(resolution, step)
    lo = -(-(min_size if min_size is not None else lo) // step) * step  # round up onto the grid
    hi = (max_size if max_size is not None else hi) // step * step
    area = resolution * resolution
    side = math.isqrt(area) // step * step
    buckets = {(side, side)}
    for w in range(lo, hi + 1, step):
        h = min(hi, area // w // step * step)
        if h >= lo:
            buckets |= {(w, h), (h, w)}
    return sorted(buckets)


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's, measured as |log(w/h) - log(bw/bh)|:
    symmetric, so a 2:1 and a 1:2 image are equally far from square (kohya compares plain w/h ratios,
    which favours landscape buckets). Ties go to the larger bucket."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def bucket_for(path: Path, width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """nearest_bucket, refusing an image whose shorter side is below the smallest bucket side (it would be
    upscaled into a blur)."""
    smallest = min(buckets, key=lambda b: (min(b), b[0] * b[1]))
    if min(width, height) < min(smallest):
        raise DatasetError(f"image {path.name} in {path.parent} is {width}x{height}, smaller than the "
                           f"smallest bucket {smallest[0]}x{smallest[1]} on its shorter side: lower the "
                           f"resolution or use a bigger image")
    return nearest_bucket(width, height, buckets)


def crop_plan(height: int, width: int, bucket: tuple[int, int], random_crop: bool,
              generator: torch.Generator | None) -> CropPlan:
    """Resize so the image covers the bucket (scale = max(bw / W, bh / H)), then a centre crop or a
    seeded random one."""
    bw, bh = bucket
    scale = max(bw / width, bh / height)
    rh, rw = max(bh, round(height * scale)), max(bw, round(width * scale))
    if random_crop:
        top = int(torch.randint(0, rh - bh + 1, (1,), generator=generator))
        left = int(torch.randint(0, rw - bw + 1, (1,), generator=generator))
    else:
        top, left = (rh - bh) // 2, (rw - bw) // 2
    return CropPlan((rh, rw), top, left, (bw, bh))


def apply_plan(x: torch.Tensor, plan: CropPlan) -> torch.Tensor:
    """[1, C, H, W] -> [1, C, bh, bw] by the plan (bilinear with antialias, clamped to [0, 1])."""
    if tuple(x.shape[-2:]) != plan.resized:
        x = torch.nn.functional.interpolate(x.float(), size=plan.resized, mode="bilinear",
                                            align_corners=False, antialias=True)
    bw, bh = plan.bucket
    return x[..., plan.top:plan.top + bh, plan.left:plan.left + bw].clamp(0, 1).contiguous()


def fit_to_bucket(pixels: torch.Tensor, bucket: tuple[int, int], random_crop: bool,
                  generator: torch.Generator | None) -> torch.Tensor:
    """[1, 3, H, W] -> [1, 3, bh, bw]: cover the bucket, then crop (fit_pair keeps a mask aligned)."""
    return apply_plan(pixels, crop_plan(*pixels.shape[-2:], bucket, random_crop, generator))


def fit_mask(mask: torch.Tensor, plan: CropPlan) -> torch.Tensor:
    """[1, 1, H, W] -> [1, 1, bh, bw] with the image's own plan, so mask and image stay aligned."""
    return apply_plan(mask, plan)


def fit_pair(pixels: torch.Tensor, mask: torch.Tensor | None, bucket: tuple[int, int], random_crop: bool,
             generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor | None, CropPlan]:
    """Image and (optional) mask into the bucket with one crop plan: (pixels, mask, plan)."""
    plan = crop_plan(*pixels.shape[-2:], bucket, random_crop, generator)
    return apply_plan(pixels, plan), (None if mask is None else fit_mask(mask, plan)), plan


# -- cache keys and the example sets -------------------------------------------------------------------------
def content_key(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else p.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


_COLOURS = {"red": (0.9, 0.15, 0.1), "blue": (0.1, 0.3, 0.9), "green": (0.15, 0.75, 0.2),
            "yellow": (0.95, 0.85, 0.1)}


def example_shape(i: int, width: int, height: int) -> tuple[torch.Tensor, torch.Tensor, str, str]:
    """Example image ``i``: (image [H, W, 3] in [0, 1], shape mask [H, W] bool, colour, shape name);
    a disc or square in one of four colours on a gradient (an ellipse or oblong when not square)."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    name, rgb = list(_COLOURS.items())[i % len(_COLOURS)]
    shape = "disc" if i % 2 == 0 else "square"
    cx, cy = 0.35 + 0.3 * math.sin(i * 1.7) * 0.5, 0.5 + 0.25 * math.cos(i * 2.3) * 0.5
    r = 0.18 + 0.04 * (i % 3)
    mask = ((xx - cx) ** 2 + (yy - cy) ** 2 < r * r) if shape == "disc" else (
        ((xx - cx).abs() < r) & ((yy - cy).abs() < r))
    bg = torch.stack([0.85 - 0.3 * yy, 0.85 - 0.2 * yy, 0.9 - 0.1 * xx], dim=-1)
    img = torch.where(mask[..., None], torch.tensor(rgb), bg)
    return img.clamp(0, 1), mask, name, shape


def example_images(size: int = 256, count: int = 8) -> list[tuple[torch.Tensor, str]]:
    """(image [H, W, 3] in [0, 1], caption): discs and squares in a few colours on a gradient."""
    out = []
    for i in range(count):
        img, _, name, shape = example_shape(i, size, size)
        out.append((img, f"a {name} {shape} on a pale background, supercond style"))
    return out


def example_bucket_plan(size: int = 64) -> list[tuple[str, int, int, str]]:
    """The mixed-aspect example set: (relative stem, width, height, mask kind) for 8 images in three aspect
    ratios (3:2, 2:3, 1:1 at ``size`` px on the short side); masks: "file" (``_mask.png``), "alpha" or "".
    Two images sit in a ``2_repeat`` sub-folder (kohya repeats)."""
    wide, tall, square = (size * 3 // 2, size), (size, size * 3 // 2), (size, size)
    sizes = [wide, tall, square, wide, tall, square, wide, tall]
    masks = ["file", "", "file", "alpha", "", "", "file", ""]
    stems = [f"example_{i:02d}" if i < 6 else f"2_repeat/example_{i:02d}" for i in range(8)]
    return [(stem, w, h, m) for stem, (w, h), m in zip(stems, sizes, masks, strict=True)]


def example_caption(name: str, shape: str) -> str:
    return f"{name}, {shape}, pale background, supercond style"
