"""Conditioning perturbation inside the real ComfyUI (in-process): real loaders, real KSampler,
on the eps, v-prediction and flow fixtures."""

from __future__ import annotations

import math

import pytest
import torch
from comfy_helpers import cads, cep

pytestmark = pytest.mark.comfy


def static(conditioning, **kw):
    from supercond.nodes.perturb.nodes import SupercondPerturbConditioning

    args = dict(gamma=1.0, distribution="uniform", scale="paper", apply_to="tokens", seed=3) | kw
    return SupercondPerturbConditioning.execute(conditioning, **args).result[0]


def test_gamma_zero_is_bit_identical_and_gamma_one_is_not(fam, conds):
    from comfy_helpers import sample

    pos, neg = conds
    plain = sample(fam, fam.model, pos, neg)
    assert torch.equal(sample(fam, cep(fam.model, gamma=0.0), pos, neg), plain)
    assert torch.equal(sample(fam, fam.model, static(pos, gamma=0.0), neg), plain)
    assert not torch.equal(sample(fam, cep(fam.model, gamma=1.0), pos, neg), plain)
    assert not torch.equal(sample(fam, fam.model, static(pos, gamma=1.0), neg), plain)
    assert not torch.equal(sample(fam, cads(fam.model), pos, neg), plain)


def test_same_seed_same_image_without_touching_the_global_rng(fam, conds):
    from comfy_helpers import sample

    pos, neg = conds
    patched = cep(fam.model, distribution="gaussian")
    first = sample(fam, patched, pos, neg, seed=5)
    rng_after_patched = torch.get_rng_state()
    assert torch.equal(sample(fam, patched, pos, neg, seed=5), first)
    assert not torch.equal(sample(fam, patched, pos, neg, seed=6), first)
    sample(fam, fam.model, pos, neg, seed=5)
    assert torch.equal(torch.get_rng_state(), rng_after_patched), "the perturbation consumed global RNG"
    c = cads(fam.model)
    assert torch.equal(sample(fam, c, pos, neg, seed=5), sample(fam, c, pos, neg, seed=5))


def test_rows_get_distinct_noise_of_the_declared_distribution_and_scale(fam, conds):
    from comfy_helpers import CondRecorder, sample

    pos, neg = conds
    gamma = 2.0
    rec = CondRecorder()
    sample(fam, rec.install(cep(fam.model, gamma=gamma)), pos, neg, batch=3)
    clean = pos[0][0]
    for call in rec.calls:
        tokens = call[0]["c_crossattn"].cpu().float()
        assert tokens.shape[0] == 3
        delta = tokens - clean.float()
        active = clean[0] != 0
        d = active.sum(dim=-1, keepdim=True).float()  # the token's non-padding width
        bound = gamma / torch.sqrt(d)
        assert torch.all(delta.abs() <= bound * (1 + 1e-4) + 1e-6)
        assert torch.all(delta[:, ~active] == 0), "padding was perturbed"
        ratio = (delta.abs() / bound)[:, active]
        assert ratio.mean().item() == pytest.approx(0.5, abs=0.02)  # |U(-1, 1)| has mean 1/2
        assert not torch.allclose(delta[0], delta[1]) and not torch.allclose(delta[1], delta[2])
        # the negative (empty prompt) is untouched by default
        assert torch.equal(call[1]["c_crossattn"][:1].cpu(), neg[0][0])
    # every_step draws anew per model call
    assert not torch.equal(rec.calls[0][0]["c_crossattn"], rec.calls[1][0]["c_crossattn"])


def test_once_per_run_holds_one_draw_and_branch_both_reaches_the_negative(fam, conds):
    from comfy_helpers import CondRecorder, sample

    pos, neg = conds
    rec = CondRecorder()
    sample(fam, rec.install(cep(fam.model, resample="once_per_run", branch="both")), pos, neg)
    first = rec.calls[0]
    for call in rec.calls[1:]:
        assert torch.equal(call[0]["c_crossattn"], first[0]["c_crossattn"])
    assert not torch.equal(first[1]["c_crossattn"][:1].cpu(), neg[0][0])


