"""The capability x family matrix, inside the real ComfyUI (in-process): every capability on the SDXL,
Flux, Chroma, Qwen-Image and Wan 2.1 fixtures (random weights, real loaders; Flux/Chroma/Qwen/Wan
text from the stand-in encoders of tools/fixture_models, with their encoders' exact layout).
SD1.x and SD3 have their own, deeper modules (test_perturb_comfy, test_schedules_comfy, ...).

Cheap on purpose: 32-64 px, 2-4 steps, each family loaded once per module.
"""

from __future__ import annotations

import pytest
import torch
from comfy_helpers import cads, cep

pytestmark = pytest.mark.comfy

FAMILIES = ("sdxl", "flux", "chroma", "qwen_image", "wan21")
REAL_CFG = ("sdxl", "chroma", "qwen_image", "wan21")  # Flux dev is guidance-distilled: users run it at cfg 1
FLOW = ("flux", "chroma", "qwen_image", "wan21")
PX = 32


# -- fixtures and helpers ----------------------------------------------------------------------------

@pytest.fixture(scope="module", params=FAMILIES)
def fam(request, comfy, models_dir):
    from comfy_helpers import load_model_family

    return load_model_family(request.param, models_dir)


@pytest.fixture(scope="module")
def prompts(fam):
    from comfy_helpers import encode

    return encode(fam, "a red cube on a table"), encode(fam, "")


def empty_latent(fam, batch: int = 1, size: int = PX) -> dict:
    """What the family's empty-latent node gives (Wan: 5 frames = 2 latent frames; Qwen's 4-D latent is
    made 5-D by the sampler, as ComfyUI does it)."""
    s = size // 8
    if fam.name == "wan21":
        return {"samples": torch.zeros(batch, 16, 2, s, s)}
    return {"samples": torch.zeros(batch, fam.latent_channels, s, s)}


def ksample(fam, model, pos, neg, cfg=4.0, steps=2, seed=1, latent=None, sampler="euler", denoise=1.0):
    import nodes

    latent = latent or empty_latent(fam)
    (out,) = nodes.common_ksampler(model, seed, steps, cfg, sampler, "simple", pos, neg, latent, denoise=denoise)
    return out["samples"]


def real_cfg(fam) -> float:
    return 1.0 if fam.name == "flux" else 4.0


