"""Tier A: the CEP / CADS engine in core/perturb.py, plain torch."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from supercond.core import perturb, seeds


def gen(seed: int = 0) -> torch.Generator:
    return seeds.seeded_generator(seed)


def embedding(b: int = 2, t: int = 77, d: int = 768, rms: float = 1.0, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, d, generator=g) * rms


def test_gamma_zero_is_the_same_tensor():
    x = embedding()
    assert perturb.apply_cep(x, 0.0, "uniform", "paper", gen()) is x


@pytest.mark.parametrize("gamma", [0.5, 1.0, 4.0])
def test_uniform_noise_is_uniform_with_amplitude_gamma_over_sqrt_d(gamma):
    x = embedding(d=768)
    delta = perturb.apply_cep(x, gamma, "uniform", "paper", gen()) - x
    a = gamma / math.sqrt(768)
    assert delta.abs().max() <= a * (1 + 1e-5)
    sample = (delta.flatten()[:20000] / a).double().numpy()
    assert stats.kstest(sample, stats.uniform(loc=-1, scale=2).cdf).pvalue > 1e-3
    assert delta.std().item() == pytest.approx(a / math.sqrt(3), rel=0.02)


@pytest.mark.parametrize("gamma", [0.5, 1.0, 4.0])
def test_gaussian_noise_has_std_gamma_over_sqrt_d(gamma):
    x = embedding(d=1024)
    delta = perturb.apply_cep(x, gamma, "gaussian", "paper", gen()) - x
    a = gamma / math.sqrt(1024)
    sample = (delta.flatten()[:20000] / a).double().numpy()
    assert stats.kstest(sample, stats.norm.cdf).pvalue > 1e-3
    assert delta.std().item() == pytest.approx(a, rel=0.02)


def test_sdxl_width_is_scaled_per_encoder_segment():
    x = embedding(d=2048)
    delta = perturb.apply_cep(x, 1.0, "uniform", "paper", gen(), segments=(768, 1280)) - x
    assert delta[..., :768].abs().max() == pytest.approx(1 / math.sqrt(768), rel=1e-3)
    assert delta[..., 768:].abs().max() == pytest.approx(1 / math.sqrt(1280), rel=1e-3)


def test_without_segments_the_width_is_one_encoder():
    """A 2048-wide encoder that is not SDXL's CLIP-L|CLIP-G pair is scaled by its whole width."""
    x = embedding(d=2048)
    delta = perturb.apply_cep(x, 1.0, "uniform", "paper", gen()) - x
    assert delta.abs().max() == pytest.approx(1 / math.sqrt(2048), rel=1e-3)
    with pytest.raises(perturb.PerturbError, match="do not add up"):
        perturb.apply_cep(x, 1.0, "uniform", "paper", gen(), segments=(768, 1024))


def test_padding_is_untouched_and_not_counted_in_d():
    x = embedding(d=4096)
    x[..., 768:] = 0  # SD3 with only CLIP-L: zero-padded to the T5 width
    delta = perturb.apply_cep(x, 1.0, "uniform", "paper", gen()) - x
    assert torch.all(delta[..., 768:] == 0)
    assert delta[..., :768].abs().max() == pytest.approx(1 / math.sqrt(768), rel=1e-3)


def test_relative_scale_follows_the_embedding_rms():
    small, big = embedding(rms=1.0), embedding(rms=10.0)
    d_small = perturb.apply_cep(small, 1.0, "gaussian", "relative", gen(3)) - small
    d_big = perturb.apply_cep(big, 1.0, "gaussian", "relative", gen(3)) - big
    torch.testing.assert_close(d_big, d_small * 10, rtol=1e-3, atol=1e-5)
    paper = perturb.apply_cep(small, 1.0, "gaussian", "paper", gen(3)) - small
    rms_small = small.pow(2).mean(dim=(1, 2), keepdim=True).sqrt()
    torch.testing.assert_close(paper * rms_small, d_small, rtol=1e-3, atol=1e-5)


def test_rows_get_distinct_draws_and_seeds_reproduce():
    x = embedding(b=4)
    d1 = perturb.cep_delta(x, 1.0, "uniform", "paper", gen(7))
    d2 = perturb.cep_delta(x, 1.0, "uniform", "paper", gen(7))
    assert torch.equal(d1, d2)
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.allclose(d1[i], d1[j])
    assert not torch.equal(d1, perturb.cep_delta(x, 1.0, "uniform", "paper", gen(8)))


