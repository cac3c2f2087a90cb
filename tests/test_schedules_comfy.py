"""Schedule fixes inside the real ComfyUI (in-process): real loaders, KSampler and
SamplerCustomAdvanced, on the eps, v-prediction and flow fixtures."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.comfy


def family(name, fixture_checkpoints):
    from comfy_helpers import load_family

    return load_family(name, fixture_checkpoints)


@pytest.fixture()
def eps(comfy, fixture_checkpoints):
    return family("eps", fixture_checkpoints)


class Recorder:
    """A keyed PREDICT_NOISE wrapper: records (sigma, x, guided denoised) of every guider call."""

    def __init__(self, key: str = "supercond.test.predict") -> None:
        self.key = key
        self.calls: list[tuple[float, torch.Tensor, torch.Tensor]] = []

    def __call__(self, executor, x, timestep, model_options={}, seed=None):  # noqa: B006
        out = executor(x, timestep, model_options, seed)
        self.calls.append((float(timestep.flatten()[0]), x.detach().clone(), out.detach().clone()))
        return out

    def install(self, model):
        import comfy.patcher_extension as pe

        m = model.clone()
        m.add_wrapper_with_key(pe.WrappersMP.PREDICT_NOISE, self.key, self)
        return m


def ksample(fam, model, pos, neg, seed=3, steps=4, denoise=1.0, latent=None, cfg=4.0):
    import nodes

    if latent is None:
        latent = {"samples": torch.zeros(1, fam.latent_channels, 8, 8)}
    scheduler = "sgm_uniform" if fam.name == "flow" else "simple"
    (out,) = nodes.common_ksampler(model, seed, steps, cfg, "euler", scheduler, pos, neg, latent, denoise=denoise)
    return out["samples"]


def conds(fam):
    from comfy_helpers import encode

    return encode(fam, "a red cube"), encode(fam, "")


def nc(model, strength=1.0):
    from supercond.nodes.schedules.nodes import SupercondNoiseCorrection

    return SupercondNoiseCorrection.execute(model, strength).result[0]


def es(model, b=1.005, k=0.0):
    from supercond.nodes.schedules.nodes import SupercondEpsilonScaling

    return SupercondEpsilonScaling.execute(model, b, k).result[0]


# -- noise correction ----------------------------------------------------------------------------


def test_noise_correction_changes_only_the_first_step_by_the_formula_on_eps(eps):
    import comfy.sample

    pos, neg = conds(eps)
    plain_rec, nc_rec = Recorder(), Recorder()
    plain = ksample(eps, plain_rec.install(eps.model), pos, neg)
    corrected = ksample(eps, nc_rec.install(nc(eps.model)), pos, neg)
    assert not torch.equal(plain, corrected)
    assert len(plain_rec.calls) == len(nc_rec.calls) == 4
    (s0, x0a, d0a), (s0b, x0b, d0b) = plain_rec.calls[0], nc_rec.calls[0]
    assert s0 == s0b and torch.equal(x0a, x0b) and torch.equal(d0a, d0b)  # same first model call
    n = comfy.sample.prepare_noise(torch.zeros(1, 4, 8, 8), 3)
    s1, x1, _ = nc_rec.calls[1]
    assert torch.allclose(x1, d0b + s1 * n, atol=1e-4), "first update is not D0 + sigma1 * n"
    assert not torch.allclose(plain_rec.calls[1][1], x1, atol=1e-3)


def test_noise_correction_is_bit_identical_on_flow_and_zsnr_v(comfy, fixture_checkpoints):
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    flow = family("flow", fixture_checkpoints)
    pos, neg = conds(flow)
    assert torch.equal(ksample(flow, nc(flow.model), pos, neg), ksample(flow, flow.model, pos, neg))
    v = family("v", fixture_checkpoints)
    (zsnr,) = ModelSamplingDiscrete().patch(v.model, "v_prediction", True)
    pos, neg = conds(v)
    assert torch.equal(ksample(v, nc(zsnr), pos, neg), ksample(v, zsnr, pos, neg))
    assert not torch.equal(ksample(v, nc(v.model), pos, neg), ksample(v, v.model, pos, neg))


def test_noise_correction_leaves_img2img_alone_and_strength_zero_is_the_model(eps):
    pos, neg = conds(eps)
    g = torch.Generator().manual_seed(0)
    latent = {"samples": torch.randn(1, 4, 8, 8, generator=g)}
    assert torch.equal(ksample(eps, nc(eps.model), pos, neg, denoise=0.6, latent=latent),
                       ksample(eps, eps.model, pos, neg, denoise=0.6, latent=latent))
    assert nc(eps.model, 0.0) is eps.model


def test_noise_correction_reaches_sampler_custom_advanced_and_callbacks_count_all_steps(eps):
    import comfy_extras.nodes_custom_sampler as cs

    pos, neg = conds(eps)
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    sigmas = cs.BasicScheduler().get_sigmas(eps.model, "simple", 4, 1.0)[0]
    sampler = cs.KSamplerSelect().get_sampler("euler")[0]

    def run(model):
        guider = cs.CFGGuider().get_guider(model, pos, neg, 4.0)[0]
        return cs.SamplerCustomAdvanced().sample(cs.Noise_RandomNoise(3), guider, sampler, sigmas, latent)[0]["samples"]

    corrected = run(nc(eps.model))
    assert torch.allclose(corrected, ksample(eps, nc(eps.model), pos, neg), atol=1e-5)
    assert not torch.equal(corrected, run(eps.model))
    import comfy.sample

    steps_seen = []
    comfy.sample.sample_custom(nc(eps.model), comfy.sample.prepare_noise(latent["samples"], 3), 4.0, sampler, sigmas,
                               pos, neg, latent["samples"], callback=lambda i, d, x, t: steps_seen.append((i, t)))
    assert steps_seen == [(0, 4), (1, 4), (2, 4), (3, 4)]


# -- offset / pyramid noise ----------------------------------------------------------------------


@pytest.mark.parametrize("batch_index", [None, [2, 0, 5]])
def test_offset_noise_off_is_bit_identical_to_random_noise(comfy, batch_index):
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise

    from supercond.nodes.schedules.nodes import SupercondOffsetNoise

    latent = {"samples": torch.zeros(3, 4, 8, 8)}
    if batch_index is not None:
        latent["batch_index"] = batch_index
    ours = SupercondOffsetNoise.execute(123, 0.0, 0, 0.3).result[0]
    assert ours.seed == 123
    assert torch.equal(ours.generate_noise(latent), Noise_RandomNoise(123).generate_noise(latent))
    on = SupercondOffsetNoise.execute(123, 0.1, 4, 0.3).result[0].generate_noise(latent)
    assert on.shape == (3, 4, 8, 8) and not torch.equal(on, Noise_RandomNoise(123).generate_noise(latent))


# -- epsilon scaling -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["eps", "v", "flow"])
def test_epsilon_scaling_scales_exactly_the_noise_component(comfy, fixture_checkpoints, name):
    fam = family(name, fixture_checkpoints)
    pos, neg = conds(fam)
    assert es(fam.model, 1.0, 0.0) is fam.model
    assert torch.equal(ksample(fam, es(fam.model, 1.0, 0.0), pos, neg), ksample(fam, fam.model, pos, neg))
    outer, inner = Recorder("supercond.test.outer"), Recorder("supercond.test.inner")
    lam = 1.05
    patched = inner.install(es(outer.install(fam.model), b=lam))
    ksample(fam, patched, pos, neg)
    assert len(outer.calls) == len(inner.calls) == 4
    for (s, x, d_scaled), (_, _, d) in zip(outer.calls, inner.calls, strict=True):
        if name == "flow" and s >= 1.0:
            assert torch.equal(d_scaled, d)  # singular at sigma 1: exempt
            continue
        x64, d64 = x.double(), d.double()
        if name == "flow":  # x = (1 - s) D + s eps  ->  keep x, divide eps by lambda
            eps_hat = (x64 - (1 - s) * d64) / s
            hand = (x64 - s * eps_hat / lam) / (1 - s)
        else:  # x = D + s eps (VE coordinates, eps and v alike)
            hand = x64 - (x64 - d64) / lam
        assert torch.allclose(d_scaled.double(), hand, atol=1e-4, rtol=1e-4), f"sigma {s}"
    assert any(not torch.equal(a[2], b[2]) for a, b in zip(outer.calls, inner.calls, strict=True))


def test_epsilon_scaling_linear_schedule_uses_sampling_time(eps):
    from supercond.nodes.schedules.hook import EpsilonScaling

    ms = eps.model.get_model_object("model_sampling")
    hook = EpsilonScaling(k=0.02, b=1.0)
    assert hook.lam(ms, float(ms.sigma_max)) == pytest.approx(1.02, abs=1e-4)
    assert hook.lam(ms, float(ms.sigma_min)) == pytest.approx(1.0, abs=1e-4)


# -- schedule sigmas and plot --------------------------------------------------------------------


def test_schedule_sigmas_on_the_fixtures(comfy, fixture_checkpoints):
    import comfy_extras.nodes_custom_sampler as cs

    from supercond.nodes.schedules.nodes import SupercondScheduleSigmas as S

    fam = family("eps", fixture_checkpoints)
    trailing = S.execute(fam.model, 10, "trailing", False, "as_scheduled", 136.0).result[0]
    simple = cs.BasicScheduler().get_sigmas(fam.model, "simple", 10, 1.0)[0]
    assert torch.allclose(trailing, simple, rtol=1e-5)  # trailing is ComfyUI's "simple"
    leading = S.execute(fam.model, 10, "leading", False, "as_scheduled", 136.0).result[0]
    ddim = cs.BasicScheduler().get_sigmas(fam.model, "ddim_uniform", 10, 1.0)[0]
    assert torch.allclose(leading, ddim, rtol=1e-5)
    # Across step counts: trailing equals ComfyUI's simple only when the step count divides 1000 (simple floors
    # i*1000/steps where trailing rounds); leading equals ddim_uniform (through BasicScheduler) at every count.
    unlike_simple, unlike_ddim = [], []
    for steps in range(1, 101):
        ours = S.execute(fam.model, steps, "trailing", False, "as_scheduled", 136.0).result[0]
        theirs = cs.BasicScheduler().get_sigmas(fam.model, "simple", steps, 1.0)[0]
        assert len(ours) == steps + 1 and float(ours[0]) == pytest.approx(float(fam.model.get_model_object(
            "model_sampling").sigmas[-1]), rel=1e-6)  # trailing always starts at the noisiest timestep
        if not (len(theirs) == len(ours) and torch.allclose(ours, theirs, rtol=1e-5)):
            unlike_simple.append(steps)
        ours = S.execute(fam.model, steps, "leading", False, "as_scheduled", 136.0).result[0]
        theirs = cs.BasicScheduler().get_sigmas(fam.model, "ddim_uniform", steps, 1.0)[0]
        if not (len(theirs) == len(ours) and torch.allclose(ours, theirs, rtol=1e-5)):
            unlike_ddim.append(steps)
    divisors = [n for n in range(1, 101) if 1000 % n == 0]
    assert not set(divisors) & set(unlike_simple + unlike_ddim)
    assert (len(unlike_simple), unlike_ddim) == (89, [])  # the README's numbers
    z = S.execute(fam.model, 10, "trailing", True, "set", 136.0).result[0]
    assert float(z[0]) == 136.0 and float(z[-1]) == 0.0
    zfull = S.execute(fam.model, 10, "trailing", True, "as_scheduled", 136.0).result[0]
    assert float(zfull[0]) == pytest.approx(4518.76, rel=1e-3)
    flow = family("flow", fixture_checkpoints)
    fz = S.execute(flow.model, 4, "trailing", True, "as_scheduled", 136.0).result[0]
    assert float(fz[0]) == pytest.approx(1.0) and torch.equal(
        fz, S.execute(flow.model, 4, "trailing", False, "as_scheduled", 136.0).result[0])
    for spacing in ("karras", "exponential"):
        s = S.execute(fam.model, 5, spacing, False, "as_scheduled", 136.0).result[0]
        assert len(s) == 6 and float(s[0]) == pytest.approx(14.6146, rel=1e-4)


def test_zero_terminal_snr_tells_the_user_on_the_node_when_the_model_is_not_zsnr(comfy, fixture_checkpoints):
    """On an eps model, and on a v model whose own sampling is not zsnr, the node shows a warning on itself
    (ComfyUI's progress text) saying what else is needed; on a zsnr model it says nothing."""
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    from supercond.nodes import events
    from supercond.nodes.schedules.nodes import SupercondScheduleSigmas as S

    shown = []

    def listener(event, data):
        if event == events.PROGRESS_TEXT:
            shown.append(data["text"])

    events.listen(listener)
    try:
        eps, v = family("eps", fixture_checkpoints), family("v", fixture_checkpoints)
        S.execute(eps.model, 4, "trailing", True, "as_scheduled", 136.0)
        assert len(shown) == 1 and "eps-prediction" in shown[0]
        S.execute(v.model, 4, "trailing", True, "as_scheduled", 136.0)
        assert len(shown) == 2 and "ModelSamplingDiscrete (v_prediction, zsnr on)" in shown[1]
        zsnr = ModelSamplingDiscrete().patch(v.model, "v_prediction", True)[0]
        S.execute(zsnr, 4, "trailing", True, "as_scheduled", 136.0)
        S.execute(v.model, 4, "trailing", False, "as_scheduled", 136.0)
        assert len(shown) == 2
    finally:
        events.unlisten(listener)


def test_plot_sigmas_returns_an_image(comfy):
    from supercond.nodes.schedules.nodes import SupercondPlotSigmas

    a = torch.tensor([14.6, 5.0, 1.0, 0.0])
    b = torch.tensor([4518.0, 20.0, 0.5, 0.0])
    out = SupercondPlotSigmas.execute(a, "eps/v: SNR = 1/sigma^2", b, None)
    image = out.result[0]
    assert image.dim() == 4 and image.shape[-1] == 3 and image.shape[2] > image.shape[1]


# -- bad input -----------------------------------------------------------------------------------


def test_bad_input_gets_a_plain_message(comfy, fixture_checkpoints):
    import comfy.model_sampling as cms

    from supercond.nodes.schedules.nodes import (
        SupercondEpsilonScaling,
        SupercondOffsetNoise,
        SupercondScheduleSigmas,
    )

    fam = family("eps", fixture_checkpoints)
    with pytest.raises(ValueError, match="steps must be at least 1"):
        SupercondScheduleSigmas.execute(fam.model, 0, "trailing", False, "as_scheduled", 136.0)
    with pytest.raises(ValueError, match="strength must be between 0 and 1"):
        nc(fam.model, -0.5)
    with pytest.raises(ValueError, match="offset must be >= 0"):
        SupercondOffsetNoise.execute(1, -0.1, 0, 0.3)
    with pytest.raises(ValueError, match="b must be > 0"):
        es(fam.model, 0.0)
    assert "b is -1.0: it must be between 0.5 and 2.0" in SupercondEpsilonScaling.validate_inputs(b=-1.0, k=0.0)
    assert "reaches" in SupercondEpsilonScaling.validate_inputs(b=0.5, k=-0.6)
    assert SupercondEpsilonScaling.validate_inputs(b=1.005, k=0.0) is True
    with pytest.raises(ValueError, match="not above the second sigma"):
        SupercondScheduleSigmas.execute(fam.model, 10, "trailing", False, "set", 1.0)

    class Cosmos(cms.COSMOS_RFLOW, cms.ModelSamplingDiscrete):
        pass

    odd = fam.model.clone()
    odd.add_object_patch("model_sampling", Cosmos())
    for call in (lambda: nc(odd), lambda: es(odd),
                 lambda: SupercondScheduleSigmas.execute(odd, 4, "trailing", False, "as_scheduled", 136.0)):
        with pytest.raises(ValueError, match="cannot serve it"):
            call()


def test_epsilon_scaling_follows_the_sampling_settings_of_each_clone(comfy):
    """One wrapper object serves every clone of the patched MODEL; a clone with another flow shift must get
    the times of its own schedule, not those the first clone cached (issue 16's shared-state review)."""
    import comfy.model_sampling as cms

    from supercond.nodes.schedules.hook import EpsilonScaling

    class Flow(cms.ModelSamplingDiscreteFlow, cms.CONST):
        pass

    shifted, plain = Flow(), Flow()
    shifted.set_parameters(shift=3.0)
    plain.set_parameters(shift=1.0)
    shared = EpsilonScaling(k=0.01, b=1.0)
    assert shared.lam(shifted, 0.5) != pytest.approx(EpsilonScaling(k=0.01, b=1.0).lam(plain, 0.5))
    assert shared.lam(plain, 0.5) == pytest.approx(EpsilonScaling(k=0.01, b=1.0).lam(plain, 0.5), abs=1e-9)