def expected_time(fam, sigma: float, sample_sigmas: list[float]) -> float:
    """The sampling time by an independent route: the discrete timestep / 999, or for flow
    models the inverse of the SD3 shift (sigma = s t / (1 + (s - 1) t))."""
    ms = fam.model.get_model_object("model_sampling")
    if fam.name == "flow":
        s = ms.shift
        return sigma / (s - (s - 1) * sigma)
    return float(ms.timestep(torch.tensor(sigma))) / 999.0


@pytest.mark.parametrize("time_base", ["sigma", "step"])
def test_cads_g_of_t_matches_the_formula_at_every_step(fam, conds, time_base):
    """With s = 0 and psi = 0, CADS scales the embedding by exactly sqrt(g(t))."""
    from comfy_helpers import CondRecorder, sample

    from supercond.core.perturb import cads_gamma

    pos, neg = conds
    tau1, tau2 = 0.3, 0.8
    rec = CondRecorder()
    steps = 10
    sample(fam, rec.install(cads(fam.model, tau1=tau1, tau2=tau2, noise_scale=0.0, psi=0.0, time_base=time_base)),
           pos, neg, steps=steps)
    clean = pos[0][0].float()
    sigmas = [c["sigma"] for c in rec.calls]
    seen = set()
    for i, call in enumerate(rec.calls):
        t = expected_time(fam, call["sigma"], sigmas) if time_base == "sigma" else 1 - i / steps
        g = cads_gamma(t, tau1, tau2)
        tokens = call[0]["c_crossattn"][:1].cpu().float()
        mask = clean != 0
        measured = (tokens[mask] / clean[mask]).mean().item()
        assert measured == pytest.approx(math.sqrt(g), abs=2e-3), (i, t, g)
        seen.add("clean" if g == 1 else "zero" if g == 0 else "between")
    assert seen == {"clean", "zero", "between"}, "the schedule should cross both thresholds in 10 steps"


def test_cads_composes_with_stock_rescale_cfg(fam, conds):
    from comfy_extras.nodes_model_advanced import RescaleCFG
    from comfy_helpers import sample

    pos, neg = conds
    (rescaled,) = RescaleCFG().patch(cads(fam.model), 0.7)
    out = sample(fam, rescaled, pos, neg)
    assert torch.isfinite(out).all()
    assert not torch.equal(out, sample(fam, cads(fam.model), pos, neg))


def test_static_node_perturbs_pooled_and_leaves_the_rest(fam, conds):
    pos, _ = conds
    out = static(pos, apply_to="both")
    assert not torch.equal(out[0][0], pos[0][0])
    assert not torch.equal(out[0][1]["pooled_output"], pos[0][1]["pooled_output"])
    assert set(out[0][1]) == set(pos[0][1])
    assert torch.equal(static(pos, seed=9)[0][0], static(pos, seed=9)[0][0])


def test_sdxl_size_embeddings_and_other_keys_are_never_touched(comfy):
    """SDXL's y is pooled (1280) + six 256-wide size/crop embeddings: only the pooled part moves."""
    import comfy.conds

    from supercond.core.perturb import apply_cep
    from supercond.core.seeds import seeded_generator
    from supercond.nodes.perturb.hook import perturb_entry

    tokens = torch.randn(1, 77, 2048)
    y = torch.randn(1, 2816)
    mask = torch.ones(1, 77)
    entry = {
        "model_conds": {"c_crossattn": comfy.conds.CONDCrossAttn(tokens), "y": comfy.conds.CONDRegular(y),
                        "attention_mask": comfy.conds.CONDRegular(mask)},
        "pooled_output": y[:, :1280], "guidance": 3.5,
    }
    out = perturb_entry(entry, "both", 2, lambda t, part: apply_cep(t, 1.0, "uniform", "paper", seeded_generator(part)))
    new_y = out["model_conds"]["y"].cond
    assert new_y.shape == (2, 2816)
    assert torch.equal(new_y[:, 1280:], y.expand(2, -1)[:, 1280:])
    assert not torch.equal(new_y[:, :1280], y.expand(2, -1)[:, :1280])
    assert out["model_conds"]["attention_mask"] is entry["model_conds"]["attention_mask"]
    assert out["guidance"] == 3.5
    assert entry["model_conds"]["c_crossattn"].cond is tokens, "the input entry was mutated"


