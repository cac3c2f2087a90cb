"""SupercondTrainLoRA's kohya-level features inside the real ComfyUI (SD1.x fixture): sample previews
(saved, shown live, with the LoRA active, also after resume), keep_last, validation loss, masked loss,
several bucket sizes, caption variants; and their bad-input messages."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.comfy


@pytest.fixture()
def eps(comfy, fixture_checkpoints):
    from comfy_helpers import load_family

    return load_family("eps", fixture_checkpoints)


def data(fam, n=4, size=8, seed=0):
    from comfy_helpers import encode

    g = torch.Generator().manual_seed(seed)
    return {"samples": torch.randn(n, 4, size, size, generator=g) * 0.5}, encode(fam, "a red cube")


def run(fam, latents, cond, **kw):
    """test_train_comfy's run at a learning rate that moves a LoRA visibly in a few steps."""
    from test_train_comfy import run as train_run

    return train_run(fam, latents, cond, **({"learning_rate": 1e-2} | kw))


def names(folder):
    return sorted(p.name for p in folder.rglob("*") if p.is_file())


@pytest.fixture()
def previews(monkeypatch):
    """What the node sends to ComfyUI's progress bar: (step, preview image) of each preview."""
    import comfy.utils

    seen = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK",
                        lambda value, total, preview, node_id=None: preview and seen.append((value, preview)))
    return seen


def test_samples_are_saved_shown_live_and_come_from_the_lora(eps, loras, previews):
    from PIL import Image

    lat, cond = data(eps)
    prompts = "a red cube --s 3 --d 7 --w 64 --h 64\nsomething else --n blurry --l 3 --s 2"
    out = run(eps, lat, cond, steps=4, sample_every=2, sample_prompts=prompts, clip=eps.clip, vae=eps.vae)
    files = names(loras / "t")
    assert [f for f in files if "_sample_" in f] == [f"lora_{s:06d}_sample_{k:02d}.png" for s in (2, 4) for k in (0, 1)]
    assert [v for v, _ in previews] == [2, 4]  # a grid of the step's samples, shown in the node
    fmt, grid, _ = previews[-1][1]
    assert fmt == "PNG" and grid.size == (128, 64)
    # the step-4 sample is the trained model's: the saved LoRA sampled the same way gives the same image,
    # the base model another
    from supercond.nodes.train.previews import Previewer, parse_prompts

    first = parse_prompts(prompts, 0, 5.0)[:1]
    encode = lambda t: eps.clip.encode_from_tokens_scheduled(eps.clip.tokenize(t))  # noqa: E731

    def render(model, folder):
        p = Previewer(model, first, encode, [], None, lat["samples"][:1], eps.vae, folder, "x")
        return np.asarray(Image.open(p.render(4)[0]), dtype=np.float32)

    saved = np.asarray(Image.open(loras / "t" / "lora_000004_sample_00.png"), dtype=np.float32)
    trained, base = render(out.result[0], loras / "a"), render(eps.model, loras / "b")
    assert np.abs(trained - saved).mean() < 1.0 < np.abs(base - saved).mean()


def test_samples_continue_after_resume_and_without_clip(eps, loras, previews):
    lat, cond = data(eps)
    run(eps, lat, cond, steps=2, sample_every=2)
    run(eps, lat, cond, steps=4, sample_every=2, resume=True)
    assert [f for f in names(loras / "t") if "_sample_" in f] == ["lora_000002_sample_00.png",
                                                                   "lora_000004_sample_00.png"]
    assert [v for v, _ in previews] == [2, 4]


def test_sample_prompts_errors_are_clear(eps, loras):
    from supercond.nodes.errors import InputError

    lat, cond = data(eps)
    with pytest.raises(InputError, match="sample_prompts need the clip input"):
        run(eps, lat, cond, sample_every=2, sample_prompts="a cube")
    with pytest.raises(InputError, match="line 2: steps must be a int, got 'x'"):
        run(eps, lat, cond, sample_every=2, sample_prompts="a cube\nb --s x", clip=eps.clip)


