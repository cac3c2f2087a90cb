"""SupercondTrainHead inside the real ComfyUI (in-process) on the SD1.x fixture.

Predictions are read through the stock sampler: a CFGGuider run of one Euler step from sigma to 0
with zero noise returns exactly the guided denoised prediction at the state given as the latent,
so the errors below are measured on what a sampler actually gets, single-pass (SupercondSinglePass
with the trained head) against two-pass CFG with the empty prompt.
"""

from __future__ import annotations

import logging

import pytest
import torch

pytestmark = pytest.mark.comfy
log = logging.getLogger("supercond.test")

SIZE = 8            # latent side: 64 px
SCALES = (3.0, 6.0, 9.0)
HELD_OUT_SEED = 991


@pytest.fixture(scope="module")
def fam(comfy, fixture_checkpoints):
    from comfy_helpers import load_family

    return load_family("eps", fixture_checkpoints)


@pytest.fixture(scope="module")
def heads_dir(comfy, tmp_path_factory):
    """A private supercond_heads folder for this module (restored afterwards)."""
    d = tmp_path_factory.mktemp("heads")
    saved = comfy.folder_names_and_paths.get("supercond_heads")
    comfy.folder_names_and_paths["supercond_heads"] = ([str(d)], set(comfy.supported_pt_extensions) | {".safetensors"})
    yield d
    if saved is not None:
        comfy.folder_names_and_paths["supercond_heads"] = saved


@pytest.fixture(scope="module")
def prompts(fam):
    from comfy_helpers import encode

    return encode(fam, "a red cube on a table"), encode(fam, "")


def train(fam, positive, negative=None, latent=None, **kw):
    from supercond.nodes.train.head import SupercondTrainHead

    args = dict(mode="distill", steps=4, learning_rate=1e-3, head="projection", lora_rank=0, cfg_min=3.0,
                cfg_max=9.0, seed=0, save_every=0, filename_prefix="t/head", resume=False) | kw
    return SupercondTrainHead.execute(fam.model, positive, negative=negative, latent=latent, **args)


def empty_latent(n=4, size=SIZE):
    return {"samples": torch.zeros(n, 4, size, size)}


def single_pass(model):
    from supercond.nodes.singlepass.nodes import SupercondSinglePass

    return SupercondSinglePass.execute(model, 0, "head").result[0]


def guided_x0(model, x, sigma, pos, neg, cfg):
    """The guided denoised prediction a sampler gets at state ``x`` (model space) and ``sigma``."""
    import comfy.samplers

    lf = model.model.latent_format
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(pos, neg)
    guider.set_cfg(cfg)
    sigmas = torch.tensor([float(sigma), 0.0])
    out = guider.sample(torch.zeros_like(x), lf.process_out(x), comfy.samplers.sampler_object("euler"), sigmas,
                        disable_pbar=True, seed=0)
    return lf.process_in(out)


def held_out_states(fam, pos, neg, n=2, steps=10, scale=6.0):
    """States of a held-out two-pass CFG trajectory (Euler, normal schedule) from seeded noise."""
    import comfy.samplers

    ms = fam.model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, "normal", steps).float()
    g = torch.Generator().manual_seed(HELD_OUT_SEED)
    x = torch.randn(n, 4, SIZE, SIZE, generator=g) * torch.sqrt(1 + sigmas[0] ** 2)
    states = []
    for i in range(steps):
        states.append((x.clone(), float(sigmas[i])))
        d = guided_x0(fam.model, x, sigmas[i], pos, neg, scale)
        x = x + (x - d) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    return states


def errors(fam, trained, states, pos, neg):
    """Per held-out sigma: rel_delta and rel_guided at each scale (core.head_objective.guidance_errors)."""
    from supercond.core.head_objective import guidance_errors

    sp = single_pass(trained)
    rows = []
    for x, sigma in states:
        c = guided_x0(fam.model, x, sigma, pos, neg, 1.0)
        u = guided_x0(fam.model, x, sigma, pos, neg, 0.0)      # cfg 0: the uncond prediction itself
        u_hat = guided_x0(sp, x, sigma, pos, neg, 0.0)         # the head's
        rows.append((sigma, {s: guidance_errors(c, u, u_hat, s) for s in SCALES}))
    return rows


