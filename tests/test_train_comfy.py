"""The LoRA trainer inside the real ComfyUI (in-process) on the SD1.x (eps), v and SD3 (flow) fixtures:
loss falls, regularizers off is the plain objective, resume equals a straight run, the saved file
loaded by the stock LoraLoader reproduces the trained MODEL, bad input gets a clear message."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.comfy


def fam_of(name, fixture_checkpoints):
    from comfy_helpers import load_family

    return load_family(name, fixture_checkpoints)


def data(fam, n=2, size=8, seed=0):
    from comfy_helpers import encode

    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(n, fam.latent_channels, size, size, generator=g) * 0.5
    return {"samples": lat}, encode(fam, "a red cube")


def run(fam, latents, cond, **kw):
    from supercond.nodes.train.lora import SupercondTrainLoRA

    args = dict(steps=4, learning_rate=1e-3, rank=4, alpha=4.0, batch_size=1, grad_accumulation=1,
                prediction="auto", loss_weighting="none", min_snr_gamma=5.0, cep_gamma=0.0,
                cep_distribution="uniform", input_perturbation=0.0, offset_noise=0.0, pyramid_iterations=0,
                caption_dropout=0.0, seed=0, gradient_checkpointing=False, lr_schedule="constant",
                warmup_steps=0, max_grad_norm=1.0, save_every=0, filename_prefix="t/lora", resume=False) | kw
    return SupercondTrainLoRA.execute(fam.model, latents, cond, **args)


@pytest.mark.parametrize("name", ["eps", "flow"])
def test_trains_saves_and_loraloader_matches(name, fixture_checkpoints, loras):
    import comfy.utils
    import nodes
    from comfy_helpers import encode, sample

    fam = fam_of(name, fixture_checkpoints)
    lat, cond = data(fam)
    out = run(fam, lat, cond, steps=3, learning_rate=1e-2)
    model, path, plot, _ = out.result
    assert plot.shape[-1] == 3
    sd = comfy.utils.load_torch_file(path)
    assert sd and all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in sd)
    if name != "flow":
        assert any(k.startswith("lora_unet_down_blocks_0_attentions_0") for k in sd)
        assert any(v.dim() == 4 and v.shape[-1] == 3 for k, v in sd.items() if k.endswith("lora_down.weight"))
    loras_name = path.split("/loras/")[-1] if "/loras/" in path else path
    (loaded, _) = nodes.LoraLoader().load_lora(fam.model, fam.clip, loras_name, 1.0, 0.0)
    pos, neg = encode(fam, "a red cube"), encode(fam, "")
    a, b = sample(fam, model, pos, neg), sample(fam, loaded, pos, neg)
    base = sample(fam, fam.model, pos, neg)
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    assert not torch.allclose(a, base, atol=1e-4)  # the LoRA does something


def eps_mse(fam, model, x0, seed=5):
    """eps-MSE of a MODEL on a fixed grid of 12 sigmas across the schedule, 2 noise draws each: the
    plain objective, for before/after (a few random sigmas made the comparison flaky)."""
    import comfy.model_management as mm

    mm.load_models_gpu([model])
    from comfy_helpers import encode

    ctx = encode(fam, "a red cube")[0][0]
    g = torch.Generator().manual_seed(seed)
    table = model.get_model_object("model_sampling").sigmas
    total = 0.0
    with torch.no_grad():
        for i in torch.linspace(0, len(table) - 1, 12).long().tolist():
            s = table[i:i + 1]
            for _ in range(2):
                n = torch.randn(x0.shape, generator=g)
                x = x0 + s * n
                x0_hat = model.model.apply_model(x, s, c_crossattn=ctx)
                total += float(((x - x0_hat) / s - n).pow(2).mean())
    return total / 24


def test_loss_falls_on_an_overfit_task(fixture_checkpoints, loras):
    fam = fam_of("eps", fixture_checkpoints)
    lat, cond = data(fam, n=1)
    model = run(fam, lat, cond, steps=30, learning_rate=3e-3, rank=8, alpha=8.0).result[0]
    x0 = fam.model.model.process_latent_in(lat["samples"])  # what the trainer sees (the sampler's scale)
    assert eps_mse(fam, model, x0) < 0.5 * eps_mse(fam, fam.model, x0)  # measured 0.20


def test_cancel_keeps_a_loadable_checkpoint_and_resume_continues(fixture_checkpoints, loras, monkeypatch):
    import comfy.model_management as mm
    import comfy.utils

    fam = fam_of("eps", fixture_checkpoints)
    lat, cond = data(fam)

    def hook(value, total, preview, node_id=None):  # what ComfyUI's hook does after POST /interrupt
        if value >= 2:
            raise mm.InterruptProcessingException()

    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", hook)
    with pytest.raises(mm.InterruptProcessingException):
        run(fam, lat, cond, steps=5, filename_prefix="c/lora")
    saved = loras / "c" / "lora_000002.safetensors"
    assert saved.exists() and (loras / "c" / "lora_000002.state.pt").exists()
    assert comfy.utils.load_torch_file(str(saved))
    assert not list((loras / "c").glob(".tmp_*"))
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", None)
    model, path, _, _ = run(fam, lat, cond, steps=3, filename_prefix="c/lora", resume=True).result
    assert path.endswith("lora_000003.safetensors")


def test_resume_refuses_changed_settings_and_damaged_states(fixture_checkpoints, loras):
    """Resume names what changed instead of silently mixing two runs; a damaged .state.pt gets a message,
    not a raw unpickling error; neither touches the checkpoint on disk."""
    fam = fam_of("eps", fixture_checkpoints)
    lat, cond = data(fam)
    run(fam, lat, cond, steps=2, filename_prefix="r/lora")
    state = loras / "r" / "lora_000002.state.pt"
    for change, message in [(dict(rank=8, alpha=8.0), r"rank 4 -> 8; alpha 4.0 -> 8.0"),
                            (dict(learning_rate=5e-3), r"learning_rate 0.001 -> 0.005")]:
        with pytest.raises(ValueError, match=message):
            run(fam, lat, cond, steps=4, filename_prefix="r/lora", resume=True, **change)
    other_lat, _ = data(fam, seed=1)
    with pytest.raises(ValueError, match="other data"):
        run(fam, other_lat, cond, steps=4, filename_prefix="r/lora", resume=True)
    state.write_bytes(state.read_bytes()[:100])  # truncated, as by a full disk
    with pytest.raises(ValueError, match="lora_000002.state.pt is damaged or not a trainer state"):
        run(fam, lat, cond, steps=4, filename_prefix="r/lora", resume=True)
    assert sorted(f.name for f in (loras / "r").iterdir()) == ["lora_000002.safetensors", "lora_000002.state.pt"]
    pwned = loras / "pwned"

    class Payload:  # what a malicious state would hold: loading it unsafely would create ``pwned``
        def __reduce__(self):
            return (open, (str(pwned), "w"))

    torch.save({"step": 2, "payload": Payload()}, state)
    with pytest.raises(ValueError, match="lora_000002.state.pt holds Python objects .* refused unread"):
        run(fam, lat, cond, steps=4, filename_prefix="r/lora", resume=True)
    assert not pwned.exists()


def test_optimizer_choice_through_comfyui(fixture_checkpoints, loras):
    """The node offers what runs on this CPU (no 8-bit AdamW), trains with it, and resume refuses to
    switch optimizers midway; a prompt without the input (saved before it existed) trains with AdamW."""
    from supercond.nodes.train.lora import SupercondTrainLoRA

    (combo,) = [i for i in SupercondTrainLoRA.define_schema().inputs if i.id == "optimizer"]
    assert combo.options == ["adamw", "prodigy", "adafactor"] and combo.optional
    fam = fam_of("eps", fixture_checkpoints)
    lat, cond = data(fam)
    plain = lora_file(run(fam, lat, cond, steps=2, filename_prefix="o/plain").result[1])
    adamw = lora_file(run(fam, lat, cond, steps=2, filename_prefix="o/adamw", optimizer="adamw").result[1])
    adafactor = lora_file(run(fam, lat, cond, steps=2, filename_prefix="o/lora", optimizer="adafactor").result[1])
    assert all(torch.equal(plain[k], adamw[k]) for k in plain)
    assert any(not torch.equal(plain[k], adafactor[k]) for k in plain)
    with pytest.raises(ValueError, match="optimizer 'adafactor' -> 'prodigy'"):
        run(fam, lat, cond, steps=4, filename_prefix="o/lora", optimizer="prodigy", learning_rate=1.0, resume=True)


def test_ema_files_and_the_model_output_are_the_emas(fixture_checkpoints, loras):
    import nodes
    from comfy_helpers import encode, sample

    fam = fam_of("eps", fixture_checkpoints)
    lat, cond = data(fam)
    model, path, _, _ = run(fam, lat, cond, steps=3, save_every=2, learning_rate=1e-2, ema_decay=0.99,
                         filename_prefix="e/lora").result
    assert path.endswith("e/lora_000003_ema.safetensors")
    names = sorted(f.name for f in (loras / "e").iterdir())
    assert names == sorted(["lora_000002.safetensors", "lora_000002_ema.safetensors", "lora_000003.safetensors",
                            "lora_000003_ema.safetensors", "lora_000003.state.pt"])  # older states dropped
    ema, plain = lora_file(path), lora_file(str(loras / "e" / "lora_000003.safetensors"))
    assert any(not torch.equal(ema[k], plain[k]) for k in ema if k.endswith("up.weight"))
    (loaded, _) = nodes.LoraLoader().load_lora(fam.model, fam.clip, "e/lora_000003_ema.safetensors", 1.0, 0.0)
    pos, neg = encode(fam, "a red cube"), encode(fam, "")
    assert torch.allclose(sample(fam, model, pos, neg), sample(fam, loaded, pos, neg), atol=1e-5)


@pytest.mark.parametrize("change, message", [
    (dict(filename_prefix="../escape"), "outside the loras folder"),
    (dict(filename_prefix="/abs/x"), "relative path"),
    (dict(steps=0), "steps must be >= 1"),
    (dict(prediction="flow"), "does not fit"),
])
def test_bad_settings_fail_before_training(fixture_checkpoints, loras, change, message):
    fam = fam_of("eps", fixture_checkpoints)
    lat, cond = data(fam)
    with pytest.raises(ValueError, match=message):
        run(fam, lat, cond, **change)
    assert not list(loras.rglob("*.safetensors"))


def test_count_mismatch_and_unwritable_folder(fixture_checkpoints, loras):
    fam = fam_of("eps", fixture_checkpoints)
    lat, cond = data(fam, n=3)
    two = cond + cond
    with pytest.raises(ValueError, match="3 latents but 2 conditionings"):
        run(fam, lat, two)
    (loras / "blocked").write_text("a file where the folder should be")  # unwritable, even as root
    with pytest.raises(ValueError, match="cannot write"):
        run(fam, lat, cond, filename_prefix="blocked/x")
    assert not list(loras.rglob("*.safetensors"))


def load_dataset(fam, folder, clip=None, **kw):
    from supercond.nodes.train.dataset import SupercondLoadDataset

    args = dict(resolution=64, flip=True, random_crop=True, seed=0) | kw
    return SupercondLoadDataset.execute(folder, clip or fam.clip, fam.vae, **args).result


def test_dataset_example_cache_and_caption_dropout(fixture_checkpoints, input_dir, loras, monkeypatch):
    fam = fam_of("eps", fixture_checkpoints)
    lat, cond = load_dataset(fam, "supercond_example")
    assert lat["samples"].shape == (8, 4, 8, 8) and len(cond) == 8
    assert (input_dir / "supercond_example" / "example_00.txt").exists()
    calls = []
    with monkeypatch.context() as m:
        m.setattr(fam.vae, "encode", lambda *a: calls.append(1))
        lat2, cond2 = load_dataset(fam, "supercond_example")  # from the cache: no encoding
    assert not calls and torch.equal(lat2["samples"], lat["samples"])
    assert torch.equal(cond2[3][0], cond[3][0])


def lora_file(path: str) -> dict:
    import comfy.utils

    return comfy.utils.load_torch_file(path)


def test_caption_dropout_trains_on_the_datasets_empty_prompt(fixture_checkpoints, input_dir, loras):
    """caption_dropout 1 replaces every caption by the empty prompt the dataset attached: bit-identical
    to training on the empty prompt's encoding with dropout off."""
    from comfy_helpers import encode

    fam = fam_of("eps", fixture_checkpoints)
    lat, cond = load_dataset(fam, "supercond_example")
    lat = {"samples": lat["samples"][:2]}
    dropped = run(fam, lat, cond[:2], steps=2, caption_dropout=1.0, filename_prefix="t/drop").result[1]
    empty = run(fam, lat, encode(fam, "") * 2, steps=2, filename_prefix="t/empty").result[1]
    kept = run(fam, lat, cond[:2], steps=2, filename_prefix="t/kept").result[1]
    a, b, c = lora_file(dropped), lora_file(empty), lora_file(kept)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("setting", [dict(cep_gamma=1.0), dict(input_perturbation=0.1), dict(offset_noise=0.1),
                                     dict(pyramid_iterations=2), dict(loss_weighting="min_snr")])