def test_keep_last_prunes_old_checkpoints_with_their_ema_and_states(eps, loras, caplog):
    import logging

    lat, cond = data(eps)
    with caplog.at_level(logging.INFO, logger="supercond"):
        run(eps, lat, cond, steps=8, save_every=2, keep_last=2, ema_decay=0.9)
    assert re.search(r"training peak memory: \d+ MiB resident", caplog.text)  # the node's log says it
    files = [f for f in names(loras / "t") if re.match(r"lora_\d{6}", f)]
    assert files == ["lora_000006.safetensors", "lora_000006_ema.safetensors",
                     "lora_000008.safetensors", "lora_000008.state.pt", "lora_000008_ema.safetensors"]
    run(eps, lat, cond, steps=8, save_every=2, keep_last=0, filename_prefix="t/all")
    assert len([f for f in names(loras / "t") if f.startswith("all_") and f.endswith("0.safetensors")]) == 0
    assert len([f for f in names(loras / "t") if f.startswith("all_") and f.endswith(".safetensors")]) == 4


def test_validation_loss_is_fixed_draws_and_survives_resume(eps, loras):
    from supercond.nodes.train import lora_run as lora

    lat, cond = data(eps, n=4)
    seen = {}
    original = lora.Trainer.validation_loss

    def spy(self, held_out):
        value = original(self, held_out)
        seen.setdefault(self.cfg.seed, []).append((self.step, value, held_out.n))
        return value

    lora.Trainer.validation_loss = spy
    try:
        straight = run(eps, lat, cond, steps=4, validation_split=0.25, validate_every=2, filename_prefix="t/a")
        run(eps, lat, cond, steps=2, validation_split=0.25, validate_every=2, filename_prefix="t/b")
        resumed = run(eps, lat, cond, steps=4, validation_split=0.25, validate_every=2, filename_prefix="t/b",
                      resume=True)
    finally:
        lora.Trainer.validation_loss = original
    values = seen[0]
    assert [(s, n) for s, _, n in values] == [(2, 1), (4, 1), (2, 1), (4, 1)]  # one of 4 images held out
    assert values[0][1] == values[2][1] and values[1][1] == values[3][1]  # same draws: same numbers
    assert values[0][1] != values[1][1]  # and they follow the weights
    # the plot carries the validation curve (a second colour), also after resume
    assert not torch.equal(straight.result[2], run(eps, lat, cond, steps=4, filename_prefix="t/c").result[2])
    assert torch.equal(straight.result[2], resumed.result[2])


def test_masked_loss_trains_only_where_the_mask_is(eps, loras):
    import comfy.utils

    lat, cond = data(eps, n=2)
    with pytest.raises(Exception, match="masked_loss is on but the latents carry no masks"):
        run(eps, lat, cond, masked_loss=True)
    masked = dict(lat, supercond_masks=[torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8)])
    path = run(eps, masked, cond, masked_loss=True, filename_prefix="t/zero").result[1]
    ups = [v for k, v in comfy.utils.load_torch_file(path).items() if k.endswith("lora_up.weight")]
    assert all(float(v.abs().max()) == 0 for v in ups)  # nothing to learn where every mask is 0
    path = run(eps, masked, cond, masked_loss=False, filename_prefix="t/off").result[1]
    ups = [v for k, v in comfy.utils.load_torch_file(path).items() if k.endswith("lora_up.weight")]
    assert any(float(v.abs().max()) > 0 for v in ups)  # masks ignored when masked_loss is off