@pytest.fixture(scope="module")
def distilled(fam, prompts, heads_dir):
    """A last_block head with a rank-8 LoRA, distilled on the teacher's own CFG trajectories (an empty 64 px
    LATENT sets their size and number)."""
    pos, neg = prompts
    before = {k: v.clone() for k, v in fam.model.model.diffusion_model.state_dict().items()}
    model, path, plot = train(fam, pos, neg, empty_latent(), steps=120, learning_rate=1e-4, head="last_block",
                              lora_rank=8,
                              filename_prefix="distill/head").result
    return model, path, plot, before


def test_distillation_lowers_the_single_pass_error_well_below_the_fresh_head(fam, prompts, distilled):
    from supercond.nodes.singlepass.nodes import SupercondNewHead

    pos, neg = prompts
    model = distilled[0]
    states = held_out_states(fam, pos, neg)[::3]  # 4 sigmas from 14.6 down to the last states
    fresh = errors(fam, SupercondNewHead.execute(fam.model, "last_block").result[0], states, pos, neg)
    trained = errors(fam, model, states, pos, neg)
    lines = ["sigma    scale  fresh rel_delta  trained rel_delta  fresh rel_guided  trained rel_guided"]
    for (sigma, f), (_, t) in zip(fresh, trained, strict=True):
        for s in SCALES:
            lines.append(f"{sigma:7.3f}  {s:4.1f}  {f[s]['rel_delta']:15.4f}  {t[s]['rel_delta']:17.4f}  "
                         f"{f[s]['rel_guided']:16.4f}  {t[s]['rel_guided']:18.4f}")
    log.warning("distillation, held-out two-pass CFG trajectory states:\n%s", "\n".join(lines))
    for (_, f), (sigma, t) in zip(fresh, trained, strict=True):
        assert f[3.0]["rel_delta"] == pytest.approx(1.0, abs=1e-4)  # a fresh head predicts u_hat = c
        for s in SCALES:  # trained/fresh of rel_guided is rel_delta at every scale: (s-1) cancels
            assert t[s]["rel_guided"] < f[s]["rel_guided"] + 1e-6, (sigma, s, t[s], f[s])
    # Where guidance moves the sample most (the noisiest half), and on average over all sigmas:
    high = [t[3.0]["rel_delta"] for sigma, t in trained if sigma > 1.0]
    mean = sum(t[3.0]["rel_delta"] for _, t in trained) / len(trained)
    assert max(high) < 0.5 and mean < 0.5, (high, mean)
    for s in SCALES:  # the guided error summed over the held-out states, per scale
        assert sum(t[s]["rel_guided"] for _, t in trained) < 0.5 * sum(f[s]["rel_guided"] for _, f in fresh)


NEGATIVES = "a blue sphere\na green cone on grass\na dark room\nblurry, low quality"
HELD_OUT_NEGATIVE = "a yellow ring on a wooden shelf"


@pytest.fixture(scope="module")
def reads_negatives(fam, prompts, heads_dir):
    """A head like the distilled fixture's (half the steps at twice the rate), reading each sample's negative
    from a pool."""
    pos, neg = prompts
    return train(fam, pos, neg, empty_latent(), steps=60, learning_rate=2e-4, head="last_block", lora_rank=8,
                 filename_prefix="neg/head", negative_prompts=NEGATIVES, clip=fam.clip).result


