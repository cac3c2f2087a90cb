"""Tier A: the dataset data layer (no ComfyUI): listing with kohya repeat folders, captions, masks, caption
shuffling, aspect-ratio buckets and cropping, strict image loading and the example sets."""

from __future__ import annotations

import importlib.util
import io
import logging
import math
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from supercond.core import dataset as ds
from supercond.core.dataset import DatasetError


def _load_files_module():
    """nodes/train/dataset_files.py without the nodes package's __init__ (which imports ComfyUI)."""
    path = Path(ds.__file__).resolve().parent.parent / "nodes" / "train" / "dataset_files.py"
    spec = importlib.util.spec_from_file_location("supercond.nodes.train.dataset_files", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


files = sys.modules.get("supercond.nodes.train.dataset_files") or _load_files_module()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def png(path: Path, w: int = 8, h: int = 8, mode: str = "RGB", colour=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (w, h), colour if colour is not None else 0).save(path)
    return path


def pair(folder: Path, stem: str, caption: str = "a, b", **kw) -> Path:
    img = png(folder / f"{stem}.png", **kw)
    (folder / f"{stem}.txt").write_text(caption, encoding="utf-8")
    return img


# -- listing ------------------------------------------------------------------------------------------------
def test_nested_folders_are_walked_in_order_with_kohya_repeats(tmp_path):
    pair(tmp_path, "b")
    pair(tmp_path, "a")
    pair(tmp_path / "3_cats", "c")
    pair(tmp_path / "3_cats" / "inner", "d")  # inherits 3
    pair(tmp_path / "3_cats" / "2_kittens", "e")  # its own 2
    pair(tmp_path / "plain", "f")
    pair(tmp_path / ".hidden", "g")
    items = ds.list_items(tmp_path)
    rel = [it.image.relative_to(tmp_path).as_posix() for it in items]
    assert rel == ["a.png", "b.png", "3_cats/c.png", "3_cats/2_kittens/e.png", "3_cats/inner/d.png",
                   "plain/f.png"]
    assert [it.repeats for it in items] == [1, 1, 3, 2, 3, 1]
    assert len(ds.expand_repeats(items)) == 1 + 1 + 3 + 2 + 3 + 1
    assert ds.list_pairs(tmp_path) == [(it.image, it.caption) for it in items]


def test_zero_repeats_folder_is_refused(tmp_path):
    pair(tmp_path / "0_none", "a")
    with pytest.raises(DatasetError, match="0_none asks for 0 repeats"):
        ds.list_items(tmp_path)


def test_caption_file_kinds_and_precedence(tmp_path, caplog):
    png(tmp_path / "a.png")
    (tmp_path / "a.caption").write_text("from caption", encoding="utf-8")
    png(tmp_path / "b.png")
    (tmp_path / "b.caption").write_text("ignored", encoding="utf-8")
    (tmp_path / "b.txt").write_text("  from txt\n", encoding="utf-8")
    png(tmp_path / "c.png")
    (tmp_path / "c.txt").write_bytes("\ufeffbom dropped".encode())
    png(tmp_path / "d.png")
    (tmp_path / "d.txt").write_text(" \n ", encoding="utf-8")
    with caplog.at_level(logging.INFO, logger="supercond"):
        items = ds.list_items(tmp_path)
    assert [it.caption for it in items] == ["from caption", "from txt", "bom dropped", ""]
    assert "1 image(s)" in caplog.text and "d.png" in caplog.text and "empty caption" in caplog.text


def test_one_missing_caption_names_the_file(tmp_path):
    pair(tmp_path, "ok")
    png(tmp_path / "a.png")
    with pytest.raises(DatasetError, match=r"a.png has no caption file \(a.txt or a.caption\)"):
        ds.list_items(tmp_path)


def test_many_missing_captions_are_listed_with_their_count(tmp_path):
    for i in range(7):
        png(tmp_path / "sub" / f"img{i}.png")
    with pytest.raises(DatasetError) as e:
        ds.list_items(tmp_path)
    msg = str(e.value)
    assert "a folder with images and no captions" in msg and "7 images" in msg and "and 2 more" in msg
    assert all(f"sub/img{i}.png" in msg for i in range(5)) and "img5" not in msg


def test_missing_folder_and_no_images(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        ds.list_items(tmp_path / "nope")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("x")
    png(tmp_path / "x_mask.png")  # a mask is never a training image
    with pytest.raises(DatasetError, match="has no images"):
        ds.list_items(tmp_path)


def test_non_utf8_caption_names_the_file(tmp_path):
    png(tmp_path / "sub" / "a.png")
    (tmp_path / "sub" / "a.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"caption sub/a.txt .* is not UTF-8 text .*save it as UTF-8"):
        ds.list_items(tmp_path)


def test_masks_from_files_and_alpha(tmp_path, caplog):
    pair(tmp_path, "file")
    png(tmp_path / "file_mask.png", mode="L")
    pair(tmp_path, "rgba", mode="RGBA")
    pair(tmp_path, "la", mode="LA")
    p = Image.new("P", (8, 8))
    p.info["transparency"] = 0
    p.save(tmp_path / "pal.png", transparency=0)
    (tmp_path / "pal.txt").write_text("x")
    pair(tmp_path, "both", mode="RGBA")
    png(tmp_path / "both_mask.png", mode="L")  # the file wins over the alpha channel
    pair(tmp_path, "plain")
    png(tmp_path / "orphan_mask.png", mode="L")
    with caplog.at_level(logging.WARNING, logger="supercond"):
        masks = {it.image.stem: it.mask for it in ds.list_items(tmp_path)}
    assert masks == {"both": tmp_path / "both_mask.png", "file": tmp_path / "file_mask.png", "la": "alpha",
                     "pal": "alpha", "plain": None, "rgba": "alpha"}
    assert "orphan_mask.png has no image" in caplog.text


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symbolic links here")
def test_symlinks_out_of_the_dataset_are_refused(tmp_path):
    root, outside = tmp_path / "data", tmp_path / "outside"
    pair(root, "a")
    pair(outside, "secret")
    (root / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(DatasetError, match=r"link in dataset .* is a symbolic link to .*outside the dataset"):
        ds.list_items(root)
    (root / "link").unlink()
    (root / "b.png").symlink_to(outside / "secret.png")
    (root / "b.txt").write_text("x")
    with pytest.raises(DatasetError, match="b.png in .* is a symbolic link"):
        ds.list_items(root)
    (root / "b.png").unlink()
    (root / "b.png").symlink_to(root / "a.png")  # inside: fine
    (root / "loop").symlink_to(root, target_is_directory=True)  # a loop is walked once
    assert [it.image.name for it in ds.list_items(root)] == ["a.png", "b.png"]


def test_item_size_follows_exif_rotation(tmp_path):
    im = Image.new("RGB", (30, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    im.save(tmp_path / "r.jpg", exif=exif.tobytes())
    (tmp_path / "r.txt").write_text("x")
    (item,) = ds.list_items(tmp_path)
    assert item.size == (20, 30)
    assert files.load_image(item.image).shape == (1, 3, 30, 20)


# -- captions -----------------------------------------------------------------------------------------------
TAGS = "t0, t1, t2, t3, t4, t5, t6, t7"


def test_caption_without_changes_comes_back_as_is():
    assert ds.process_caption("a red disc,on grey ", "", False, 0, None) == "a red disc,on grey"
    assert ds.process_caption("sks, a", "SKS", False, 0, None) == "sks, a"


def test_trigger_is_prepended_once_and_kept():
    assert ds.process_caption("a, b", "sks", False, 0, None) == "sks, a, b"
    assert ds.process_caption("", "sks", False, 0, None) == "sks"
    for seed in range(10):
        out = ds.split_tags(ds.process_caption(TAGS, "sks", True, 0, gen(seed)))
        assert out[0] == "sks" and sorted(out[1:]) == sorted(ds.split_tags(TAGS))
    out = ds.split_tags(ds.process_caption("sks, " + TAGS, "sks", True, 1, gen(0)))
    assert out[0] == "sks" and out.count("sks") == 1


def test_keep_tokens_stay_in_place_and_the_rest_shuffle_by_seed():
    tags = ds.split_tags(TAGS)
    outs = [ds.split_tags(ds.process_caption(TAGS, "", True, 3, gen(s))) for s in range(8)]
    assert all(o[:3] == tags[:3] and sorted(o[3:]) == sorted(tags[3:]) for o in outs)
    assert any(o[3:] != tags[3:] for o in outs), "shuffle never moved a tag"
    assert len({tuple(o) for o in outs}) > 1, "different seeds gave the same order"
    assert ds.process_caption(TAGS, "", True, 3, gen(5)) == ds.process_caption(TAGS, "", True, 3, gen(5))
    # the trigger counts towards keep_tokens: 2 keeps the trigger and the caption's first tag
    out = ds.split_tags(ds.process_caption(TAGS, "sks", True, 2, gen(1)))
    assert out[:2] == ["sks", "t0"] and sorted(out[2:]) == sorted(tags[1:])
    assert ds.process_caption(TAGS, "", False, 3, gen(0)) == TAGS


# -- buckets ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("resolution", [512, 768, 1024])
def test_buckets_fit_the_area_and_the_grid(resolution):
    buckets = ds.make_buckets(resolution)
    lo, hi = ds.bucket_limits(resolution)
    assert (lo, hi) == (resolution // 2, resolution * 2)
    assert (resolution, resolution) in buckets and len(buckets) > 5
    assert buckets == sorted(set(buckets))
    for w, h in buckets:
        assert w * h <= resolution**2 and w % 64 == 0 and h % 64 == 0
        assert lo <= w <= hi and lo <= h <= hi and (h, w) in buckets


def test_buckets_at_tiny_resolutions_and_bad_settings():
    assert ds.make_buckets(64) == [(64, 64)]
    small = ds.make_buckets(64, step=16)
    assert (64, 64) in small and (80, 48) in small and all(w * h <= 64 * 64 for w, h in small)
    assert ds.make_buckets(512, min_size=500, max_size=600) == [(512, 512)]
    with pytest.raises(DatasetError, match="smaller than the bucket step"):
        ds.make_buckets(32)


def test_nearest_bucket_by_aspect_ratio():
    buckets = ds.make_buckets(512)
    assert ds.nearest_bucket(768, 512, buckets) == (640, 384)
    assert ds.nearest_bucket(512, 768, buckets) == (384, 640)  # symmetric
    assert ds.nearest_bucket(300, 300, buckets) == (512, 512)
    best = min(abs(math.log(w / h) - math.log(1.5)) for w, h in buckets)
    assert abs(math.log(640 / 384) - math.log(1.5)) == best


def test_too_small_image_names_file_size_and_smallest_bucket():
    buckets = ds.make_buckets(512)
    assert ds.bucket_for(Path("/d/ok.png"), 256, 900, buckets) == (256, 896)
    with pytest.raises(DatasetError, match=r"tiny.png in /d is 200x300, smaller than the smallest bucket "
                                           r"256x832 on its shorter side: lower the resolution or use a "
                                           r"bigger image"):
        ds.bucket_for(Path("/d/tiny.png"), 200, 300, buckets)


def test_fit_to_bucket_covers_and_crops():
    pixels = torch.rand(1, 3, 60, 90, generator=gen(0))
    out = ds.fit_to_bucket(pixels, (64, 48), False, None)
    assert out.shape == (1, 3, 48, 64) and 0 <= out.min() and out.max() <= 1
    plan = ds.crop_plan(60, 90, (64, 48), False, None)
    assert plan.resized == (48, 72) and (plan.top, plan.left) == (0, 4)  # centre of 72
    same = ds.fit_to_bucket(pixels[..., :48, :64], (64, 48), False, None)
    assert torch.equal(same, pixels[..., :48, :64])  # already the bucket's size: untouched


def test_random_crop_is_seeded():
    plans = [ds.crop_plan(100, 300, (64, 64), True, gen(s)) for s in range(6)]
    assert all(p.resized == (64, 192) and p.top == 0 and 0 <= p.left <= 128 for p in plans)
    assert len({p.left for p in plans}) > 1
    assert ds.crop_plan(100, 300, (64, 64), True, gen(3)) == plans[3]


@pytest.mark.parametrize("random_crop", [False, True])
def test_mask_stays_aligned_with_the_image(random_crop):
    pixels = torch.rand(1, 3, 70, 100, generator=gen(1))
    mask = pixels[:, 1:2].clone()
    for seed in range(4):
        out, fitted, plan = ds.fit_pair(pixels, mask, (48, 80), random_crop, gen(seed))
        assert out.shape == (1, 3, 80, 48) and fitted.shape == (1, 1, 80, 48)
        assert torch.equal(fitted, out[:, 1:2])
        assert torch.equal(ds.fit_mask(mask, plan), fitted)
    assert ds.fit_pair(pixels, None, (48, 80), False, None)[1] is None


# -- image files --------------------------------------------------------------------------------------------
def test_alpha_and_mask_file_load(tmp_path):
    rgba = np.zeros((6, 10, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :5, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    pixels, mask = files.load_image_and_mask(tmp_path / "a.png", "alpha")
    assert pixels.shape == (1, 3, 6, 10) and mask.shape == (1, 1, 6, 10)
    assert torch.equal(mask[0, 0, :, :5], torch.ones(6, 5)) and not mask[0, 0, :, 5:].any()
    assert files.load_image_and_mask(tmp_path / "a.png", None)[1] is None
    png(tmp_path / "opaque.png", mode="RGBA", colour=(1, 2, 3, 255))
    assert files.load_image_and_mask(tmp_path / "opaque.png", "alpha")[1] is None  # all opaque: no mask
    grey = np.zeros((6, 10, 3), np.uint8)
    grey[:3] = 255
    Image.fromarray(grey).save(tmp_path / "a_mask.png")  # RGB: read as L, white = trained
    _, mask = files.load_image_and_mask(tmp_path / "a.png", tmp_path / "a_mask.png")
    assert mask.shape == (1, 1, 6, 10) and torch.equal(mask[0, 0, :3], torch.ones(3, 10))
    assert not mask[0, 0, 3:].any()


def test_mask_of_another_size_names_both_files(tmp_path):
    png(tmp_path / "a.png", 10, 6)
    png(tmp_path / "a_mask.png", 5, 3, mode="L")
    with pytest.raises(DatasetError, match=r"mask a_mask.png is 5x3 but its image a.png is 10x6"):
        files.load_image_and_mask(tmp_path / "a.png", tmp_path / "a_mask.png")


def _truncated(tmp_path: Path, fmt: str) -> Path:
    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, format=fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image_is_an_error_even_if_pil_allows_them(tmp_path, monkeypatch, fmt):
    path = _truncated(tmp_path, fmt)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as some other pack might
    with pytest.raises(DatasetError, match=rf"cannot read image {path.name} in .*re-save it"):
        files.load_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True, "PIL's setting was not restored"


def test_corrupt_image_in_listing_names_the_file(tmp_path):
    (tmp_path / "a.png").write_bytes(b"not a png")
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(DatasetError, match="cannot read image a.png"):
        ds.list_items(tmp_path)


def test_decompression_bomb_is_an_error_and_pil_settings_stay(tmp_path, monkeypatch):
    png(tmp_path / "big.png", 40, 40)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1600 pixels: PIL would only warn
    filters = list(warnings.filters)
    with warnings.catch_warnings(record=True) as seen, pytest.raises(DatasetError, match="big.png in .* too large"):
        warnings.simplefilter("always")
        files.load_image(tmp_path / "big.png")
    assert not seen, "PIL's warning escaped instead of being an error"
    assert warnings.filters == filters and Image.MAX_IMAGE_PIXELS == 1000
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # over twice the limit: PIL's own error
    with pytest.raises(DatasetError, match="too large"):
        files.load_image(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # switched off elsewhere: our default still holds
    monkeypatch.setattr(ds, "DEFAULT_MAX_PIXELS", 1000)
    with pytest.raises(DatasetError, match="too large"):
        files.load_image(tmp_path / "big.png")


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    arr = np.full((4, 4), 32768, np.uint16)
    Image.fromarray(arr).save(tmp_path / "g16.png")
    pixels = files.load_image(tmp_path / "g16.png")
    assert pixels.shape == (1, 3, 4, 4) and torch.allclose(pixels, torch.full_like(pixels, 0.5), atol=1e-3)


# -- example sets -------------------------------------------------------------------------------------------
def test_example_buckets_set(tmp_path):
    files.write_example_buckets(tmp_path / "ex", size=32)
    items = ds.list_items(tmp_path / "ex")
    assert len(items) == 8 and not list((tmp_path / "ex").rglob(".tmp_*"))
    assert {it.size for it in items} == {(48, 32), (32, 48), (32, 32)}
    assert [it.repeats for it in items] == [1] * 6 + [2, 2] and len(ds.expand_repeats(items)) == 10
    assert all(len(ds.split_tags(it.caption)) == 4 for it in items)
    kinds = [it.mask if it.mask in (None, "alpha") else "file" for it in items]
    assert kinds.count("file") == 3 and kinds.count("alpha") == 1
    buckets = ds.make_buckets(32, step=8)
    for it in items:
        pixels, mask = files.load_image_and_mask(it.image, it.mask)
        assert pixels.shape[-2:] == (it.size[1], it.size[0])
        if it.mask is not None:
            assert mask.shape[-2:] == pixels.shape[-2:] and 0 < float(mask.mean()) < 1
        out, _, _ = ds.fit_pair(pixels, mask, ds.bucket_for(it.image, *it.size, buckets), True, gen(0))
        assert out.shape[-1] * out.shape[-2] <= 32 * 32
    assert {ds.nearest_bucket(*it.size, buckets) for it in items} == {(40, 24), (24, 40), (32, 32)}


def test_plain_example_set_is_unchanged(tmp_path):
    files.write_example(tmp_path)
    pairs = ds.list_pairs(tmp_path)
    assert len(pairs) == 8 and pairs[0][1] == "a red disc on a pale background, supercond style"
    assert files.load_image(pairs[0][0]).shape == (1, 3, 256, 256)