def test_global_rng_is_not_touched():
    state = torch.get_rng_state()
    perturb.apply_cep(embedding(), 1.0, "gaussian", "paper", gen())
    perturb.apply_cads(embedding(), 0.3, 0.25, 1.0, gen())
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("gamma", [-0.1, float("nan"), float("inf")])
def test_bad_gamma_is_refused(gamma):
    with pytest.raises(perturb.PerturbError, match="gamma"):
        perturb.apply_cep(embedding(), gamma, "uniform", "paper", gen())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_conditioning_is_refused(bad):
    x = embedding()
    x[0, 3, 5] = bad
    with pytest.raises(perturb.PerturbError, match="NaN or Inf"):
        perturb.apply_cep(x, 1.0, "uniform", "paper", gen())
    with pytest.raises(perturb.PerturbError, match="NaN or Inf"):
        perturb.apply_cads(x, 0.5, 0.25, 1.0, gen())


def test_unknown_distribution_and_scale_are_refused():
    with pytest.raises(perturb.PerturbError, match="distribution"):
        perturb.apply_cep(embedding(), 1.0, "laplace", "paper", gen())
    with pytest.raises(perturb.PerturbError, match="scale"):
        perturb.apply_cep(embedding(), 1.0, "uniform", "absolute", gen())


def test_cads_gamma_at_the_thresholds():
    assert perturb.cads_gamma(0.0, 0.6, 0.9) == 1.0
    assert perturb.cads_gamma(0.6, 0.6, 0.9) == 1.0
    assert perturb.cads_gamma(0.75, 0.6, 0.9) == pytest.approx(0.5)
    assert perturb.cads_gamma(0.9, 0.6, 0.9) == 0.0
    assert perturb.cads_gamma(1.0, 0.6, 0.9) == 0.0


@settings(max_examples=200, deadline=None)
@given(t=st.floats(0, 1), tau1=st.floats(0, 0.98), width=st.floats(0.01, 1))
def test_cads_gamma_matches_the_piecewise_linear_formula(t, tau1, width):
    tau2 = min(tau1 + width, 1.0)
    if not tau1 < tau2:
        return
    g = perturb.cads_gamma(t, tau1, tau2)
    expected = 1.0 if t <= tau1 else 0.0 if t >= tau2 else (tau2 - t) / (tau2 - tau1)
    assert g == pytest.approx(expected)
    assert 0.0 <= g <= 1.0


@pytest.mark.parametrize("tau1,tau2", [(0.9, 0.6), (0.5, 0.5)])
def test_cads_refuses_tau1_not_below_tau2(tau1, tau2):
    with pytest.raises(perturb.PerturbError, match="tau1 must be smaller than tau2"):
        perturb.cads_gamma(0.5, tau1, tau2)


def test_cads_is_identity_at_g_one_and_the_formula_without_rescale():
    y = embedding()
    assert perturb.apply_cads(y, 1.0, 0.25, 1.0, gen()) is y
    # s = 0, psi = 0: y' = sqrt(g) y exactly
    torch.testing.assert_close(perturb.apply_cads(y, 0.36, 0.0, 0.0, gen()), 0.6 * y)
    # g = 0, psi = 0: pure noise of std s
    noise = perturb.apply_cads(y, 0.0, 0.25, 0.0, gen())
    assert noise.std().item() == pytest.approx(0.25, rel=0.02)


def test_cads_rescale_restores_each_samples_mean_and_std():
    y = embedding(b=3) * torch.tensor([1.0, 3.0, 0.5]).view(3, 1, 1) + 0.2
    out = perturb.apply_cads(y, 0.2, 1.0, 1.0, gen())
    for i in range(3):
        assert out[i].mean().item() == pytest.approx(y[i].mean().item(), abs=1e-4)
        assert out[i].std(unbiased=False).item() == pytest.approx(y[i].std(unbiased=False).item(), rel=1e-4)
    assert not torch.allclose(out, y)


def test_dtype_is_kept():
    x = embedding().half()
    assert perturb.apply_cep(x, 1.0, "uniform", "paper", gen()).dtype == torch.float16
    assert perturb.apply_cads(x, 0.5, 0.25, 1.0, gen()).dtype == torch.float16