def test_a_negative_reading_head_follows_the_wired_negative_in_one_call(fam, prompts, distilled, reads_negatives):
    """With negative = head the wired negative reaches a negative-reading head (two negatives, two images, one
    model call per step), not an empty-only head (the same image); against two-pass CFG with a negative that
    was not in the pool, the negative-reading head's guidance error is below the empty-only head's."""
    import comfy.utils
    from comfy_helpers import encode, sample

    from supercond.nodes.singlepass.nodes import SupercondLoadHead

    pos, _ = prompts
    model, path, _ = reads_negatives
    meta = comfy.utils.safetensors_header(path, max_size=1 << 20)
    assert b'"reads_negative":"true"' in meta
    a, b = encode(fam, "a blue sphere"), encode(fam, "a dark room")
    calls = []
    net = fam.model.model.diffusion_model
    handle = net.register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape[0]))
    try:
        ia, ib = (sample(fam, single_pass(model), pos, n, cfg=6.0, steps=3) for n in (a, b))
    finally:
        handle.remove()
    assert calls == [1] * 6 and not torch.equal(ia, ib)
    empty_only = single_pass(distilled[0])
    assert torch.equal(sample(fam, empty_only, pos, a, cfg=6.0, steps=3),
                       sample(fam, empty_only, pos, b, cfg=6.0, steps=3))
    loaded = SupercondLoadHead.execute(fam.model, "neg/head_000060.safetensors").result[0]
    assert torch.equal(sample(fam, single_pass(loaded), pos, b, cfg=6.0, steps=3), ib)  # the file reads them too
    held = encode(fam, HELD_OUT_NEGATIVE)
    states = held_out_states(fam, pos, held)[::3]
    mean = {}
    for name, m in (("reads negatives", model), ("empty only", distilled[0])):
        rows = errors(fam, m, states, pos, held)
        mean[name] = sum(r[6.0]["rel_guided"] for _, r in rows) / len(rows)
    log.warning("held-out negative %r, mean rel_guided at cfg 6: %s", HELD_OUT_NEGATIVE, mean)
    assert mean["reads negatives"] < mean["empty only"], mean


def test_the_conditional_path_and_the_base_weights_are_unchanged(fam, prompts, distilled):
    import comfy.patcher_extension as pe

    pos, neg = prompts
    model, _, _, before = distilled
    after = fam.model.model.diffusion_model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    seen = []

    def record(executor, model_, conds, x_in, timestep, model_options):
        out = executor(model_, conds, x_in, timestep, model_options)
        seen.append(out[0].clone())
        return out

    # The base model at cfg 1 runs the cond alone (batch 1), like single-pass: the same kernels, so bit for bit.
    for m, cfg in ((fam.model, 1.0), (single_pass(model), 6.0)):
        m = m.clone()
        m.add_wrapper_with_key(pe.WrappersMP.CALC_COND_BATCH, "supercond.test.cond", record)
        x = torch.randn(1, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(3)) * 2.0
        guided_x0(m, x, 1.5, pos, neg, cfg)
    base_cond, single_cond = seen
    assert torch.equal(base_cond, single_cond), "the conditional prediction changed"
    # Attached but not sampled through SinglePass, the trained MODEL is the base model, bit for bit.
    x = torch.randn(1, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(4)) * 3.0
    assert torch.equal(guided_x0(model, x, 3.0, pos, neg, 6.0), guided_x0(fam.model, x, 3.0, pos, neg, 6.0))


def test_saved_head_loads_with_load_head_and_reproduces_the_trained_model(fam, prompts, distilled, heads_dir):
    from pathlib import Path

    from supercond.nodes.singlepass.nodes import SupercondLoadHead

    pos, neg = prompts
    model, path, plot, _ = distilled
    assert plot.shape[0] == 1 and plot.shape[-1] == 3
    name = Path(path).relative_to(heads_dir).as_posix()
    assert name == "distill/head_000120.safetensors"
    loaded = SupercondLoadHead.execute(fam.model, name).result[0]
    x = torch.randn(2, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(5)) * 4.0
    for sigma in (8.0, 1.0):
        a = guided_x0(single_pass(model), x, sigma, pos, neg, 7.0)
        b = guided_x0(single_pass(loaded), x, sigma, pos, neg, 7.0)
        assert torch.equal(a, b)