def test_several_bucket_sizes_and_caption_variants_train(eps, loras):
    from comfy_helpers import encode

    g = torch.Generator().manual_seed(3)
    items = [torch.randn(1, 4, h, w, generator=g) for h, w in ((8, 12), (12, 8), (8, 12), (8, 8))]
    cond = encode(eps, "a red cube")
    variants = [{"cross_attn": encode(eps, t)[0][0]} for t in ("red, cube", "cube, red")]
    cond = [[cond[0][0], dict(cond[0][1], supercond_variants=variants)]]
    lat = {"samples": items[0], "supercond_items": items, "supercond_flipped": [t.flip(-1) for t in items]}
    model, path, _, _ = run(eps, lat, cond, steps=4, batch_size=2).result
    assert path.endswith("lora_000004.safetensors")


def test_text_encoder_lora_is_trained_saved_and_loaded_by_loraloader(eps, loras, input_dir):
    import comfy.utils
    import nodes

    from supercond.nodes.train.dataset import SupercondLoadDataset

    lat, cond = SupercondLoadDataset.execute("supercond_example", eps.clip, eps.vae, 64, False, False, 0).result
    lat = {"samples": lat["samples"][:2]}
    before = eps.clip.encode_from_tokens_scheduled(eps.clip.tokenize("a red disc"))[0][0]
    model, path, _, clip = run(eps, lat, cond[:2], steps=3, clip=eps.clip, text_encoder_lr=1e-2).result
    sd = comfy.utils.load_torch_file(path)
    te = [k for k in sd if k.startswith("lora_te_text_model_encoder_layers_")]
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in te
    assert any(float(sd[k].abs().max()) > 0 for k in te if k.endswith("lora_up.weight"))  # it learned
    # the CLIP output is what LoraLoader makes of the file; the input CLIP encodes as before
    _, loaded_clip = nodes.LoraLoader().load_lora(eps.model, eps.clip, path.split("/loras/")[-1], 1.0, 1.0)
    ours = clip.encode_from_tokens_scheduled(clip.tokenize("a red disc"))[0][0]
    theirs = loaded_clip.encode_from_tokens_scheduled(loaded_clip.tokenize("a red disc"))[0][0]
    assert torch.equal(ours, theirs) and not torch.allclose(ours, before, atol=1e-4)
    assert torch.equal(eps.clip.encode_from_tokens_scheduled(eps.clip.tokenize("a red disc"))[0][0], before)
    # the same run written for diffusers (tests/test_lora_export.py loads such files in diffusers): LoraLoader
    # gives the same CLIP from it
    diff = run(eps, lat, cond[:2], steps=3, clip=eps.clip, text_encoder_lr=1e-2, filename_prefix="t/d",
               export_format="diffusers").result[1]
    keys = list(comfy.utils.load_torch_file(diff))
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder"}
    assert sum(k.startswith("text_encoder.") for k in keys) == len(te) // 3 * 2  # down + up, no alpha
    _, diff_clip = nodes.LoraLoader().load_lora(eps.model, eps.clip, diff.split("/loras/")[-1], 1.0, 1.0)
    torch.testing.assert_close(diff_clip.encode_from_tokens_scheduled(diff_clip.tokenize("a red disc"))[0][0],
                               ours, rtol=1e-3, atol=1e-3)  # B * alpha / rank is rounded to fp16 once more


def test_text_encoder_training_errors(eps, loras):
    from supercond.nodes.errors import InputError

    lat, cond = data(eps)
    with pytest.raises(InputError, match="connect the clip input"):
        run(eps, lat, cond, text_encoder_lr=1e-4)
    with pytest.raises(InputError, match="needs the captions: use SupercondLoadDataset"):
        run(eps, lat, cond, text_encoder_lr=1e-4, clip=eps.clip)