def test_each_regularizer_changes_the_trained_lora(setting, fixture_checkpoints, loras):
    """Through the real ComfyUI: each regularizer on trains a different LoRA from the plain objective
    (tier A checks what exactly each one changes), and the loss stays finite."""
    fam = fam_of("eps", fixture_checkpoints)
    lat, cond = data(fam)
    name = next(iter(setting))
    plain = lora_file(run(fam, lat, cond, steps=2, filename_prefix="t/plain").result[1])
    changed = lora_file(run(fam, lat, cond, steps=2, filename_prefix=f"t/{name}", **setting).result[1])
    assert plain.keys() == changed.keys()
    assert any(not torch.equal(plain[k], changed[k]) for k in plain if k.endswith("weight"))
    assert all(torch.isfinite(v.float()).all() for v in changed.values())


def test_dataset_cache_follows_clip_skip_and_clip_loras(fixture_checkpoints, input_dir, monkeypatch):
    """The cache keys on what decides the encoding: CLIPSetLastLayer and a LoRA on the CLIP give their
    own (fresh, correct) conditionings, not the cached plain ones; the same patched CLIP again is a hit."""
    import nodes

    fam = fam_of("eps", fixture_checkpoints)
    _, plain = load_dataset(fam, "supercond_example")
    (skip,) = nodes.CLIPSetLastLayer().set_last_layer(fam.clip, -2)
    key = next(k for k in fam.clip.patcher.model.state_dict() if k.endswith("layers.0.mlp.fc1.weight"))
    weight = fam.clip.patcher.model.state_dict()[key]
    delta = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)) * 0.05
    patched = fam.clip.clone()
    patched.add_patches({key: ("diff", (delta,))}, 1.0)
    half = fam.clip.clone()
    half.add_patches({key: ("diff", (delta,))}, 0.5)
    for clip in (skip, patched, half):
        _, conds = load_dataset(fam, "supercond_example", clip=clip)
        tokens, _ = nodes.CLIPTextEncode().encode(clip, (input_dir / "supercond_example" / "example_00.txt")
                                                   .read_text())[0][0]
        assert torch.allclose(conds[0][0], tokens, atol=1e-5), "the cache returned another CLIP's encoding"
        assert not torch.allclose(conds[0][0], plain[0][0], atol=1e-4)
    calls = []
    with monkeypatch.context() as m:
        m.setattr(patched, "encode_from_tokens_scheduled", lambda *a, **k: calls.append(1))
        load_dataset(fam, "supercond_example", clip=patched)
    assert not calls, "the same patched CLIP should be a cache hit"