def test_resume_continues_exactly_where_a_straight_run_would_be(fam, prompts, heads_dir, monkeypatch):
    """6 steps == 3 steps (cancelled), then resume to 6: the same head bit for bit (deterministic CPU run; the
    trajectory pool, the optimizer and the step travel in the .state.pt). The learning rate's cosine is
    stretched over `steps`, so the first run must have been asked for 6 steps too."""
    import comfy.model_management as mm
    import comfy.utils

    pos, neg = prompts
    straight = train(fam, pos, neg, empty_latent(), steps=6, filename_prefix="r/straight").result[1]

    def interrupt(value, total, preview, node_id=None):
        if value >= 3:
            raise mm.InterruptProcessingException()

    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", interrupt)
    with pytest.raises(mm.InterruptProcessingException):
        train(fam, pos, neg, empty_latent(), steps=6, filename_prefix="r/resumed")
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", None)
    resumed = train(fam, pos, neg, empty_latent(), steps=6, filename_prefix="r/resumed", resume=True).result[1]
    assert resumed.endswith("resumed_000006.safetensors")
    a, b = comfy.utils.load_torch_file(straight), comfy.utils.load_torch_file(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cancel_keeps_a_loadable_head(fam, prompts, heads_dir, monkeypatch):
    import comfy.model_management as mm
    import comfy.utils

    from supercond.nodes.singlepass.nodes import SupercondLoadHead

    pos, neg = prompts

    def interrupt(value, total, preview, node_id=None):  # what ComfyUI's hook does after POST /interrupt
        if value >= 2:
            raise mm.InterruptProcessingException()

    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", interrupt)
    with pytest.raises(mm.InterruptProcessingException):
        train(fam, pos, neg, empty_latent(), steps=5, filename_prefix="c/head")
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", None)
    assert (heads_dir / "c" / "head_000002.safetensors").exists() and (heads_dir / "c" / "head_000002.state.pt").exists()
    assert not list((heads_dir / "c").glob(".tmp_*"))
    loaded = SupercondLoadHead.execute(fam.model, "c/head_000002.safetensors").result[0]
    x = torch.randn(1, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(6)) * 2.0
    assert torch.isfinite(guided_x0(single_pass(loaded), x, 2.0, pos, neg, 5.0)).all()


CAPTIONS = ("a red cube", "a blue sphere", "a green cone", "a yellow ring")


@pytest.fixture(scope="module")
def gist_data(fam):
    from comfy_helpers import encode

    conds = [entry for text in CAPTIONS for entry in encode(fam, text)]  # one caption per latent
    latents = torch.randn(4, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(8))
    return latents, conds


def rolled_at_step0(seed, n=4):
    """The batch order and rolled mask of step 0, drawn as core.head_train draws them."""
    from supercond.core import head_objective as ho
    from supercond.core import head_train as ht
    from supercond.core.seeds import seeded_generator

    idx = ht.epoch_indices(n, n, 0, seed)
    _, rolled = ho.swap_captions(torch.arange(n), torch.arange(n), ho.GIST_FRACTION,
                                 seeded_generator(seed, ht._DRAW, 0))
    return idx, rolled


def gist_head(fam, conds, latents, seed, prefix):
    import comfy.utils

    path = train(fam, conds, latent={"samples": latents}, mode="gist", steps=1, seed=seed,
                 filename_prefix=prefix).result[1]
    return comfy.utils.load_torch_file(path)


def test_gist_trains_the_head_only_from_rolled_samples(fam, gist_data, heads_dir):
    """One gist step: with no rolled sample the head does not move; with one, it moves, and changing the
    images of the non-rolled samples (whose conditional term is all they feed) leaves it bit-identical,
    while changing the rolled sample's image changes it."""
    from supercond.core.heads import head_state
    from supercond.nodes.singlepass import hook

    latents, conds = gist_data
    seeds = {bool(rolled_at_step0(s)[1].any()): s for s in range(200)}
    fresh = head_state(hook.new_head(fam.model, "projection"))
    none_rolled = gist_head(fam, conds, latents, seeds[False], "g/none")
    assert all(torch.equal(none_rolled[k], fresh[k].float()) for k in fresh)

    seed = seeds[True]
    idx, rolled = rolled_at_step0(seed)
    base = gist_head(fam, conds, latents, seed, "g/base")
    assert not all(torch.equal(base[k], fresh[k].float()) for k in fresh)
    others = latents.clone()
    others[idx[~rolled]] = torch.randn(int((~rolled).sum()), 4, SIZE, SIZE, generator=torch.Generator().manual_seed(9))
    same = gist_head(fam, conds, others, seed, "g/others")
    assert all(torch.equal(base[k], same[k]) for k in base), "non-rolled samples reached the head"
    moved = latents.clone()
    moved[idx[rolled]] = -moved[idx[rolled]]
    changed = gist_head(fam, conds, moved, seed, "g/rolled")
    assert not all(torch.equal(base[k], changed[k]) for k in base)


def test_gist_batch_size_and_rolled_fraction_and_the_head_sample_count(fam, gist_data, heads_dir, caplog):
    """batch_size and rolled_fraction reach the trainer (a batch above the dataset's size is clamped, said in
    the log), and the log counts the samples that taught the head: the swaps core.head_train drew."""
    import logging

    from supercond.core import head_objective as ho
    from supercond.core import head_train as ht
    from supercond.core.seeds import seeded_generator

    latents, conds = gist_data
    with caplog.at_level(logging.INFO, logger="supercond"):
        train(fam, conds, latent={"samples": latents}, mode="gist", steps=3, seed=5, batch_size=16,
              rolled_fraction=0.5)
    ids = torch.tensor([0, 1, 2, 3])  # the four captions differ
    want = sum(int(ho.swap_captions(ids, ids, 0.5, seeded_generator(5, ht._DRAW, s))[1].sum()) for s in range(3))
    assert "gist batch_size 16 is more than the 4 latents: using 4" in caplog.text
    assert f"gist: {want} of 12 samples" in caplog.text and 0 < want < 12


def test_gist_with_one_caption_has_nothing_to_roll(fam, prompts, gist_data, heads_dir):
    latents, _ = gist_data
    with pytest.raises(ValueError, match="gist mode needs at least 2 different captions to swap"):
        train(fam, prompts[0], latent={"samples": latents}, mode="gist")
    with pytest.raises(ValueError, match="gist mode trains on images"):
        train(fam, prompts[0], mode="gist")


@pytest.mark.parametrize("change, message", [
    (dict(steps=0), "steps must be >= 1"),
    (dict(cfg_min=9.0, cfg_max=3.0), "cfg_min <= cfg_max"),
    (dict(filename_prefix="../escape"), "outside the supercond_heads folder"),
    (dict(filename_prefix="/abs/head"), "relative path"),
    (dict(negative=torch.zeros(1, 77, 768)), "negative is not a CONDITIONING"),
    (dict(negative="a prompt"), "negative is not a CONDITIONING"),
    (dict(negative=None), "connect a CLIPTextEncode of an empty prompt"),
])
def test_bad_input_fails_clearly_before_writing_anything(fam, prompts, heads_dir, change, message):
    pos, neg = prompts
    kw = dict(negative=neg, latent=empty_latent(), filename_prefix="bad/head") | change
    with pytest.raises(ValueError, match=message):
        train(fam, pos, **kw)
    assert not list(heads_dir.glob("bad/*"))


def test_cfg_range_is_refused_when_the_prompt_is_queued(comfy):
    from supercond.nodes.train.head import SupercondTrainHead

    assert "must not be larger than cfg_max" in SupercondTrainHead.validate_inputs(cfg_min=9.0, cfg_max=3.0)
    assert SupercondTrainHead.validate_inputs(cfg_min=3.0, cfg_max=3.0) is True


def test_a_head_of_the_other_type_or_a_checkpoint_that_does_not_fit_is_refused(fam, prompts, heads_dir):
    from safetensors import safe_open

    from supercond.core.files import save_atomic
    from supercond.nodes.singlepass.nodes import SupercondNewHead

    pos, neg = prompts
    with_block = SupercondNewHead.execute(fam.model, "last_block").result[0]
    from supercond.nodes.train.head import SupercondTrainHead

    with pytest.raises(ValueError, match="already carries a last_block head"):
        SupercondTrainHead.execute(with_block, pos, "distill", 1, 1e-4, "projection", 0, 3.0, 9.0, 0, 0, "m/x",
                                   False, negative=neg, latent=empty_latent())
    path = train(fam, pos, neg, empty_latent(), steps=1, filename_prefix="m/head").result[1]
    with pytest.raises(ValueError, match="cannot resume from .*does not fit this head"):
        train(fam, pos, neg, empty_latent(), steps=2, head="last_block", filename_prefix="m/head", resume=True)
    with safe_open(path, "pt") as f:  # the same checkpoint, claiming another model family
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    save_atomic(path, tensors, meta | {"family": "SDXL"})
    with pytest.raises(ValueError, match="cannot resume from .*does not fit this model.*family"):
        train(fam, pos, neg, empty_latent(), steps=2, filename_prefix="m/head", resume=True)
    assert sorted(p.name for p in (heads_dir / "m").iterdir()) == ["head_000001.safetensors", "head_000001.state.pt"]


def test_distillation_on_noised_latents_lowers_the_error_too(fam, prompts, gist_data, heads_dir):
    """With a LATENT of images (not an empty one) the states are those images noised at random sigmas."""
    from supercond.nodes.singlepass.nodes import SupercondNewHead

    pos, neg = prompts
    latents, _ = gist_data
    model = train(fam, pos, neg, {"samples": latents}, steps=40, learning_rate=1e-4, filename_prefix="n/head").result[0]
    x0 = fam.model.model.process_latent_in(latents[:2])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(HELD_OUT_SEED))
    states = [(x0 + s * noise, s) for s in (8.0, 2.0, 0.5)]
    fresh = errors(fam, SupercondNewHead.execute(fam.model, "projection").result[0], states, pos, neg)
    trained = errors(fam, model, states, pos, neg)
    got = [t[3.0]["rel_delta"] for _, t in trained]
    log.warning("noised-latent distillation, rel_delta at sigma 8, 2, 0.5: %s", [round(v, 4) for v in got])
    assert all(f[3.0]["rel_delta"] == pytest.approx(1.0, abs=1e-4) for _, f in fresh)
    assert sum(got) / len(got) < 0.8, got


