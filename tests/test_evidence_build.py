"""Tier B: a miniature of ``scripts/evidence build`` (3 steps on 16 images) and of every table of
``scripts/evidence report`` on it, so neither can rot: ComfyUI's CheckpointLoaderSimple reads the
file as SD1.x with its digit codec as the VAE, the codec round-trips the digits, a second build is
a cache hit, the stock KSampler samples it, calls are counted, the peers save the calls they
should, and each table prints its rows and writes its plot (trained heads and LoRAs cached)."""

from __future__ import annotations

import logging
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
    from evidence import artifacts, build

    models = tmp_path_factory.mktemp("evidence_models")
    path = build.build(models, build.miniature())
    artifacts.register_folders(models)
    return models, path


@pytest.fixture(scope="module")
def ev(built):
    from evidence.sampling import Evidence

    return Evidence.load(built[1])


@pytest.fixture(scope="module")
def judge():
    from evidence import data, metrics

    return metrics.Judge(*data.load(), seed=0)


def test_the_checkpoint_loads_as_sd15_and_its_codec_round_trips_the_digits(ev):
    from evidence import data

    assert type(ev.model.model.model_config).__name__ == "SD15"
    assert type(ev.vae.first_stage_model).__name__ == "TAESD"
    real = data.load()[1].pixels[:40]
    image = data.render(real)
    back = ev.vae.decode(ev.vae.encode(image)).float()
    psnr = 10 * torch.log10(1 / (back - image).square().mean())
    assert psnr > 60, f"codec PSNR {psnr:.1f} dB"
    latent = ev.model.model.process_latent_in(ev.vae.encode(image).float())
    assert abs(float(latent.mean())) < 0.3 and 0.7 < float(latent.std()) < 1.3  # what the UNet was trained on


def test_the_held_out_digit_is_not_in_the_training_data():
    from evidence import build, data

    assert data.HELD_OUT not in data.SEEN and len(data.SEEN) == 9
    assert build.BuildConfig().held_out == data.HELD_OUT


def test_a_second_build_is_a_cache_hit_and_other_settings_are_not(built):
    from dataclasses import replace

    from evidence import build

    models, path = built
    stamp = path.stat().st_mtime_ns
    assert build.build(models, build.miniature()) == path
    assert path.stat().st_mtime_ns == stamp
    assert build.cached(path, build.miniature())
    assert not build.cached(path, replace(build.miniature(), steps=4))
    assert not build.cached(path, replace(build.miniature(), held_out=-1))
    assert not build.cached(path, build.BuildConfig())


def test_draws_are_seeded_per_row_prompted_and_their_calls_counted(ev):
    a = ev.draw((3, 7), 2, seed=1, steps=2, cfg=5.0)
    assert a.pixels.shape == (4, 8, 8) and bool(torch.isfinite(a.pixels).all())
    assert a.labels.tolist() == [3, 3, 7, 7]
    assert a.calls == 4  # two steps, cond + uncond
    assert torch.equal(a.pixels, ev.draw((3, 7), 2, seed=1, steps=2, cfg=5.0).pixels)
    assert not torch.equal(a.pixels, ev.draw((3, 7), 2, seed=2, steps=2, cfg=5.0).pixels)
    assert ev.draw((3, 7), 2, seed=1, steps=2, cfg=1.0).calls == 2  # ComfyUI skips the uncond at cfg 1
    # the custom-sampler path with the KSampler's scheduler is the same image
    assert torch.equal(a.pixels, ev.draw((3, 7), 2, seed=1, steps=2, cfg=5.0, guider=_cfg_guider).pixels)


def _cfg_guider(model, positive, negative, cfg):
    from comfy_extras import nodes_custom_sampler as cs

    return cs.CFGGuider().get_guider(model, positive, negative, cfg)[0]