def test_diffusers_export_loads_in_loraloader_like_kohya(eps, loras):
    """The same run saved with diffusers key names: ComfyUI's LoraLoader samples it exactly as the kohya
    file (alpha = rank, so folding alpha/rank into the up weights is exact). tests/test_lora_export.py
    loads such files into the real diffusers library."""
    import comfy.utils
    import nodes
    from comfy_helpers import encode, sample

    lat, cond = data(eps, n=2)
    kohya = run(eps, lat, cond, steps=2, filename_prefix="t/k").result[1]
    diff = run(eps, lat, cond, steps=2, filename_prefix="t/d", export_format="diffusers").result[1]
    keys = list(comfy.utils.load_torch_file(diff))
    assert keys and all(k.startswith("unet.") for k in keys) and not any(k.endswith(".alpha") for k in keys)
    pos, neg = encode(eps, "a red cube"), encode(eps, "")
    a, b = (sample(eps, nodes.LoraLoader().load_lora(eps.model, None, p.split("/loras/")[-1], 1.0, 0.0)[0],
                   pos, neg) for p in (kohya, diff))
    assert torch.equal(a, b) and not torch.equal(a, sample(eps, eps.model, pos, neg))


def test_transformer_layer_set_is_kohyas_default_lora(eps, loras):
    """lora_layers transformer: the attention, feed-forward and proj_in/out layers of the transformer blocks
    (kohya's default LoRA); all (the default) adds the ResBlocks and down/up-sampling (kohya's LoCon).
    Resuming with the other set is refused, naming it."""
    import comfy.utils

    from supercond.nodes.errors import InputError

    lat, cond = data(eps, n=2)
    layers = {}
    for name in ("transformer", "all"):
        path = run(eps, lat, cond, steps=2, filename_prefix=f"t/{name}", lora_layers=name).result[1]
        layers[name] = {k.split(".")[0] for k in comfy.utils.load_torch_file(path)}
    kohya, locon = layers["transformer"], layers["all"]
    assert kohya < locon and all("_attentions_" in k for k in kohya)
    assert {"attn1_to_q", "attn2_to_k", "ff_net_0_proj", "ff_net_2", "proj_in", "proj_out"} <= {
        k.split("transformer_blocks_0_")[-1].split("attentions_0_")[-1] for k in kohya}
    assert all(re.search(r"_(resnets|downsamplers|upsamplers)_", k) for k in locon - kohya)
    with pytest.raises(InputError, match="lora_layers 'transformer' -> 'all'"):
        run(eps, lat, cond, steps=3, filename_prefix="t/transformer", lora_layers="all", resume=True)


@pytest.mark.parametrize("storage", ["bfloat16", "float8_e4m3fn"])
def test_base_weights_stay_in_low_precision_storage(storage, comfy, fixture_checkpoints, loras, caplog):
    """A model loaded with bf16 or fp8 weights (UNETLoader's weight_dtype, or model_options dtype) trains
    with its weights left in that storage (ComfyUI casts them per layer) and the LoRA in fp32."""
    import comfy.sd
    import comfy.utils
    from comfy_helpers import Family, encode

    dtype = getattr(torch, storage)
    model = comfy.sd.load_checkpoint_guess_config(str(fixture_checkpoints["sd15"]), output_vae=False,
                                                  output_clip=False, model_options={"dtype": dtype})[0]
    eps = load_eps(comfy, fixture_checkpoints)
    fam = Family("eps", model, eps.clip, eps.vae, 4)
    weights = lambda: {p.dtype for p in model.model.diffusion_model.parameters() if p.dim() > 1}  # noqa: E731
    assert weights() == {dtype}
    lat, _ = data(fam, n=2)
    path = run(fam, lat, encode(eps, "a red cube"), steps=2, filename_prefix=f"t/{storage}").result[1]
    assert weights() == {dtype}  # the shared model keeps its storage
    sd = comfy.utils.load_torch_file(path)
    assert any(float(v.abs().max()) > 0 for k, v in sd.items() if k.endswith("lora_up.weight"))
    assert all(torch.isfinite(v.float()).all() for v in sd.values())


def load_eps(comfy, fixture_checkpoints):
    from comfy_helpers import load_family

    return load_family("eps", fixture_checkpoints)
