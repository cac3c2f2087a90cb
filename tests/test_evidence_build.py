"""Tier B: a miniature of ``scripts/evidence build`` (3 steps on 16 images), so the pipeline cannot rot:
ComfyUI's CheckpointLoaderSimple reads the file as SD1.x with its digit codec as the VAE, the codec
round-trips the digits, a second build is a cache hit, and the stock KSampler samples it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def built(comfy, tmp_path_factory):
    from evidence import build

    models = tmp_path_factory.mktemp("evidence_models")
    return models, build.build(models, build.miniature())


def test_the_checkpoint_loads_as_sd15_and_its_codec_round_trips_the_digits(built):
    from evidence import data, report

    _models, path = built
    ev = report.Evidence.load(path)
    assert type(ev.model.model.model_config).__name__ == "SD15"
    assert type(ev.vae.first_stage_model).__name__ == "TAESD"
    real = data.load()[1].pixels[:40]
    image = data.render(real)
    back = ev.vae.decode(ev.vae.encode(image)).float()
    psnr = 10 * torch.log10(1 / (back - image).square().mean())
    assert psnr > 60, f"codec PSNR {psnr:.1f} dB"
    latent = ev.model.model.process_latent_in(ev.vae.encode(image).float())
    assert abs(float(latent.mean())) < 0.3 and 0.7 < float(latent.std()) < 1.3  # what the UNet was trained on


def test_a_second_build_is_a_cache_hit_and_other_settings_are_not(built):
    from dataclasses import replace

    from evidence import build

    models, path = built
    stamp = path.stat().st_mtime_ns
    assert build.build(models, build.miniature()) == path
    assert path.stat().st_mtime_ns == stamp
    assert build.cached(path, build.miniature())
    assert not build.cached(path, replace(build.miniature(), steps=4))
    assert not build.cached(path, build.BuildConfig())


def test_the_stock_sampler_draws_digits_of_the_right_shape(built):
    from evidence import report

    ev = report.Evidence.load(built[1])
    a = ev.sample(3, 2, seed=1, steps=2)
    assert a.shape == (2, 8, 8) and bool(torch.isfinite(a).all())
    assert torch.equal(a, ev.sample(3, 2, seed=1, steps=2))
    assert not torch.equal(a, ev.sample(3, 2, seed=2, steps=2))
