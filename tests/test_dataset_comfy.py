"""SupercondLoadDataset's kohya-level data inside the real ComfyUI (SD1.x fixture): aspect-ratio buckets,
repeats, masks, both flips, trigger and shuffled caption variants, the cache's summary and pruning, and
the bad-input messages; then the trainer on the result."""

from __future__ import annotations

import os
import time

import pytest
import torch

pytestmark = pytest.mark.comfy


@pytest.fixture()
def eps(comfy, fixture_checkpoints):
    from comfy_helpers import load_family

    return load_family("eps", fixture_checkpoints)


@pytest.fixture(scope="module")
def shared_user(tmp_path_factory):
    return tmp_path_factory.mktemp("user")


@pytest.fixture()
def shared_cache(comfy, input_dir, shared_user, monkeypatch):
    """One dataset cache for the tests that do not count its entries: each VAE encoding happens once."""
    monkeypatch.setattr(comfy, "get_user_directory", lambda: str(shared_user))
    return input_dir


def load(fam, folder, **kw):
    from supercond.nodes.train.dataset import SupercondLoadDataset

    args = dict(resolution=256, flip=False, random_crop=False, seed=0) | kw
    out = SupercondLoadDataset.execute(folder, fam.clip, fam.vae, **args)
    return out.result[0], out.result[1], out.ui


def test_buckets_repeats_masks_and_flips(eps, shared_cache, monkeypatch):
    lat, cond, shown = load(eps, "supercond_example_buckets", buckets=True, flip=True)
    items = lat["supercond_items"]
    sizes = {tuple(t.shape[-2:]) for t in items}
    assert sizes == {(24, 40), (40, 24), (32, 32)}  # 320x192, 192x320, 256x256: about 256^2 pixels each
    assert len(items) == len(cond) == 10  # 8 images, two of them in 2_repeat
    ids = lat["supercond_image_ids"]
    assert len(set(ids)) == 8 and sorted(ids.count(i) for i in set(ids))[-2:] == [2, 2]
    masks = [m for m in lat["supercond_masks"] if m is not None]
    assert len(masks) == 4 + 1  # three _mask.png files and one alpha channel, one of them repeated
    assert all(m.shape[-2:] == t.shape[-2:] for m, t in zip(lat["supercond_masks"], items, strict=True)
               if m is not None)
    assert all(0 < float(m.mean()) < 1 for m in masks)
    assert all(f.shape == t.shape and not torch.equal(f, t) for f, t in zip(lat["supercond_flipped"], items,
                                                                           strict=True))
    text = shown.as_dict()["text"][0]
    assert "8 images, 10 with repeats" in str(text) and "masks: 5" in str(text)
    # a re-run reads the cache: no VAE call
    calls = []
    with monkeypatch.context() as m:
        m.setattr(eps.vae, "encode", lambda *a: calls.append(1))
        again = load(eps, "supercond_example_buckets", buckets=True, flip=True)[0]
    assert not calls and all(torch.equal(a, b) for a, b in zip(again["supercond_items"], items, strict=True))
    # without buckets: squares, as before
    square = load(eps, "supercond_example_buckets", resolution=64)[0]
    assert "supercond_items" not in square and square["samples"].shape == (10, 4, 8, 8)


def test_trainer_runs_on_buckets_with_masked_loss(eps, shared_cache, loras):
    from test_train_features import run

    lat, cond, _ = load(eps, "supercond_example_buckets", buckets=True, flip=True, resolution=128)
    model, path, _, _ = run(eps, lat, cond, steps=3, batch_size=2, masked_loss=True).result
    assert path.endswith("lora_000003.safetensors")


def test_trigger_and_shuffled_variants(eps, shared_cache):
    from supercond.nodes.train.dataset import captions

    variants = captions("red, disc, pale background, supercond style", "sks", True, 2, 0, 0)
    assert len(variants) > 2 and all(v.startswith("sks, red, ") for v in variants)
    assert {frozenset(v.split(", ")) for v in variants} == {frozenset(["sks", "red", "disc", "pale background",
                                                                       "supercond style"])}
    _, cond, _ = load(eps, "supercond_example_buckets", trigger="sks", shuffle_tags=True, keep_tokens=1,
                      resolution=64)
    rows = cond[0][1]["supercond_variants"]
    assert len(rows) > 1 and not torch.equal(rows[0]["cross_attn"], rows[1]["cross_attn"])
    assert torch.equal(cond[0][0], rows[0]["cross_attn"])
    _, plain, _ = load(eps, "supercond_example_buckets", resolution=64)
    assert "supercond_variants" not in plain[0][1] and not torch.equal(plain[0][0], cond[0][0])


def test_bad_files_are_named(eps, input_dir):
    from PIL import Image

    from supercond.core.dataset import DatasetError

    d = input_dir / "bad"
    d.mkdir()
    Image.new("RGB", (96, 64), (200, 10, 10)).save(d / "a.png")
    (d / "a.txt").write_bytes(b"caf\xe9, red")
    with pytest.raises(DatasetError, match=r"a\.txt .* is not UTF-8"):
        load(eps, "bad")
    (d / "a.txt").write_text("red")
    Image.new("L", (48, 32), 255).save(d / "a_mask.png")
    with pytest.raises(DatasetError, match=r"mask a_mask\.png is 48x32 but its image a\.png is 96x64"):
        load(eps, "bad")
    (d / "a_mask.png").unlink()
    with pytest.raises(DatasetError, match=r"image a\.png .* smaller than the smallest bucket"):
        load(eps, "bad", buckets=True, resolution=512)
    (d / "a.png").write_bytes((d / "a.png").read_bytes()[:60])
    with pytest.raises(DatasetError, match=r"cannot read image a\.png"):
        load(eps, "bad")


def test_cache_entries_unused_for_long_are_pruned(eps, input_dir):
    from supercond.nodes.train.dataset import CACHE_MAX_AGE_DAYS, tidy_cache

    load(eps, "supercond_example", resolution=64)
    cache = input_dir.parent / "user" / "supercond_cache" / "dataset"
    entries = sorted(cache.glob("*.safetensors"))
    old = time.time() - (CACHE_MAX_AGE_DAYS + 1) * 86400
    os.utime(entries[0], (old, old))
    count, size, removed = tidy_cache(cache)
    assert removed == 1 and count == len(entries) - 1 and size > 0
    # a use refreshes an entry: loading again keeps all (the removed one is rebuilt)
    for p in cache.glob("*.safetensors"):
        os.utime(p, (old + 3600, old + 3600))
    load(eps, "supercond_example", resolution=64)
    assert tidy_cache(cache)[2] == 0
