"""Tier A: schedule fixes (core/schedules.py) and offset/pyramid noise (core/noise.py), plain torch."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from supercond.core import noise, schedules


def sd_alphas_cumprod() -> torch.Tensor:
    """SD1.x / SDXL: 'scaled linear' betas, as ComfyUI's make_beta_schedule('linear', ...)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def sd_sigma_table() -> torch.Tensor:
    ab = sd_alphas_cumprod()
    return ((1 - ab) / ab).sqrt().float()


# -- spacings ----------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing, expected", [
    ("trailing", [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]),
    ("leading", [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]),
    ("linspace", [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]),
])
def test_spacings_give_the_documented_timesteps(spacing, expected):
    assert schedules.spacing_timesteps(spacing, 10, 1000).tolist() == expected


@settings(max_examples=60, deadline=None)
@given(steps=st.integers(1, 1000), spacing=st.sampled_from(schedules.TABLE_SPACINGS))
def test_spacings_are_strictly_decreasing_in_range(steps, spacing):
    t = schedules.spacing_timesteps(spacing, steps, 1000)
    assert len(t) == steps and int(t.min()) >= 0 and int(t.max()) <= 999
    assert bool((t[:-1] > t[1:]).all())
    if spacing != "leading":
        assert int(t[0]) == 999  # trailing and linspace start at pure noise


def test_table_sigmas_match_the_model_table_and_end_at_zero():
    table = sd_sigma_table()
    sig = schedules.table_sigmas(table, schedules.spacing_timesteps("trailing", 10))
    assert len(sig) == 11 and float(sig[-1]) == 0.0
    assert float(sig[0]) == pytest.approx(14.6146, abs=1e-3)
    assert float(sig[1]) == pytest.approx(float(table[899]))


@pytest.mark.parametrize("fn", [schedules.karras_sigmas, schedules.exponential_sigmas])
def test_sigma_space_spacings_span_the_range(fn):
    sig = fn(8, 0.0292, 14.6146)
    assert len(sig) == 9 and float(sig[-1]) == 0.0
    assert float(sig[0]) == pytest.approx(14.6146, rel=1e-6) and float(sig[-2]) == pytest.approx(0.0292, rel=1e-5)
    assert bool((sig[:-1] > sig[1:]).all())


@pytest.mark.parametrize("bad", [0, -3])
def test_steps_below_one_are_refused(bad):
    with pytest.raises(schedules.ScheduleError, match="steps must be at least 1"):
        schedules.spacing_timesteps("trailing", bad)
    with pytest.raises(schedules.ScheduleError, match="steps must be at least 1"):
        schedules.karras_sigmas(bad, 0.03, 14.6)
    with pytest.raises(schedules.ScheduleError, match="cannot exceed"):
        schedules.spacing_timesteps("trailing", 1001)


# -- zero terminal SNR -------------------------------------------------------------------------


def test_sd_terminal_snr_is_lin_et_al_table_1_and_the_rescale_takes_it_to_zero():
    """Lin et al.'s SD values through the implementation: snr() of the last sigma, and what
    rescale_zero_terminal_snr leaves of it."""
    ab = sd_alphas_cumprod()
    assert float(schedules.snr(sd_sigma_table().double()[-1:])[0]) == pytest.approx(0.004682, abs=1e-6)
    rescaled = schedules.rescale_zero_terminal_snr(ab)
    assert float(rescaled[-1].sqrt()) == 0 and float(ab[-1].sqrt()) == pytest.approx(0.068265, abs=1e-6)


def test_zero_terminal_snr_ends_at_snr_zero_and_keeps_the_first_alpha():
    ab = sd_alphas_cumprod()
    new = schedules.rescale_zero_terminal_snr(ab)
    assert float(new[-1]) == 0.0  # SNR(T) = ab / (1 - ab) = 0 exactly
    assert float(new[0]) == pytest.approx(float(ab[0]), rel=1e-12)
    assert bool((new[:-1] > new[1:]).all())
    # linear in sqrt(alpha_bar): the rescaled sqrt is an affine map of the old one
    s, r = ab.sqrt(), new.sqrt()
    slope = (r[0] - r[-1]) / (s[0] - s[-1])
    assert torch.allclose(r, (s - s[-1]) * slope, atol=1e-12)


def test_zero_terminal_snr_sigma_table_matches_comfyui_clamp():
    table = sd_sigma_table()
    z = schedules.zero_terminal_snr_sigma_table(table)
    assert float(z[0]) == pytest.approx(float(table[0]), rel=1e-5)
    assert float(z[-1]) == pytest.approx(4518.7637, rel=1e-4)  # finite, as ComfyUI's zsnr
    assert float(schedules.snr(z[-1:])[0]) < 1e-7
    assert float(z[-2]) == pytest.approx(2254.24, rel=1e-3)