def test_the_peers_skip_the_calls_they_should(ev):
    from evidence import peers

    # adaptive guidance: threshold -1 truncates after the first step; 1.01 never does (plain CFG)
    once = ev.draw((1,), 2, seed=0, steps=4, cfg=5.0, guider=peers.adaptive_guider(-1.0))
    never = ev.draw((1,), 2, seed=0, steps=4, cfg=5.0, guider=peers.adaptive_guider(1.01))
    cfg = ev.draw((1,), 2, seed=0, steps=4, cfg=5.0)
    assert (once.calls, never.calls) == (5, 8)
    assert torch.allclose(never.pixels, cfg.pixels, atol=1e-5)
    # one run per prompt, each on its rows of the whole batch's noise: the same images as one batch
    split = ev.draw((1, 4), 2, seed=0, steps=4, cfg=5.0, guider=peers.adaptive_guider(1.01), batch_per_digit=True)
    whole = ev.draw((1, 4), 2, seed=0, steps=4, cfg=5.0)
    assert split.labels.tolist() == [1, 1, 4, 4] and split.calls == 8
    assert torch.allclose(split.pixels, whole.pixels, atol=1e-3)
    # guidance interval: only steps whose sigma is inside (lo, hi] pay for the uncond
    import comfy.samplers

    sig = comfy.samplers.calculate_sigmas(ev.model.get_model_object("model_sampling"), "normal", 4)[:-1]
    inside = int(((sig > 1.0) & (sig <= 8.0)).sum())
    assert 0 < inside < 4
    gi = ev.draw((1,), 2, seed=0, steps=4, cfg=5.0, model=peers.guidance_interval(ev.model, 1.0, 8.0))
    assert gi.calls == 4 + inside
    assert ev.draw((1,), 2, seed=0, steps=4, cfg=5.0, model=peers.guidance_interval(ev.model, 0.0, 1e9)).calls == 8
    # the caches are outside the counter: the steps they skip are not counted (at their highest threshold
    # they skip after their start); at threshold 0 they skip none. EasyCache at cfg 1 (one prompt per
    # call: 0.3.64's EasyCache mixes batched cond and uncond, peers.py)
    for cache, cfg, full in (("LazyCache", 5.0, 16), ("EasyCache", 1.0, 8)):
        skipping = ev.draw((1,), 2, seed=0, steps=8, cfg=cfg, model=peers.cached(ev.model, cache, 3.0))
        assert 1 <= skipping.calls < full, cache
        assert ev.draw((1,), 2, seed=0, steps=8, cfg=cfg, model=peers.cached(ev.model, cache, 0.0)).calls == full


def test_a_wired_negative_replaces_the_empty_prompt(ev):
    import nodes

    three = nodes.CLIPTextEncode().encode(ev.clip, "a handwritten three")[0]
    plain = ev.draw((1,), 2, seed=0, steps=2, cfg=5.0)
    assert torch.equal(plain.pixels, ev.draw((1,), 2, seed=0, steps=2, cfg=5.0, negative=ev.negative).pixels)
    assert not torch.equal(plain.pixels, ev.draw((1,), 2, seed=0, steps=2, cfg=5.0, negative=three).pixels)


MINI = dict(per_digit=2, rounds=5, steps=2, few_steps=2, scales=(3.0,), schedule_steps=(2,), trainer_samples=4, lora_steps=2,
            lora_every=1, head_steps=2, gist_steps=2, gist_images=2, negative_scales=(5.0,),
            fit_steps=(2,), fit_teacher_steps=6, fit_samples=2, negatives=(3,), fit_samplers=("dpmpp_2m",))


def test_every_table_prints_its_rows_and_writes_its_plot(ev, judge, caplog, monkeypatch, tmp_path):
    import _common
    from evidence import report

    monkeypatch.setattr(_common, "RESULTS", tmp_path)
    settings = report.Settings(**MINI)
    with caplog.at_level(logging.INFO, logger="supercond.evidence"):
        report.train(ev, settings)
        report.run(ev, judge, settings, out=tmp_path / "report.md")
    text = caplog.text
    for title in ("0. Has the model learned", "1. Single-pass heads", "1b. The same at 2 steps", "2. Diversity", "3. Schedules at",
                  "4. LoRA trainer", "4b. CEP in the memorization regime", "5. Negative prompts at one call",
                  "6. Fitted schedules at 2 steps"):
        assert title in text
    assert "single-pass last_block head, 2 steps, cfg 3 | 2.0 |" in text  # one call a step, counted
    assert "two-pass CFG, 2 steps, cfg 3 | 4.0 |" in text
    assert "two-pass CFG + LazyCache, 2 steps, cfg 3 |" in text
    assert "single-pass last_block head + EasyCache, 2 steps, cfg 3 |" in text
    assert "single-pass negative-reading head, negative 'a handwritten three', cfg 5 | 2.0 |" in text
    assert "- 'a handwritten three' (held out), cfg 5: the head is" in text
    assert "- cfg 3: projection:" in text and "CFG at 1 steps" in text
    for png in ("evidence_guidance.png", "evidence_guidance_grid.png", "evidence_diversity.png",
                "evidence_schedules.png", "evidence_trainer.png", "evidence_trainer_few.png",
                "evidence_negatives_grid.png", "evidence_fitted_schedules.png"):
        assert (tmp_path / png).stat().st_size > 1000, png
    assert "training the last_block head" in text and "training the gist" in text
    assert "training the negative-reading head" in text and "fitting a 2-step dpmpp_2m schedule" in text
    assert "dpmpp_2m, fitted (optimal stepsize), 2 steps |" in text and "dpmpp_2m, AYS (SD1 preset), 2 steps |" in text
    from evidence import compare

    same = compare.compare(tmp_path / "report.md", tmp_path / "report.md")[0]
    n = len(compare.tables(tmp_path / "report.md"))  # every figure of the file (on sets this small a value
    assert n > 100 and same.startswith(f"{n} figures in both reports")  # may fall outside its own interval)
    assert same.endswith(f"intervals overlapping: {n}")
    # a second run loads what the first trained instead of training again
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="supercond.evidence"):
        report.train(ev, settings)
    assert "training" not in caplog.text