def test_bad_inputs_get_clear_messages(fam, conds):
    from supercond.nodes.errors import InputError
    from supercond.nodes.perturb.nodes import SupercondCADS

    pos, neg = conds
    bad = [[pos[0][0].clone(), dict(pos[0][1])]]
    bad[0][0][0, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        static(bad)
    with pytest.raises(ValueError, match="expected token embeddings"):
        static([[pos[0][0][0], {}]])
    with pytest.raises(ValueError, match="gamma must be"):
        static(pos, gamma=-1.0)
    assert "tau1" in SupercondCADS.validate_inputs(tau1=0.9, tau2=0.6)
    with pytest.raises(ValueError, match="tau1 must be smaller"):
        cads(fam.model, tau1=0.9, tau2=0.6)
    with pytest.raises(InputError, match="expected a ComfyUI MODEL"):
        cep("not a model")
    if fam.name != "flow":  # SD1.x has no pooled input: the patch refuses apply_to=pooled when it is made
        with pytest.raises(InputError, match="SD1.x models take no pooled text embedding"):
            cep(fam.model, apply_to="pooled")


@pytest.mark.parametrize("fam", ["eps"], indirect=True)
def test_clones_sampled_at_once_in_two_threads_keep_their_own_run(fam, conds):
    """Clones of one patched MODEL share its hook object: a run's seed and call count must live with
    that run, not on the hook (issue 16), or two samplings at once (another pack's threads) mix them.
    A wrapper holds both runs in lockstep at every model call, then each image must be its serial one."""
    import threading

    import comfy.model_management as mm
    import comfy.patcher_extension as pe
    from comfy_helpers import sample

    pos, neg = conds
    patched = cep(fam.model, gamma=1.0, distribution="gaussian")
    mm.load_models_gpu([patched])
    alone = {seed: sample(fam, patched.clone(), pos, neg, seed=seed) for seed in (5, 6)}
    lockstep = threading.Barrier(2, timeout=60)

    def in_step(executor, *args, **kwargs):
        lockstep.wait()
        return executor(*args, **kwargs)

    got, errors = {}, []

    def one(seed):
        try:
            clone = patched.clone()
            clone.add_wrapper_with_key(pe.WrappersMP.CALC_COND_BATCH, "another.pack", in_step)
            got[seed] = sample(fam, clone, pos, neg, seed=seed)
        except Exception as e:  # reported below, with the thread's error
            lockstep.abort()
            errors.append(e)

    threads = [threading.Thread(target=one, args=(s,)) for s in alone]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for seed, image in alone.items():
        assert torch.equal(got[seed], image), f"seed {seed}: another run's state leaked in"


@pytest.mark.parametrize("scale", ["paper", "relative"])
@pytest.mark.parametrize("distribution", ["uniform", "gaussian"])
def test_the_plotted_cep_ratio_is_what_the_hook_applies_on_sdxl_widths(comfy, scale, distribution):
    """SupercondPlotPerturbation's CEP curve is the noise the hook draws: on an SDXL-shaped embedding
    (CLIP-L 768 | CLIP-G 1280, the segments at different RMS, padding in part of one) the plotted ratio
    matches the measured RMS of core.perturb.cep_delta over the embedding's, non-padding entries both; the
    old one-width formula (gamma / sqrt(2048)) is off by far more than the tolerance."""
    from supercond.core import perturb
    from supercond.nodes.perturb.hook import CEPConfig
    from supercond.nodes.perturb.nodes import cep_noise_to_signal

    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 77, 2048, generator=g)
    tokens[..., :768] *= 0.3
    tokens[:, 30:, 768:] = 0  # padding in the CLIP-G part of most tokens
    cfg = CEPConfig(1.0, distribution, scale, "tokens", "both", "every_step")
    plotted = cep_noise_to_signal(cfg, tokens, (768, 1280))
    delta = perturb.cep_delta(tokens, 1.0, distribution, scale, g, (768, 1280))
    keep = tokens != 0
    measured = float(delta[keep].pow(2).mean().sqrt() / tokens[keep].pow(2).mean().sqrt())
    assert plotted == pytest.approx(measured, rel=0.02)
    rms = float(tokens[keep].pow(2).mean().sqrt())
    old = 1.0 / math.sqrt(2048) * (rms if scale == "relative" else 1.0) / (math.sqrt(3) if distribution == "uniform"
                                                                            else 1.0) / rms
    assert abs(old / measured - 1) > 0.2, old / measured