@pytest.mark.parametrize("head", ["projection", "last_block"])
def test_flow_model_heads_train_and_sample(comfy, fixture_checkpoints, heads_dir, head):
    """The SD3 (MMDiT, flow) fixture: the capture points and the head's forward work in training too."""
    from comfy_helpers import encode, load_family

    from supercond.nodes.train.head import SupercondTrainHead

    flow = load_family("flow", fixture_checkpoints)
    pos, neg = encode(flow, "a red cube"), encode(flow, "")
    model, path, _ = SupercondTrainHead.execute(flow.model, pos, "distill", 2, 1e-4, head, 4, 3.0, 9.0, 0, 0,
                                                f"flow/{head}", False, negative=neg,
                                                latent={"samples": torch.zeros(2, 16, SIZE, SIZE)}).result
    assert path.endswith("_000002.safetensors")
    x = torch.randn(1, 16, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    out = guided_x0(single_pass(model), x, 0.7, pos, neg, 4.0)
    assert torch.isfinite(out).all()


@pytest.mark.server
def test_the_server_refuses_a_wrong_negative_link_and_a_bad_cfg_range_with_http_400(client):
    from prompts import find, set_inputs

    from supercond.tools import workflows
    from supercond.tools.server import PromptRejected

    wf = workflows.load(workflows.WORKFLOW_DIR / "singlepass_distill.json")
    prompt = workflows.shrink(workflows.retarget(workflows.to_api(wf, client.object_info())))
    loader = find(prompt, "CheckpointLoaderSimple")
    with pytest.raises(PromptRejected) as err:
        client.queue(set_inputs(prompt, "SupercondTrainHead", negative=[loader, 0]))  # a MODEL, not CONDITIONING
    assert "negative" in str(err.value) and "CONDITIONING" in str(err.value)
    with pytest.raises(PromptRejected) as err:
        client.queue(set_inputs(prompt, "SupercondTrainHead", cfg_min=9.0, cfg_max=3.0))
    assert "cfg_min (9.0) must not be larger than cfg_max (3.0)" in str(err.value)


def test_training_starts_from_the_head_the_model_carries(fam, prompts, distilled, heads_dir):
    import comfy.utils

    from supercond.core.heads import head_state
    from supercond.nodes.singlepass import hook

    pos, neg = prompts
    model, path, _, _ = distilled
    start = comfy.utils.load_torch_file(path)
    after = comfy.utils.load_torch_file(_train_on(model, pos, neg))
    fresh = head_state(hook.new_head(fam.model, "last_block"))
    moved = max(float((after[k] - start[k]).abs().max()) for k in start)
    assert moved <= 2e-8, moved  # one step of lr 1e-8 away from the carried head ...
    assert max(float((start[k] - fresh[k].float()).abs().max()) for k in start) > 1e-4  # ... not from a fresh one


def _train_on(model, pos, neg):
    from supercond.nodes.train.head import SupercondTrainHead

    return SupercondTrainHead.execute(model, pos, "distill", 1, 1e-8, "last_block", 0, 3.0, 9.0, 0, 0, "s/head", False,
                                      negative=neg, latent=empty_latent()).result[1]


# -- gist with a LoRA on the model: seed 003 in full ------------------------------------------------
RANK = 4


@pytest.fixture(scope="module")
def loras_dir(comfy, tmp_path_factory):
    """A private loras folder for this module (restored afterwards)."""
    d = tmp_path_factory.mktemp("loras")
    saved = comfy.folder_names_and_paths.get("loras")
    comfy.folder_names_and_paths["loras"] = ([str(d)], set(comfy.supported_pt_extensions))
    yield d
    if saved is not None:
        comfy.folder_names_and_paths["loras"] = saved


def gist_lora(fam, conds, latents, seed, prefix, steps=1, **kw):
    """(output MODEL, head path, saved head tensors, saved LoRA tensors) of a gist run with a LoRA on the model."""
    import comfy.utils
    import folder_paths

    model, path, _ = train(fam, conds, latent={"samples": latents}, mode="gist", lora_rank=RANK, steps=steps,
                           seed=seed, filename_prefix=prefix, **kw).result
    lora = f"{folder_paths.get_folder_paths('loras')[0]}/{prefix}_{steps:06d}.safetensors"
    return model, path, comfy.utils.load_torch_file(path), comfy.utils.load_torch_file(lora)


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gist_with_a_model_lora_trains_the_cond_output_on_non_rolled_samples_and_the_head_on_rolled_ones(
        fam, prompts, gist_data, heads_dir, loras_dir):
    """One step each, exact: with no rolled sample the model's LoRA learns (the cond output moves) and the head
    stays bit-identical; with a rolled sample the head learns, from the rolled samples only (other images for
    the non-rolled ones: the same head, another LoRA), and a rolled sample's image changes both."""
    from supercond.core.heads import head_state
    from supercond.nodes import family as fm
    from supercond.nodes.singlepass import hook

    latents, conds = gist_data
    pos, neg = prompts
    seeds = {bool(rolled_at_step0(s)[1].any()): s for s in range(200)}
    fresh = {k: v.float() for k, v in head_state(hook.new_head(fam.model, "projection")).items()}

    shared = list(fam.model.model.diffusion_model.parameters())  # every clone's: put back after training
    model, _, head, lora = gist_lora(fam, conds, latents, seeds[False], "gl/none")
    assert all(a is b for a, b in zip(shared, fam.model.model.diffusion_model.parameters(), strict=True))
    assert same(head, fresh), "the head moved without a rolled sample"
    assert {k.split(".")[0] for k in lora} == set(fm.lora_layers(fam.model, "test"))  # SupercondTrainLoRA's layers
    assert max(float(v.abs().max()) for k, v in lora.items() if k.endswith("lora_up.weight")) > 0
    x = torch.randn(1, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(11)) * 2.0
    assert not torch.equal(guided_x0(model, x, 2.0, pos, neg, 1.0), guided_x0(fam.model, x, 2.0, pos, neg, 1.0))

    seed = seeds[True]
    idx, rolled = rolled_at_step0(seed)
    _, _, base_head, base_lora = gist_lora(fam, conds, latents, seed, "gl/base")
    assert not same(base_head, fresh)
    others = latents.clone()
    others[idx[~rolled]] = torch.randn(int((~rolled).sum()), 4, SIZE, SIZE, generator=torch.Generator().manual_seed(9))
    _, _, o_head, o_lora = gist_lora(fam, conds, others, seed, "gl/others")
    assert same(o_head, base_head), "non-rolled samples reached the head"
    assert not same(o_lora, base_lora), "non-rolled samples did not train the model's LoRA"
    moved = latents.clone()
    moved[idx[rolled]] = -moved[idx[rolled]]
    _, _, m_head, m_lora = gist_lora(fam, conds, moved, seed, "gl/rolled")
    assert not same(m_head, base_head)
    # A rolled sample's cond output is not supervised: only the head's loss, through features that keep their
    # graph, brings it to the model's LoRA (detached features would leave this LoRA bit-identical).
    assert not same(m_lora, base_lora), "the head's loss did not reach the model's LoRA"


def test_gist_lora_loads_with_lora_loader_and_load_head_and_reproduces_the_output_model(
        fam, prompts, gist_data, heads_dir, loras_dir):
    """The LoRA is saved in fp16 and the output MODEL is built from those same fp16 tensors, so the stock
    LoraLoader + SupercondLoadHead give the same guided prediction bit for bit (no tolerance)."""
    from pathlib import Path

    import nodes
    from safetensors import safe_open

    from supercond.nodes.singlepass.nodes import SupercondLoadHead

    latents, conds = gist_data
    pos, neg = prompts
    model, path, _, lora = gist_lora(fam, conds, latents, 1, "gs/gist", steps=2, learning_rate=1e-3)
    head_name = Path(path).relative_to(heads_dir).as_posix()
    assert head_name == "gs/gist_000002.safetensors" and (heads_dir / "gs" / "gist_000002.state.pt").exists()
    lora_file = loras_dir / "gs" / "gist_000002.safetensors"
    assert all(v.dtype == torch.float16 for v in lora.values())
    with safe_open(lora_file, "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == str(RANK) and float(meta["ss_network_alpha"]) == RANK
    assert not list(loras_dir.rglob(".tmp_*")) and not list(heads_dir.rglob(".tmp_*"))
    loaded = nodes.LoraLoader().load_lora(fam.model, fam.clip, "gs/gist_000002.safetensors", 1.0, 0.0)[0]
    loaded = SupercondLoadHead.execute(loaded, head_name).result[0]
    x = torch.randn(2, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(12)) * 4.0
    for sigma in (8.0, 1.0):
        a = guided_x0(single_pass(model), x, sigma, pos, neg, 7.0)
        b = guided_x0(single_pass(loaded), x, sigma, pos, neg, 7.0)
        assert torch.equal(a, b)
        assert not torch.equal(a, guided_x0(fam.model, x, sigma, pos, neg, 7.0))


def test_gist_lora_resume_continues_exactly_where_a_straight_run_would_be(fam, gist_data, heads_dir, loras_dir,
                                                                          monkeypatch):
    """4 steps == 2 steps (cancelled), then resume to 4: the same head and the same LoRA of the model, bit for
    bit (deterministic CPU run; the model's LoRA and its optimizer state travel in the head's .state.pt)."""
    import comfy.model_management as mm
    import comfy.utils

    latents, conds = gist_data
    _, _, head, lora = gist_lora(fam, conds, latents, 1, "gr/straight", steps=4, learning_rate=1e-3)

    def interrupt(value, total, preview, node_id=None):
        if value >= 2:
            raise mm.InterruptProcessingException()

    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", interrupt)
    with pytest.raises(mm.InterruptProcessingException):
        gist_lora(fam, conds, latents, 1, "gr/resumed", steps=4, learning_rate=1e-3)
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", None)
    assert (loras_dir / "gr" / "resumed_000002.safetensors").exists()
    _, path, r_head, r_lora = gist_lora(fam, conds, latents, 1, "gr/resumed", steps=4, learning_rate=1e-3,
                                       resume=True)
    assert path.endswith("resumed_000004.safetensors")
    assert same(head, r_head) and same(lora, r_lora)
    with pytest.raises(ValueError, match="does not fit this run's LoRA of the model"):  # a head-only state
        train(fam, conds, latent={"samples": latents}, mode="gist", lora_rank=0, steps=6, seed=1,
              filename_prefix="gr/resumed", resume=True)


def test_gist_with_lora_rank_0_keeps_the_model_frozen(fam, prompts, gist_data, heads_dir, loras_dir):
    latents, conds = gist_data
    pos, neg = prompts
    model = train(fam, conds, latent={"samples": latents}, mode="gist", steps=1, seed=1,
                  filename_prefix="g0/head").result[0]
    assert not (loras_dir / "g0").exists()
    x = torch.randn(1, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(13)) * 3.0
    assert torch.equal(guided_x0(model, x, 3.0, pos, neg, 6.0), guided_x0(fam.model, x, 3.0, pos, neg, 6.0))