def test_snr_conventions():
    s = torch.tensor([2.0, 0.5])
    assert schedules.snr(s, "ve").tolist() == pytest.approx([0.25, 4.0])
    assert schedules.snr(s[1:], "flow").tolist() == pytest.approx([1.0])


def test_first_sigma_policies():
    sig = torch.tensor([4518.0, 100.0, 10.0, 0.0])
    assert schedules.apply_first_sigma(sig, "as_scheduled", 136.0) is sig
    assert float(schedules.apply_first_sigma(sig, "set", 136.0)[0]) == 136.0
    assert float(schedules.apply_first_sigma(sig, "cap", 136.0)[0]) == 136.0
    assert float(schedules.apply_first_sigma(torch.tensor([14.6, 1.0, 0.0]), "cap", 136.0)[0]) == pytest.approx(14.6)
    with pytest.raises(schedules.ScheduleError, match="not above the second sigma"):
        schedules.apply_first_sigma(sig, "set", 50.0)


# -- noise correction and epsilon scaling ------------------------------------------------------


def _xdn(seed: int = 0, shape=(2, 4, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)


def test_noise_correction_is_the_formula_and_strength_blends():
    n, d = _xdn()
    s0, s1 = 14.6146, 5.0
    x = n * math.sqrt(1 + s0**2)  # empty latent, max_denoise: what ComfyUI starts from
    full = schedules.noise_correction_step("ve", x, d, n, s0, s1, 1.0)
    assert torch.allclose(full, d + s1 * n)
    plain = schedules.noise_correction_step("ve", x, d, n, s0, s1, 0.0)
    assert torch.allclose(plain, x + (s1 - s0) * (x - d) / s0)  # Euler
    half = schedules.noise_correction_step("ve", x, d, n, s0, s1, 0.5)
    assert torch.allclose(half, 0.5 * (full + plain))
    with pytest.raises(schedules.ScheduleError, match="strength"):
        schedules.noise_correction_step("ve", x, d, n, s0, s1, -0.1)


def test_noise_correction_is_the_plain_step_for_flow_from_sigma_one():
    n, d = _xdn(1)
    x = n.clone()  # flow at sigma 1: x_T is the noise
    plain = schedules.noise_correction_step("flow", x, d, n, 1.0, 0.7, 0.0)
    assert torch.allclose(schedules.noise_correction_step("flow", x, d, n, 1.0, 0.7, 1.0), plain)


def test_noise_correction_gain_on_the_sd_schedule():
    """The README's figure, from noise_correction_step itself: 10 trailing steps on SD's schedule from
    pure noise, the weight of the x0 estimate in x1 (VP units) rises 0.0516 -> 0.1196."""
    table = sd_sigma_table().double()
    s0, s1 = float(table[999]), float(table[899])
    d, n = torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64)  # x1 = weight * d
    x = s0 * n  # ComfyUI's start from an empty latent
    a1 = 1 / math.sqrt(1 + s1**2)
    plain = float(schedules.noise_correction_step("ve", x, d, n, s0, s1, 0.0)[0, 0]) * a1
    corrected = float(schedules.noise_correction_step("ve", x, d, n, s0, s1, 1.0)[0, 0]) * a1
    assert plain == pytest.approx(0.0516, abs=2e-4)
    assert corrected == pytest.approx(0.1196, abs=2e-4)


@pytest.mark.parametrize("geo", ["ve", "flow"])
@pytest.mark.parametrize("sigma", [0.3, 0.9])
def test_epsilon_scaling_divides_exactly_the_noise_component(geo, sigma):
    n, d = _xdn(2)
    x = schedules.renoise(geo, d, n, sigma)
    lam = 1.02
    d2 = schedules.epsilon_scale(geo, x, d, sigma, lam)
    assert torch.allclose(schedules.implied_noise(geo, x, d2, sigma), n / lam)
    # hand computation, element by element
    x0, d0, n0 = float(x.flatten()[0]), float(d.flatten()[0]), float(n.flatten()[0])
    if geo == "ve":
        hand = x0 - sigma * n0 / lam
    else:
        hand = (x0 - sigma * n0 / lam) / (1 - sigma)
    assert float(d2.flatten()[0]) == pytest.approx(hand, rel=1e-12)
    assert float(d.flatten()[0]) == pytest.approx(d0)
    assert schedules.epsilon_scale(geo, x, d, sigma, 1.0) is d


def test_epsilon_lambda():
    assert schedules.epsilon_lambda(0.5, 0.01, 1.0) == pytest.approx(1.005)
    with pytest.raises(schedules.ScheduleError, match="must stay > 0"):
        schedules.epsilon_lambda(1.0, -1.0, 0.5)


# -- offset / pyramid noise --------------------------------------------------------------------