class Inputs:
    """Everything each diffusion-model call receives (positional and keyword tensors), in call order."""

    def __init__(self, fam) -> None:
        self.net = fam.model.model.diffusion_model
        self.calls: list[dict] = []

    def __enter__(self) -> Inputs:
        def pre(_m, args, kwargs):
            call = {f"arg{i}": a for i, a in enumerate(args)}
            call.update({k: v for k, v in kwargs.items() if k not in ("transformer_options", "control")})
            self.calls.append({k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in call.items()})
        self.handle = self.net.register_forward_pre_hook(pre, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def context_of(call: dict) -> torch.Tensor:
    return call["context"] if "context" in call else call["arg2"]


# -- conditioning perturbation ------------------------------------------------------------------------

def test_cep_gamma_zero_is_bit_identical_and_a_seed_reproduces(fam, prompts):
    from supercond.nodes.perturb.nodes import SupercondPerturbConditioning

    pos, neg = prompts
    run = dict(cfg=real_cfg(fam), steps=1)
    plain = ksample(fam, fam.model, pos, neg, **run)
    assert torch.equal(ksample(fam, cep(fam.model, gamma=0.0), pos, neg, **run), plain)
    static0 = SupercondPerturbConditioning.execute(pos, 0.0, "uniform", "paper", "tokens", 3).result[0]
    assert torch.equal(ksample(fam, fam.model, static0, neg, **run), plain)
    a = ksample(fam, cep(fam.model), pos, neg, **run)
    assert torch.equal(a, ksample(fam, cep(fam.model), pos, neg, **run)) and not torch.equal(a, plain)
    assert not torch.equal(a, ksample(fam, cep(fam.model, seed_offset=1), pos, neg, **run))


@pytest.mark.parametrize("kind", ["cep", "cads"])
def test_perturbation_changes_only_the_text_the_model_receives(fam, prompts, kind):
    """At the first model call (same noise, same sigma) everything the diffusion model receives is equal
    with and without the patch, except the text: non-zero token entries and the pooled part of ``y``
    (SDXL's size embeddings, Flux's guidance, masks and timesteps untouched; Wan's zero padding stays 0)."""
    pos, neg = prompts
    apply_to = "both" if fam.name in ("sdxl", "flux") else "tokens"
    patch = cep if kind == "cep" else cads
    with Inputs(fam) as plain:
        ksample(fam, fam.model, pos, neg, real_cfg(fam), steps=1)
    with Inputs(fam) as moved:
        ksample(fam, patch(fam.model, apply_to=apply_to, branch="both"), pos, neg, real_cfg(fam), steps=1)
    assert len(plain.calls) == len(moved.calls) >= 1
    for a, b in zip(plain.calls, moved.calls, strict=True):
        assert a.keys() == b.keys()
        ca, cb = context_of(a), context_of(b)
        assert not torch.equal(ca, cb)
        assert torch.equal(ca == 0, cb == 0), "padding (exact zeros) was perturbed"
        for key in a:
            if a[key] is ca or key in ("context", "arg2"):
                continue
            if key == "y" and fam.name == "sdxl":
                assert not torch.equal(a["y"][:, :1280], b["y"][:, :1280])
                assert torch.equal(a["y"][:, 1280:], b["y"][:, 1280:]), "SDXL's size embeddings moved"
            elif key == "y" and fam.name == "flux":
                assert not torch.equal(a["y"], b["y"])
            elif isinstance(a[key], torch.Tensor):
                assert torch.equal(a[key], b[key]), f"{key} changed"
            else:
                assert a[key] == b[key], f"{key} changed"


def test_perturbation_plot_draws_every_patch(fam):
    from supercond.nodes.perturb.nodes import SupercondPlotPerturbation

    sigmas = torch.linspace(1.0, 0.0, 5) if fam.name in FLOW else torch.tensor([14.6, 4.0, 1.0, 0.3, 0.0])
    image = SupercondPlotPerturbation.execute(cads(cep(fam.model)), sigmas, None).result[0]
    assert image.dim() == 4 and image.shape[-1] == 3 and bool(torch.isfinite(image).all())


def test_pooled_needs_a_pooled_input(fam):
    from supercond.nodes.errors import InputError

    if fam.name in ("sdxl", "flux"):
        cep(fam.model, apply_to="pooled")
        return
    with pytest.raises(InputError, match="take no pooled text embedding"):
        cep(fam.model, apply_to="pooled")


# -- noise-correction schedules -----------------------------------------------------------------------

def test_noise_correction_is_a_no_op_on_flow_and_corrects_sdxl(fam, prompts):
    from supercond.nodes.schedules.nodes import SupercondNoiseCorrection

    pos, neg = prompts
    # two steps: the correction is the first step's; the second is the sampler's own continuation
    corrected = ksample(fam, SupercondNoiseCorrection.execute(fam.model, 1.0).result[0], pos, neg, steps=2)
    plain = ksample(fam, fam.model, pos, neg, steps=2)
    assert torch.equal(corrected, plain) == (fam.name in FLOW)


def test_epsilon_scaling_uses_the_family_geometry(fam, prompts):
    from test_schedules_comfy import Recorder

    from supercond.nodes.schedules.nodes import SupercondEpsilonScaling

    pos, neg = prompts
    lam = 1.05
    outer, inner = Recorder("supercond.test.outer"), Recorder("supercond.test.inner")
    patched = inner.install(SupercondEpsilonScaling.execute(outer.install(fam.model), lam, 0.0).result[0])
    ksample(fam, patched, pos, neg, steps=3)
    assert len(outer.calls) == len(inner.calls) == 3
    changed = 0
    for (s, x, d_scaled), (_, _, d) in zip(outer.calls, inner.calls, strict=True):
        x64, d64 = x.double(), d.double()
        if fam.name in FLOW:
            if s >= 1.0:
                assert torch.equal(d_scaled, d)  # singular at sigma 1: exempt
                continue
            eps_hat = (x64 - (1 - s) * d64) / s
            hand = (x64 - s * eps_hat / lam) / (1 - s)
        else:
            hand = x64 - (x64 - d64) / lam
        assert torch.allclose(d_scaled.double(), hand, atol=1e-4, rtol=1e-4), f"sigma {s}"
        changed += 1
    assert changed >= 2


def test_schedule_sigmas_follow_the_family_shift(fam):
    import comfy_extras.nodes_custom_sampler as cs

    from supercond.nodes.schedules.nodes import SupercondScheduleSigmas

    trailing = SupercondScheduleSigmas.execute(fam.model, 8, "trailing", False, "as_scheduled", 136.0).result[0]
    simple = cs.BasicScheduler().get_sigmas(fam.model, "simple", 8, 1.0)[0]
    assert torch.allclose(trailing, simple, rtol=1e-5, atol=1e-6)  # trailing = ComfyUI's simple, shift included
    ms = fam.model.get_model_object("model_sampling")
    assert float(trailing[0]) == pytest.approx(float(ms.sigma_max), rel=1e-5) and float(trailing[-1]) == 0.0
    if fam.name in FLOW:  # the shift moves the middle of the schedule: not the unshifted 1 - t
        assert not torch.allclose(trailing[1:-1], torch.linspace(1, 0, 9)[1:-1], atol=1e-3)


def test_offset_noise_on_the_family_latent_format(fam):
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise

    from supercond.nodes.schedules.nodes import SupercondOffsetNoise

    latent = empty_latent(fam, batch=2, size=64)
    off = SupercondOffsetNoise.execute(7, 0.0, 0, 0.3).result[0].generate_noise(latent)
    assert torch.equal(off, Noise_RandomNoise(7).generate_noise(latent))
    on = SupercondOffsetNoise.execute(7, 0.2, 2, 0.3).result[0].generate_noise(latent)
    assert on.shape == latent["samples"].shape and not torch.equal(on, off)
    assert 0.8 < float(on.std()) < 1.2


# -- single-pass guidance -----------------------------------------------------------------------------

def calls_per_step(fam, model, pos, neg, cfg, steps) -> list[int]:
    from test_singlepass_comfy import CallCounter

    with CallCounter(fam) as calls:
        ksample(fam, model, pos, neg, cfg, steps=steps)
    return calls.rows


@pytest.mark.parametrize("head", ["projection", "last_block"])
def test_fresh_head_is_cfg1_bit_for_bit_in_one_call_per_step(fam, prompts, head):
    from test_singlepass_comfy import new_head, single_pass

    pos, neg = prompts
    model = single_pass(new_head(fam.model, head))
    assert calls_per_step(fam, model, pos, neg, 5.0, 2) == [1, 1]
    assert torch.equal(ksample(fam, model, pos, neg, 5.0, steps=2), ksample(fam, fam.model, pos, neg, 1.0, steps=2))


@pytest.mark.parametrize("fam", REAL_CFG, indirect=True)  # Flux dev is guidance-distilled: sampled at cfg 1
def test_head_that_knows_the_uncond_matches_two_pass_cfg(fam, prompts):
    from test_singlepass_comfy import close, oracle, single_pass

    pos, neg = prompts
    model = single_pass(oracle(fam, neg))
    for scale in (2.0, 6.0):  # one step: the head is the same at every step (CI time: Flux and Chroma are slow)
        two = ksample(fam, fam.model, pos, neg, scale, steps=1)
        one = ksample(fam, model, pos, neg, scale, steps=1)
        assert close(one, two), (scale, float((one - two).abs().max()))
    assert not close(two, ksample(fam, fam.model, pos, neg, 1.0, steps=1))


# -- training -----------------------------------------------------------------------------------------

@pytest.fixture()
def heads_dir(comfy, tmp_path, monkeypatch):
    from supercond.nodes.singlepass import nodes as nodes_sp

    d = tmp_path / "heads"
    d.mkdir()
    monkeypatch.setitem(comfy.folder_names_and_paths, nodes_sp.FOLDER, ([str(d)], {".safetensors"}))
    return d


def train_head(fam, pos, neg, **kw):
    from supercond.nodes.train.head import SupercondTrainHead

    args = dict(mode="distill", steps=3, learning_rate=1e-4, head="projection", lora_rank=0, cfg_min=3.0,
                cfg_max=6.0, seed=0, save_every=0, filename_prefix=f"{fam.name}/head", resume=False) | kw
    latent = empty_latent(fam, batch=2)
    return SupercondTrainHead.execute(fam.model, pos, negative=neg, latent=latent, **args)


def test_train_head_distills_saves_and_the_file_loads(fam, prompts, heads_dir):
    from test_singlepass_comfy import single_pass

    from supercond.nodes.singlepass.nodes import SupercondLoadHead

    pos, neg = prompts
    model, path, plot = train_head(fam, pos, neg).result
    assert path.endswith("_000003.safetensors") and plot.shape[-1] == 3
    loaded = SupercondLoadHead.execute(fam.model, f"{fam.name}/head_000003.safetensors").result[0]
    a = ksample(fam, single_pass(model), pos, neg, 4.0, steps=1)
    assert bool(torch.isfinite(a).all())
    assert torch.equal(a, ksample(fam, single_pass(loaded), pos, neg, 4.0, steps=1))


def test_negative_reading_heads_where_the_last_block_reads_the_prompt(fam, prompts, heads_dir):
    """negative_prompts train a head that reads the wired negative where the last block cross-attends to the
    prompt (Wan here; SD1.x in test_train_head_comfy): two negatives, two images, one model call per step.
    Elsewhere (SDXL's last block is a ResBlock; MMDiT-like blocks carry their own text stream) it is refused."""
    from comfy_helpers import encode
    from test_singlepass_comfy import single_pass

    from supercond.nodes.errors import InputError

    pos, neg = prompts
    kw = dict(head="last_block", negative_prompts="a blue sphere\na dark room", clip=fam.clip)
    if fam.name != "wan21":
        with pytest.raises(InputError, match="negative_prompts need a head that reads the prompt"):
            train_head(fam, pos, neg, **kw)
        return
    model = train_head(fam, pos, neg, **kw).result[0]
    calls = []
    handle = fam.model.model.diffusion_model.register_forward_pre_hook(lambda _m, a: calls.append(a[0].shape[0]))
    try:
        a, b = (ksample(fam, single_pass(model), pos, encode(fam, t), 4.0) for t in ("a blue sphere", "a dark room"))
    finally:
        handle.remove()
    assert calls == [1] * 4 and not torch.equal(a, b) and bool(torch.isfinite(a).all())


def train_lora(fam, latents, cond, **kw):
    from supercond.nodes.train.lora import SupercondTrainLoRA

    args = dict(steps=2, learning_rate=1e-3, rank=4, alpha=4.0, batch_size=1, grad_accumulation=1,
                prediction="auto", loss_weighting="none", min_snr_gamma=5.0, cep_gamma=0.0,
                cep_distribution="uniform", input_perturbation=0.0, offset_noise=0.0, pyramid_iterations=0,
                caption_dropout=0.0, seed=0, gradient_checkpointing=False, lr_schedule="constant",
                warmup_steps=0, max_grad_norm=1.0, save_every=0, filename_prefix=f"{fam.name}/lora", resume=False) | kw
    return SupercondTrainLoRA.execute(fam.model, latents, cond, **args)


def training_latents(fam, n=1, size=PX, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    shape = empty_latent(fam, n, size)["samples"].shape
    if fam.name == "qwen_image":  # what its VAE gives: one frame, 5-D
        shape = (n, 16, 1, size // 8, size // 8)
    return {"samples": torch.randn(shape, generator=g) * 0.5}


KOHYA_KEY = {  # one key kohya's trainers write for each family (sd-scripts; musubi-tuner for Qwen/Wan)
    "sdxl": "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
    "flux": "lora_unet_double_blocks_0_img_attn_qkv",
    "chroma": "lora_unet_single_blocks_0_linear1",
    "qwen_image": "lora_unet_transformer_blocks_0_attn_to_q",
    "wan21": "lora_unet_blocks_0_self_attn_q",
}


def test_lora_keys_are_kohya_and_loraloader_reproduces_the_trained_model(fam, prompts, loras):
    import comfy.utils
    import nodes

    pos, neg = prompts
    model, path, _, _ = train_lora(fam, training_latents(fam), pos, learning_rate=1e-2).result
    sd = comfy.utils.load_torch_file(path)
    keys = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in sd}
    assert KOHYA_KEY[fam.name] in keys, sorted(keys)[:5]
    assert all(k.startswith("lora_unet_") for k in keys)
    (loaded, _) = nodes.LoraLoader().load_lora(fam.model, None, path.split("/loras/")[-1], 1.0, 0.0)
    a = ksample(fam, model, pos, neg, real_cfg(fam), steps=1)
    assert torch.equal(a, ksample(fam, loaded, pos, neg, real_cfg(fam), steps=1))
    assert not torch.equal(a, ksample(fam, fam.model, pos, neg, real_cfg(fam), steps=1))


def objective_mse(model, x0, cond, seed=5) -> float:
    """The plain training objective of a MODEL (eps or flow MSE) on a fixed grid of 8 sigmas, 2 noise
    draws each, through the adapter's model call: for before/after without random-sigma noise."""
    import comfy.model_management as mm

    from supercond.core import objective as obj
    from supercond.nodes import family as fm
    from supercond.nodes.train.lora_run import conds_from

    mm.load_models_gpu([model])
    pred = fm.model_prediction(model)
    call = fm.ModelCall(model, model.load_device)
    rows = conds_from(cond)[0][:1] * x0.shape[0]
    table = model.get_model_object("model_sampling").sigmas
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    with torch.no_grad():
        for i in torch.linspace(len(table) // 20, len(table) - 1, 8).long().tolist():
            s = table[i:i + 1].expand(x0.shape[0])
            for _ in range(2):
                n = torch.randn(x0.shape, generator=g)
                x = obj.noisy_input(pred, x0, n, s)
                out = obj.native_prediction(pred, x, call(x, s, rows), s)
                total += float((out - obj.native_target(pred, x0, n, s)).pow(2).mean())
    return total / 16


# (steps, learning rate, bound on after / before) per family; measured ratios in the comments. The Flux and
# Chroma fixtures learn too slowly for CI (Flux: 0.90x after 40 steps at 1e-3, ~3 s a step here); their
# training is covered by the kohya-keys test above (the trained LoRA changes the samples, LoraLoader agrees).
OVERFIT = {"sdxl": (12, 3e-3, 0.85),  # 0.76
           "qwen_image": (20, 1e-2, 0.9),  # 0.84
           "wan21": (12, 1e-2, 0.85)}  # 0.74


@pytest.mark.parametrize("fam", list(OVERFIT), indirect=True)
def test_lora_loss_falls_on_an_overfit_task(fam, prompts, loras):
    pos, _ = prompts
    steps, lr, bound = OVERFIT[fam.name]
    lat = training_latents(fam)
    model = train_lora(fam, lat, pos, steps=steps, learning_rate=lr, rank=8, alpha=8.0).result[0]
    x0 = fam.model.model.process_latent_in(lat["samples"])
    before, after = objective_mse(fam.model, x0, pos), objective_mse(model, x0, pos)
    assert after < bound * before, (before, after)


# -- SDXL size conditioning ----------------------------------------------------------------------------

def test_sdxl_training_gets_the_size_embedding_the_sampler_builds(comfy, models_dir, loras, heads_dir):
    """At a non-square, non-768 latent (48 x 80 px), both trainers call the diffusion model with exactly
    the ``y`` (pooled + size/crop/target embeddings) that KSampler builds for that latent; before the
    adapter they used SDXL's 768 x 768 default."""
    from comfy_helpers import encode, load_model_family

    fam = load_model_family("sdxl", models_dir)
    pos = encode(fam, "a red cube")
    latent = {"samples": torch.zeros(1, 4, 6, 10)}
    with Inputs(fam) as sampled:
        ksample(fam, fam.model, pos, pos, 1.0, steps=1, latent=latent)
    with Inputs(fam) as trained:
        train_lora(fam, {"samples": torch.randn(1, 4, 6, 10)}, pos, steps=1)
    with Inputs(fam) as taught:
        from supercond.nodes.train.head import SupercondTrainHead

        SupercondTrainHead.execute(fam.model, pos, "distill", 1, 1e-4, "projection", 0, 3.0, 6.0, 0, 0, "sx/head",
                                   False, negative=pos, latent={"samples": torch.randn(1, 4, 6, 10)})
    y = sampled.calls[0]["y"][:1]
    assert torch.equal(trained.calls[0]["y"], y)
    assert all(torch.equal(row, y[0]) for row in taught.calls[0]["y"])
    pooled = pos[0][1]["pooled_output"]
    default = fam.model.model.encode_adm(pooled_output=pooled, width=768, height=768)
    assert not torch.equal(y, default), "the sampler's y should differ from the 768 x 768 default"


def test_sdxl_text_encoder_lora_trains_both_clips(comfy, models_dir, loras):
    """SDXL's text-encoder LoRA covers CLIP-L and CLIP-G (kohya's lora_te1_ / lora_te2_ keys), both learn,
    and LoraLoader's CLIP from the file encodes exactly as the trainer's CLIP output."""
    import comfy.utils
    import nodes
    from comfy_helpers import encode, load_model_family

    fam = load_model_family("sdxl", models_dir)
    pos = encode(fam, "a red cube")
    cond = [[pos[0][0], dict(pos[0][1], supercond_text="a red cube")]]  # the caption, as the dataset adds it
    _, path, _, clip = train_lora(fam, {"samples": torch.randn(1, 4, 4, 4)}, cond, steps=2, learning_rate=1e-2,
                                  clip=fam.clip, text_encoder_lr=1e-2).result
    sd = comfy.utils.load_torch_file(path)
    for part, layers in (("lora_te1_", 12), ("lora_te2_", 32)):  # CLIP-L, CLIP-G encoder layers
        ups = [k for k in sd if k.startswith(part) and k.endswith(".lora_up.weight")]
        assert len(ups) == 6 * layers and any(float(sd[k].abs().max()) > 0 for k in ups), part
    _, loaded = nodes.LoraLoader().load_lora(fam.model, fam.clip, path.split("/loras/")[-1], 1.0, 1.0)
    ours, theirs = (c.encode_from_tokens_scheduled(c.tokenize("a blue disc"))[0] for c in (clip, loaded))
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1]["pooled_output"], theirs[1]["pooled_output"])
    assert not torch.equal(ours[0], encode(fam, "a blue disc")[0][0])


# -- bad input -----------------------------------------------------------------------------------------

def unknown_family_model():
    """A tiny Wan 2.1 image-to-video model: a real ComfyUI family the adapter does not serve."""
    import comfy.ops
    import comfy.sd
    from comfy.ldm.wan.model import WanModel

    net = WanModel(model_type="i2v", patch_size=(1, 2, 2), text_len=512, in_dim=36, dim=128, ffn_dim=256,
                   freq_dim=256, text_dim=4096, out_dim=16, num_heads=1, num_layers=1,
                   operations=comfy.ops.disable_weight_init)
    sd = {k: torch.zeros_like(v) for k, v in net.state_dict().items()}
    return comfy.sd.load_diffusion_model_state_dict(sd)


def test_an_unknown_family_gets_a_clear_message(comfy):
    from supercond.nodes.errors import InputError
    from supercond.nodes.singlepass.nodes import SupercondNewHead

    model = unknown_family_model()
    assert type(model.model.model_config).__name__ == "WAN21_I2V"
    msg = r"does not support this model family: ComfyUI loaded it as WAN21_I2V .*Supported families: SD1.x, SDXL"
    with pytest.raises(InputError, match="SupercondCEP " + msg):
        cep(model)
    with pytest.raises(InputError, match="SupercondNewHead " + msg):
        SupercondNewHead.execute(model, "projection")
    with pytest.raises(InputError, match="SupercondTrainLoRA " + msg):
        train_lora(type("F", (), {"model": model, "name": "x"}), {"samples": torch.zeros(1, 16, 1, 4, 4)},
                   [[torch.zeros(1, 512, 4096), {}]])


def test_wrong_conditioning_and_files_of_another_family_are_refused(comfy, models_dir, fixture_checkpoints,
                                                                      loras, heads_dir):
    from comfy_helpers import encode, load_family, load_model_family

    from supercond.core.heads import save_head
    from supercond.nodes.errors import InputError
    from supercond.nodes.singlepass import hook
    from supercond.nodes.singlepass.nodes import SupercondLoadHead

    sdxl, wan = load_model_family("sdxl", models_dir), load_model_family("wan21", models_dir)
    sd15_pos = encode(load_family("eps", fixture_checkpoints), "a red cube")
    pos = encode(sdxl, "a red cube")
    lat = training_latents(sdxl)
    with pytest.raises(InputError, match="conditioning is 768 wide but SDXL models take 2048-wide"):
        train_lora(sdxl, lat, sd15_pos)
    with pytest.raises(InputError, match="positive conditioning is 768 wide but SDXL"):
        ksample(sdxl, cep(sdxl.model), sd15_pos, pos)
    no_pooled = [[pos[0][0], {}]]
    with pytest.raises(InputError, match="has no pooled text embedding, which SDXL models need"):
        train_lora(sdxl, lat, no_pooled)
    with pytest.raises(InputError, match="no pooled text embedding, which SDXL models need"):
        ksample(sdxl, cep(sdxl.model), no_pooled, pos)
    save_head(hook.new_head(wan.model, "projection"), heads_dir / "wan_head.safetensors")
    with pytest.raises(ValueError, match="does not fit this model .*family: the model needs 'SDXL', the head has "
                                         "'WAN21_T2V'"):
        SupercondLoadHead.execute(sdxl.model, "wan_head.safetensors")
    wan_pos = encode(wan, "a red cube")
    train_lora(wan, training_latents(wan), wan_pos, steps=1, filename_prefix="mixed/lora")
    with pytest.raises(ValueError, match="different layer set"):
        train_lora(sdxl, lat, pos, steps=2, filename_prefix="mixed/lora", resume=True)