def test_dataset_errors_name_the_file(fixture_checkpoints, input_dir):
    from supercond.core.dataset import DatasetError

    fam = fam_of("eps", fixture_checkpoints)
    (input_dir / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        load_dataset(fam, "empty")
    d = input_dir / "bad"
    d.mkdir()
    (d / "a.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="a.png has no caption"):
        load_dataset(fam, "bad")
    (d / "a.txt").write_text("x")
    with pytest.raises(DatasetError, match="cannot read image a.png"):
        load_dataset(fam, "bad")
    with pytest.raises(DatasetError, match="outside"):
        load_dataset(fam, "../../etc")


def saved_tensors(loras, prefix: str, step: int) -> tuple[dict, list]:
    """The kohya file (fp16) and the trainer state's fp32 LoRA parameters of one checkpoint."""
    import comfy.utils

    stem = loras / f"{prefix}_{step:06d}"
    state = torch.load(f"{stem}.state.pt", weights_only=True)
    return comfy.utils.load_torch_file(f"{stem}.safetensors"), state["params"]


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_twenty_steps_equal_ten_then_resume_ten(fixture_checkpoints, loras, monkeypatch, schedule):
    """Every draw is seeded per (seed, step, micro-step) and the optimizer state is saved, so a run
    resumed at step 10 continues exactly like the straight one. Exercised with everything that
    depends on the step: epochs crossing steps (3 latents, 2 per step), grad accumulation, warmup,
    CEP, input perturbation, offset and pyramid noise, min-SNR.

    constant: a 10-step run, then resume with steps 20. cosine decays to 0 at `steps`, so a 10-step
    cosine run is a different schedule by design; there the first half is a 20-step run cancelled
    after step 10 (what a user resumes from), then resumed.

    Bit-identical on the CPU: the same ops on the same shapes in the same order, no atomics. On a
    GPU, nondeterministic kernels (e.g. atomics in conv backward) would need a tolerance, stated here."""
    import comfy.model_management as mm
    import comfy.utils

    fam = fam_of("eps", fixture_checkpoints)
    lat, cond = data(fam, n=3)
    kw = dict(learning_rate=1e-3, batch_size=1, grad_accumulation=2, lr_schedule=schedule, warmup_steps=3,
              cep_gamma=1.0, input_perturbation=0.1, offset_noise=0.1, pyramid_iterations=2,
              loss_weighting="min_snr", seed=7)
    _, straight_path, _, _ = run(fam, lat, cond, steps=20, filename_prefix="straight/lora", **kw).result
    if schedule == "constant":
        run(fam, lat, cond, steps=10, filename_prefix="resumed/lora", **kw)
    else:
        def hook(value, total, preview, node_id=None):  # Cancel after step 10
            if value == 10:
                raise mm.InterruptProcessingException()

        monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", hook)
        with pytest.raises(mm.InterruptProcessingException):
            run(fam, lat, cond, steps=20, filename_prefix="resumed/lora", **kw)
        monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", None)
    assert sorted(p.name for p in (loras / "resumed").glob("*.safetensors")) == ["lora_000010.safetensors"]
    _, resumed_path, _, _ = run(fam, lat, cond, steps=20, filename_prefix="resumed/lora", resume=True, **kw).result
    assert straight_path.endswith("straight/lora_000020.safetensors")
    assert resumed_path.endswith("resumed/lora_000020.safetensors")
    a, pa = saved_tensors(loras, "straight/lora", 20)
    b, pb = saved_tensors(loras, "resumed/lora", 20)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), (k, (a[k].float() - b[k].float()).abs().max())
    assert len(pa) == len(pb) and all(torch.equal(x, y) for x, y in zip(pa, pb, strict=True))
    # the resumed half did train: step 10 is not step 20
    mid = comfy.utils.load_torch_file(str(loras / "resumed" / "lora_000010.safetensors"))
    assert not (loras / "resumed" / "lora_000010.state.pt").exists()  # only the newest state is kept
    assert any(not torch.equal(mid[k], a[k]) for k in a if k.endswith("lora_up.weight"))


def test_cep_is_not_applied_outside_training(fixture_checkpoints, loras):
    """cep_gamma > 0 perturbs the training conditioning only: the returned MODEL samples exactly like
    the saved file loaded by the stock LoraLoader, sees the CLIPTextEncode tensors bit-for-bit at
    sampling time, and the CONDITIONING given to the node is left as it was."""
    import comfy.model_management as mm
    import nodes
    from comfy_helpers import CondRecorder, encode, sample

    fam = fam_of("eps", fixture_checkpoints)
    lat, cond = data(fam)
    before = [(t, t.clone(), dict(extra), {k: v.clone() for k, v in extra.items() if isinstance(v, torch.Tensor)})
              for t, extra in cond]
    model, path, _, _ = run(fam, lat, cond, steps=3, learning_rate=1e-2, cep_gamma=1.0, filename_prefix="cep/lora").result
    # the CONDITIONING object is untouched: same entries, same tensor objects, same values
    assert len(cond) == len(before)
    for (t, extra), (t0, v0, extra0, tensors0) in zip(cond, before, strict=True):
        assert t is t0 and torch.equal(t, v0) and extra == extra0
        assert all(torch.equal(extra[k], v) for k, v in tensors0.items())
    # CEP did act during training (else the checks below would prove nothing)
    _, plain_path, _, _ = run(fam, lat, cond, steps=3, learning_rate=1e-2, filename_prefix="plain/lora").result
    import comfy.utils

    cep_sd, plain_sd = comfy.utils.load_torch_file(path), comfy.utils.load_torch_file(plain_path)
    assert any(not torch.equal(cep_sd[k], plain_sd[k]) for k in cep_sd)

    (loaded, _) = nodes.LoraLoader().load_lora(fam.model, fam.clip, "cep/lora_000003.safetensors", 1.0, 0.0)
    pos, neg = encode(fam, "a red cube"), encode(fam, "")
    seen: list[torch.Tensor] = []

    def pre_hook(module, args, kwargs):  # what the UNet itself receives
        seen.append(kwargs["context"].detach().clone())

    rec = CondRecorder()
    handle = fam.model.model.diffusion_model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        trained = sample(fam, rec.install(model), pos, neg)
    finally:
        handle.remove()
    mm.unload_all_models()  # the next sample patches the weights afresh from `loaded`'s patches
    stock = sample(fam, loaded, pos, neg)
    assert torch.equal(trained, stock), (trained - stock).abs().max()
    assert rec.calls and seen
    for call in rec.calls:
        assert torch.equal(call[0]["c_crossattn"], pos[0][0])
        assert torch.equal(call[1]["c_crossattn"], neg[0][0])
    for ctx in seen:
        rows = [r for r in ctx]
        assert all(torch.equal(r, pos[0][0][0]) or torch.equal(r, neg[0][0][0]) for r in rows)
        assert any(torch.equal(r, pos[0][0][0]) for r in rows)


def test_interrupt_between_micro_batches_stops_within_the_step(fixture_checkpoints, loras):
    """With grad_accumulation 4 a step is 4 forward+backward passes: an interrupt raised during the
    2nd pass of step 2 (ComfyUI's real flag, as POST /interrupt sets it) stops before the 3rd pass,
    not at the end of the step, and the checkpoint kept is step 1, the last completed one."""
    import comfy.model_management as mm
    import comfy.utils

    fam = fam_of("eps", fixture_checkpoints)
    lat, cond = data(fam)
    calls = []

    def pre_hook(module, args):
        calls.append(1)
        if len(calls) == 6:  # step 2 (0-based 1), micro-batch 2
            mm.interrupt_current_processing(True)

    handle = fam.model.model.diffusion_model.register_forward_pre_hook(pre_hook)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            run(fam, lat, cond, steps=3, grad_accumulation=4, filename_prefix="m/lora")
    finally:
        handle.remove()
        mm.interrupt_current_processing(False)
    assert len(calls) == 6
    saved = sorted(p.name for p in (loras / "m").glob("*.safetensors"))
    assert saved == ["lora_000001.safetensors"]
    assert comfy.utils.load_torch_file(str(loras / "m" / saved[0]))


@pytest.mark.parametrize("name", ["eps", "flow"])
def test_trains_on_latents_as_the_sampler_feeds_them(name, fixture_checkpoints, loras, monkeypatch):
    """A LATENT is the VAE's raw output; the model must see it scaled (SD1.x) or shifted and scaled
    (SD3) by process_latent_in, as a sampler feeds it."""
    import supercond.nodes.train.lora_run as lora_run

    seen = {}
    real = lora_run.Trainer

    class Recording(real):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            seen["latents"] = self.data.stacked.clone()  # what the trainer draws its batches from

    monkeypatch.setattr(lora_run, "Trainer", Recording)
    fam = fam_of(name, fixture_checkpoints)
    lat, cond = data(fam, n=1)
    run(fam, lat, cond, steps=1)
    expected = fam.model.model.process_latent_in(lat["samples"].float())
    assert not torch.equal(expected, lat["samples"])  # the fixture's latent format does transform
    assert torch.equal(seen["latents"], expected)


def test_only_the_newest_optimizer_state_is_kept(fixture_checkpoints, loras):
    """save_every writes a LoRA per checkpoint but resume needs only the newest .state.pt."""
    fam = fam_of("eps", fixture_checkpoints)
    lat, cond = data(fam, n=1)
    (loras / "k").mkdir()
    other = loras / "k" / "lora2_000001.state.pt"  # another prefix's state is not touched
    other.write_bytes(b"x")
    run(fam, lat, cond, steps=3, save_every=1, filename_prefix="k/lora")
    names = sorted(p.name for p in (loras / "k").iterdir())
    assert names == ["lora2_000001.state.pt", "lora_000001.safetensors", "lora_000002.safetensors",
                     "lora_000003.safetensors", "lora_000003.state.pt"]


def test_gradient_checkpointing_keeps_another_packs_forward_override(comfy):
    """The blocks are shared by every clone of the MODEL: a forward another pack set on one is wrapped while
    training (still called, under checkpointing) and is the same object afterwards (issue 16's review)."""
    from torch import nn

    from supercond.nodes.train.model import checkpointing

    net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    calls = []
    theirs = net[0].forward

    def other_pack(x):
        calls.append(1)
        return theirs(x)

    net[0].forward = other_pack
    x = torch.randn(2, 3, requires_grad=True)
    with checkpointing(net, True):
        assert net[0].forward is not other_pack and "forward" in net[1].__dict__
        net(x).sum().backward()
    assert calls and net[0].forward is other_pack  # kept, and it ran inside the checkpoint
    assert "forward" not in net[1].__dict__  # the block without an override gets its class forward back


def test_training_leaves_every_other_clone_as_it_was(fixture_checkpoints, loras, input_dir):
    """The diffusion model and the text encoder are shared by every clone: after training (with the text
    encoder too) their Parameter objects and requires_grad are the same, another pack's wrapper on a clone
    still runs, and that clone samples bit-identically (issue 16: the trainer used to replace them)."""
    import comfy.model_management as mm
    import comfy.patcher_extension as pe
    from comfy_helpers import encode, sample

    from supercond.nodes.train.dataset import SupercondLoadDataset

    fam = fam_of("eps", fixture_checkpoints)
    lat, cond = SupercondLoadDataset.execute("supercond_example", fam.clip, fam.vae, 64, False, False, 0).result
    lat, cond = {"samples": lat["samples"][:2]}, cond[:2]  # with captions, for the text encoder's LoRA
    other = fam.model.clone()
    calls = []

    def their_wrapper(executor, *args, **kwargs):
        calls.append(1)
        return executor(*args, **kwargs)

    other.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, "another.pack", their_wrapper)
    pos, neg = encode(fam, "a red cube"), encode(fam, "")
    mm.load_models_gpu([other])
    image = sample(fam, other, pos, neg)
    shared = {"unet": fam.model.model.diffusion_model, "clip": fam.clip.cond_stage_model}
    before = {(m, k): (p, p.requires_grad) for m, mod in shared.items() for k, p in mod.named_parameters()}
    run(fam, lat, cond, steps=2, clip=fam.clip, text_encoder_lr=1e-3)
    after = {(m, k): (p, p.requires_grad) for m, mod in shared.items() for k, p in mod.named_parameters()}
    replaced = [k for k in before if after[k][0] is not before[k][0] or after[k][1] != before[k][1]]
    assert not replaced, f"{len(replaced)} shared parameters replaced, e.g. {replaced[:3]}"
    calls.clear()
    assert torch.equal(sample(fam, other, pos, neg), image)
    assert calls, "another pack's wrapper was dropped"


def test_out_of_memory_is_an_error_not_a_killed_server(comfy):
    """On the CPU the kernel kills a process that allocates past the machine's memory (the stress fuzzer's
    head batch_size 3543 took the server down): inside memory_guard such an allocation fails as an error
    naming what to lower, and the address-space cap is put back afterwards."""
    import resource

    import psutil

    from supercond.nodes.errors import InputError
    from supercond.nodes.train.run import memory_guard

    before = resource.getrlimit(resource.RLIMIT_AS)
    too_much = int(0.95 * psutil.virtual_memory().available)  # without the cap: mapped lazily, no error
    with pytest.raises(InputError, match="SupercondTrainLoRA ran out of memory .*: lower batch_size"):
        with memory_guard("SupercondTrainLoRA", "lower batch_size"):
            torch.empty(too_much, dtype=torch.uint8)  # not touched: without the cap, no page is used
    assert resource.getrlimit(resource.RLIMIT_AS) == before
    with memory_guard("x", "y"):
        assert torch.ones(1000).sum() == 1000  # an ordinary run is untouched