def test_seeded_noise_matches_a_plain_manual_seed_draw_and_batch_index():
    like = torch.zeros(3, 4, 8, 8)
    state = torch.get_rng_state()
    torch.manual_seed(42)
    ref = torch.randn(like.size())
    torch.set_rng_state(state)
    assert torch.equal(noise.seeded_noise(like, 42), ref)
    one = noise.seeded_noise(torch.zeros(1, 4, 8, 8), 42, [2])
    per_latent = noise.seeded_noise(torch.zeros(3, 4, 8, 8), 42, [0, 1, 2])
    assert torch.equal(one[0], per_latent[2])


def test_structure_noise_off_is_the_same_tensor():
    n = torch.randn(2, 4, 8, 8)
    assert noise.structure_noise(n, noise.row_generators(0, [0, 1]), 0.0, 0) is n


def test_offset_noise_has_the_per_channel_mean_structure_and_unit_variance():
    base = noise.seeded_noise(torch.zeros(64, 4, 32, 32), 7)
    off = 0.5
    out = noise.structure_noise(base, noise.row_generators(7, range(64)), off, 0)
    delta = noise.offset_component(base.shape, noise.row_generators(7, range(64)))
    assert torch.allclose(out * math.sqrt(1 + off**2) - base, off * delta, atol=1e-5)
    means = out.mean(dim=(2, 3))
    assert torch.allclose(means, (off * delta.view(64, 4) + base.mean(dim=(2, 3))) / math.sqrt(1 + off**2), atol=1e-5)
    assert float(out.var()) == pytest.approx(1.0, abs=0.08)
    assert float(delta.std()) == pytest.approx(1.0, abs=0.15)  # per-channel constants ~ N(0, 1)


def test_pyramid_noise_is_unit_std_per_row_and_reproducible_per_batch_index():
    base = noise.seeded_noise(torch.zeros(3, 4, 32, 32), 5, [0, 1, 2])
    out = noise.structure_noise(base, noise.row_generators(5, [0, 1, 2]), 0.0, 6, 0.3)
    assert out.flatten(1).std(dim=1).tolist() == pytest.approx([1.0] * 3, abs=1e-5)
    alone = noise.structure_noise(base[2:], noise.row_generators(5, [2]), 0.0, 6, 0.3)
    assert torch.equal(alone[0], out[2])
    # low frequencies gained energy: the 4x4-pooled noise varies more than white noise's (level 0 is
    # full-resolution noise of weight 1, so the gain is about 1.5x at discount 0.3)
    pooled = torch.nn.functional.avg_pool2d(out, 8).var()
    assert float(pooled) > 1.3 * float(torch.nn.functional.avg_pool2d(base, 8).var())


def kohya_noise(noise_: torch.Tensor, g: torch.Generator, offset: float, iterations: int, discount: float):
    """kohya's training noise for one row, written from sd-scripts' formulas (apply_noise_offset, then
    pyramid_noise_like), with its RNG calls drawn from ``g`` in the same order."""
    b, c, h, w = noise_.shape
    out = noise_ + offset * torch.randn((b, c, 1, 1), generator=g) if offset else noise_  # kohya: only when set
    up = torch.nn.Upsample(size=(h, w), mode="bilinear")
    for i in range(iterations):
        r = float(torch.rand((), generator=g)) * 2 + 2
        hn, wn = max(1, int(h / (r**i))), max(1, int(w / (r**i)))
        out = out + up(torch.randn((b, c, hn, wn), generator=g)) * discount**i
        if hn == 1 or wn == 1:
            break
    return out / out.std()


@pytest.mark.parametrize("offset, iterations, size", [(0.0, 6, 32), (0.1, 3, 32), (0.1, 10, 20), (0.05, 1, 16)])
def test_training_noise_matches_kohya(offset, iterations, size):
    """The trainer's offset + pyramid noise is kohya's: offset first, pyramid levels from i = 0 (a second
    full-resolution draw), divided by the std, given the same random draws."""
    base = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(3))
    ours = noise.structure_noise(base, noise.row_generators(9, [0]), offset, iterations, 0.3, normalize=False)
    ref = kohya_noise(base, noise.row_generators(9, [0])[0], offset, iterations, 0.3)
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()


def test_video_latents_are_supported():
    base = torch.randn(1, 4, 3, 16, 16)
    out = noise.structure_noise(base, noise.row_generators(0, [0]), 0.1, 3)
    assert out.shape == base.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("kw, msg", [
    (dict(offset=-0.1), "offset must be"),
    (dict(pyramid_iterations=-1), "pyramid_iterations"),
    (dict(pyramid_iterations=2, pyramid_discount=0.0), "pyramid_discount"),
])
def test_bad_noise_input_is_refused(kw, msg):
    with pytest.raises(noise.NoiseError, match=msg):
        noise.structure_noise(torch.randn(1, 4, 8, 8), noise.row_generators(0, [0]), **kw)
