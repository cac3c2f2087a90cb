"""Tier A: the trainer's objective, LoRA module and loop on a toy denoiser (no ComfyUI)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from supercond.core import objective as obj
from supercond.core.files import save_atomic
from supercond.core.lora import LoRANetwork
from supercond.core.seeds import seeded_generator
from supercond.core.train import TrainConfig, Trainer, TrainError, batch_cond

SIG = torch.tensor([0.05, 0.3, 1.0, 4.0, 14.6])
T = torch.tensor([0.02, 0.3, 0.5, 0.9, 0.999])


# -- objective formulas (research/trainer.md section 5) --------------------------------------------
def test_targets_and_predictions_invert_comfy_denoise():
    x0, eps = torch.randn(5, 4, 3, 3), torch.randn(5, 4, 3, 3)
    for kind, s in (("eps", SIG), ("v", SIG), ("flow", T)):
        x = obj.noisy_input(kind, x0, eps, s)
        target = obj.native_target(kind, x0, eps, s)
        # the true x0 gives back the true target (ComfyUI's calculate_denoised, inverted)
        assert torch.allclose(obj.native_prediction(kind, x, x0, s), target, atol=1e-4)
    c = SIG.view(-1, 1, 1, 1)
    alpha, sd = 1 / torch.sqrt(1 + c**2), c / torch.sqrt(1 + c**2)
    assert torch.allclose(obj.native_target("v", x0, eps, SIG), alpha * eps - sd * x0, atol=1e-6)
    assert torch.allclose(obj.native_target("flow", x0, eps, T), eps - x0)
    assert torch.allclose(obj.noisy_input("flow", x0, eps, T), T.view(-1, 1, 1, 1) * eps + (1 - T.view(-1, 1, 1, 1)) * x0)


def test_min_snr_and_debiased_weights_match_the_formulas():
    g = 5.0
    snr = 1 / SIG**2
    assert torch.allclose(obj.loss_weight("min_snr", "eps", SIG, g), torch.minimum(snr, torch.tensor(g)) / snr)
    assert torch.allclose(obj.loss_weight("min_snr", "v", SIG, g), torch.minimum(snr, torch.tensor(g)) / (snr + 1))
    assert torch.allclose(obj.loss_weight("min_snr", "flow", T, g), torch.minimum((1 - T) ** 2, g * T**2))
    assert torch.allclose(obj.loss_weight("debiased", "eps", SIG), 1 / torch.sqrt(snr.clamp(max=1000)))
    assert torch.allclose(obj.loss_weight("debiased", "v", SIG), torch.sqrt(snr.clamp(max=1000)) / (snr.clamp(max=1000) + 1))
    assert torch.allclose(obj.loss_weight("debiased", "flow", T[1:]), T[1:] * (1 - T[1:]))
    # the clamp holds on flow too: at t = 0.02 the SNR (49^2) is past 1000, so t^2 sqrt(1000), not t(1 - t)
    assert obj.loss_weight("debiased", "flow", T[:1]).item() == pytest.approx(0.02**2 * math.sqrt(1000))
    assert torch.equal(obj.loss_weight("none", "eps", SIG), torch.ones(5))
    # flow min-SNR peaks at t* = 1/(1+sqrt(gamma))
    t = torch.linspace(0.001, 0.999, 9999)
    w = obj.loss_weight("min_snr", "flow", t, g)
    assert abs(float(t[w.argmax()]) - 1 / (1 + math.sqrt(g))) < 1e-3


def test_lr_schedule():
    assert obj.lr_factor("constant", 0, 10, 2) == 0.5
    assert obj.lr_factor("cosine", 2, 10, 2) == 1.0
    assert obj.lr_factor("cosine", 10, 10, 2) == pytest.approx(0.0)


# -- LoRA ------------------------------------------------------------------------------------------
class Toy(nn.Module):
    """A tiny conditional denoiser: conv + linear on the cond, returns an x0 estimate."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.lin = nn.Linear(8, 4)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        self.requires_grad_(False)

    def forward(self, x, sigma, rows):
        c = self.lin(batch_cond(rows)["cross_attn"].mean(1))[:, :, None, None]
        return x / (1 + sigma.view(-1, 1, 1, 1) ** 2) + self.conv(x) * 0.1 + c


def make(cfg: TrainConfig, n=4, empty=True):
    torch.manual_seed(123)  # the trainer must not depend on it
    model = Toy()
    net = LoRANetwork({"lora_unet_conv": model.conv, "lora_unet_lin": model.lin}, cfg.rank, cfg.alpha,
                      seeded_generator(cfg.seed, 1))
    g = torch.Generator().manual_seed(1)
    lat = torch.randn(n, 4, 4, 4, generator=g)
    conds = [{"cross_attn": torch.randn(1, 3, 8, generator=g), "pooled_output": torch.randn(1, 8, generator=g)}
             for _ in range(n)]
    e = {"cross_attn": torch.zeros(1, 3, 8), "pooled_output": torch.zeros(1, 8)} if empty else None
    sig = torch.linspace(0.03, 14.6, 1000) if cfg.prediction != "flow" else torch.linspace(0.001, 1, 1000)
    tr = Trainer(cfg, list(net.parameters()), model, sig, lat, conds, e)
    return tr, net, model


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**({"steps": 20, "learning_rate": 1e-2, "rank": 2, "alpha": 2.0, "batch_size": 2} | kw))


def test_lora_starts_at_zero_and_hooks_are_removed():
    tr, net, model = make(cfg())
    x = torch.randn(2, 4, 4, 4)
    base = model.conv(x)
    with net.attached():
        assert torch.equal(model.conv(x), base)  # up = 0
        net.loras["lora_unet_conv"].up.weight.data.fill_(0.1)
        assert not torch.equal(model.conv(x), base)
    assert torch.equal(model.conv(x), base)
    sd = net.kohya_state_dict()
    assert sd["lora_unet_conv.lora_down.weight"].shape == (2, 4, 3, 3)
    assert sd["lora_unet_conv.lora_up.weight"].shape == (4, 2, 1, 1)
    assert sd["lora_unet_lin.alpha"].dim() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hooked_layers_add_the_scaled_delta_in_the_activation_dtype(dtype):
    """The fused hook (addmm for Linear, scale on the hidden for Conv2d) equals W x + (alpha/rank) up(down x),
    also for a layer running in bf16 with fp32 LoRA weights, and gradients reach the fp32 weights."""
    lin, conv = nn.Linear(6, 5).to(dtype), nn.Conv2d(3, 4, 3, padding=1).to(dtype)
    net = LoRANetwork({"lin": lin, "conv": conv}, rank=2, alpha=3.0, generator=torch.Generator().manual_seed(1))
    for _, mod in net.named_loras():
        mod.up.weight.data.normal_(generator=torch.Generator().manual_seed(2))
    x, img = torch.randn(2, 7, 6, dtype=dtype), torch.randn(1, 3, 5, 5, dtype=dtype)
    lo, co = net.loras["lin"], net.loras["conv"]
    want_lin = lin(x).float() + 1.5 * (x.float() @ lo.down.weight.T @ lo.up.weight.T)
    want_conv = conv(img).float() + 1.5 * nn.functional.conv2d(
        nn.functional.conv2d(img.float(), co.down.weight, padding=1), co.up.weight)
    with net.attached():
        got_lin, got_conv = lin(x), conv(img)
        (got_lin.float().sum() + got_conv.float().sum()).backward()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert got_lin.dtype == got_conv.dtype == dtype
    torch.testing.assert_close(got_lin.float(), want_lin, rtol=tol, atol=tol)
    torch.testing.assert_close(got_conv.float(), want_conv, rtol=tol, atol=tol)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0
               for p in net.parameters())


def test_adamw_is_fused_where_torch_has_it():
    from supercond.core import optim

    p = nn.Parameter(torch.zeros(3))
    assert optim.make("adamw", [p], 1e-3).defaults["fused"] is True  # CPU, torch >= 2.4
    assert optim.make("adamw", [{"params": [p], "lr": 1e-4}], 1e-3).defaults["fused"] is True


def test_save_is_atomic(tmp_path):
    p = save_atomic(tmp_path / "a.safetensors", {"x": torch.zeros(2)}, {"k": "v"})
    assert p.exists() and not list(tmp_path.glob(".tmp_*"))
    with pytest.raises((TypeError, ValueError, AttributeError)):
        save_atomic(tmp_path / "b.safetensors", {"x": "not a tensor"}, {})
    assert not (tmp_path / "b.safetensors").exists() and not list(tmp_path.glob(".tmp_*"))


@pytest.mark.parametrize("writer", ["safetensors", "torch"])
def test_a_full_disk_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch, writer):
    """Each writer's own failure text on a full disk (measured on a 64 kB tmpfs) becomes one readable error;
    the file already there is unchanged and no temporary file is left."""
    import safetensors.torch

    from supercond.core import files

    path = tmp_path / ("a.safetensors" if writer == "safetensors" else "a.state.pt")
    save = (lambda: files.save_atomic(path, {"x": torch.ones(3)}, {})) if writer == "safetensors" else \
        (lambda: files.torch_save_atomic(path, {"x": torch.ones(3)}))
    save()
    before = path.read_bytes()
    failures = {"safetensors": ("save_file", "Error while serializing: I/O error: No space left on device "
                                             "(os error 28)"),
                "torch": ("save", "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")}
    name, text = failures[writer]

    def full_disk(_obj, tmp, *args, **kwargs):
        Path(tmp).write_bytes(b"half a file")
        raise RuntimeError(text)

    monkeypatch.setattr(safetensors.torch if writer == "safetensors" else torch, name, full_disk)
    with pytest.raises(files.WriteError, match=r"could not write a\.(safetensors|state\.pt) in .*: the (disk is "
                       r"full|write stopped short \(is the disk full\?\)); the file already there was kept"):
        save()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_temporary_files_of_stopped_processes_are_swept_and_live_ones_kept(tmp_path):
    import subprocess
    import sys

    from supercond.core.files import sweep_stale_temps

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / f".tmp_{int(dead.stdout)}_x.safetensors").write_bytes(b"half")
    (tmp_path / f".tmp_{os.getpid()}_y.safetensors").write_bytes(b"being written")
    (tmp_path / "lora_000001.safetensors").write_bytes(b"kept")
    assert sweep_stale_temps(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".tmp_{os.getpid()}_y.safetensors",
                                                         "lora_000001.safetensors"]


# -- the loop --------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction", ["eps", "v", "flow"])
def test_loss_falls_on_overfit_toy(prediction):
    tr, net, model = make(cfg(prediction=prediction, steps=60, learning_rate=3e-2))
    batches = [tr.batch(s, 0) for s in range(8)]
    with net.attached():
        with torch.no_grad():
            before = sum(float(tr.loss(b)) for b in batches)
        for _ in range(60):
            tr.train_step()
        with torch.no_grad():
            after = sum(float(tr.loss(b)) for b in batches)
    assert after < 0.95 * before


def test_regularizers_off_is_the_plain_objective():
    tr, net, model = make(cfg(prediction="eps"))
    b = tr.batch(3, 0)
    idx = tr.indices(3, 0)
    g = seeded_generator(0, 0, 3, 0)
    sigma = tr.sigmas[torch.randint(1000, (2,), generator=g)]
    noise = torch.randn(2, 4, 4, 4, generator=g)
    assert torch.equal(b.sigma, sigma) and torch.equal(b.noise, noise)
    assert torch.equal(b.x_in, tr.latents[idx] + sigma.view(-1, 1, 1, 1) * noise)
    assert torch.equal(b.target, noise)
    assert torch.equal(batch_cond(b.cond)["cross_attn"], torch.cat([tr.conds[i]["cross_attn"] for i in idx]))
    with net.attached():
        x0_hat = model(b.x_in, b.sigma, b.cond)
        plain = ((b.x_in - x0_hat) / sigma.view(-1, 1, 1, 1) - noise).pow(2).mean()
        assert torch.allclose(tr.loss(b), plain, rtol=1e-6, atol=0)


def test_each_regularizer_changes_exactly_what_it_should():
    ref = make(cfg())[0].batch(2, 0)

    def diff(**kw):
        b = make(cfg(**kw))[0].batch(2, 0)
        return {k: not torch.equal(getattr(b, k), getattr(ref, k)) for k in ("x0", "sigma", "noise", "x_in", "target")} | {
            "cond": not torch.equal(batch_cond(b.cond)["cross_attn"], batch_cond(ref.cond)["cross_attn"])}

    assert diff(input_perturbation=0.1) == {"x0": False, "sigma": False, "noise": False, "x_in": True,
                                            "target": False, "cond": False}
    assert diff(offset_noise=0.1) == {"x0": False, "sigma": False, "noise": True, "x_in": True,
                                      "target": True, "cond": False}
    assert diff(pyramid_iterations=2)["noise"] and not diff(pyramid_iterations=2)["cond"]
    assert diff(cep_gamma=1.0) == {"x0": False, "sigma": False, "noise": False, "x_in": False,
                                   "target": False, "cond": True}
    assert diff(caption_dropout=1.0)["cond"] and not diff(caption_dropout=1.0)["x_in"]
    # input perturbation: x_in = x0 + sigma*(eps + gamma*xi), target still eps
    b = make(cfg(input_perturbation=0.1))[0].batch(2, 0)
    xi = torch.randn(b.x0.shape, generator=seeded_generator(0, 2, 2, 0))
    assert torch.allclose(b.x_in, b.x0 + b.sigma.view(-1, 1, 1, 1) * (ref.noise + 0.1 * xi), atol=1e-6)
    # offset noise: per-(row, channel) constant shift of the noise
    off = make(cfg(offset_noise=0.1))[0].batch(2, 0).noise - ref.noise
    assert torch.allclose(off, off.mean(dim=(2, 3), keepdim=True), atol=1e-6)


def test_resume_equals_straight_run():
    a, net_a, _ = make(cfg(steps=8, cep_gamma=1.0, input_perturbation=0.1, offset_noise=0.05))
    with net_a.attached():
        for _ in range(8):
            a.train_step()
    b, net_b, _ = make(cfg(steps=8, cep_gamma=1.0, input_perturbation=0.1, offset_noise=0.05))
    with net_b.attached():
        for _ in range(4):
            b.train_step()
    state = b.state_dict()
    c, net_c, _ = make(cfg(steps=8, cep_gamma=1.0, input_perturbation=0.1, offset_noise=0.05), n=4)
    c.load_state_dict(state)
    with net_c.attached():
        for _ in range(4):
            c.train_step()
    assert a.losses == c.losses
    for p, q in zip(net_a.parameters(), net_c.parameters(), strict=True):
        assert torch.equal(p, q)


def test_resume_refuses_other_settings_or_data_naming_what_changed(caplog):
    b, net_b, _ = make(cfg(steps=4))
    with net_b.attached():
        b.train_step()
    state = b.state_dict()
    longer, _, _ = make(cfg(steps=40))  # only steps may change
    longer.load_state_dict(state)
    assert longer.step == 1
    other, _, _ = make(cfg(steps=4, learning_rate=2e-2, offset_noise=0.1))
    with pytest.raises(TrainError, match=r"learning_rate 0.01 -> 0.02; offset_noise 0.0 -> 0.1"):
        other.load_state_dict(state)
    fewer, _, _ = make(cfg(steps=4), n=3)
    with pytest.raises(TrainError, match="other data"):
        fewer.load_state_dict(state)
    with pytest.raises(TrainError, match="not a Supercond trainer state"):
        fewer.load_state_dict({"step": 1})
    old = {k: v for k, v in state.items() if k not in ("config", "data")}  # written before they were recorded
    legacy, _, _ = make(cfg(steps=4))
    with caplog.at_level("WARNING", logger="supercond"):
        legacy.load_state_dict(old)
    assert legacy.step == 1 and "older Supercond" in caplog.text


def fixed_loss(tr: Trainer, batches) -> float:
    with torch.no_grad():
        return sum(float(tr.loss(b)) for b in batches)


@pytest.mark.parametrize("name, steps", [("adamw", 60), ("adafactor", 60), ("prodigy", 300)])
def test_every_optimizer_trains_and_resumes_exactly(name, steps):
    """Each optimizer available on the CPU trains the LoRA (adamw and adafactor lower the loss on the
    overfit toy; prodigy's step-size estimate grows from its tiny start), and a run resumed halfway
    (its optimizer state included) ends bit-identical to a straight one."""
    settings = cfg(steps=steps, optimizer=name, learning_rate=1.0 if name == "prodigy" else 3e-2)
    a, net_a, _ = make(settings)
    batches = [a.batch(s, 0) for s in range(8)]
    with net_a.attached():
        before = fixed_loss(a, batches)
        for _ in range(steps):
            a.train_step()
        after = fixed_loss(a, batches)
    if name == "prodigy":
        assert a.optimizer.param_groups[0]["d"] > 10 * a.optimizer.param_groups[0]["d0"]
    else:
        assert after < 0.95 * before
    b, net_b, _ = make(settings)
    with net_b.attached():
        for _ in range(steps // 2):
            b.train_step()
    c, net_c, _ = make(settings)
    c.load_state_dict(b.state_dict())
    with net_c.attached():
        for _ in range(steps - steps // 2):
            c.train_step()
    assert a.losses == c.losses
    assert all(torch.equal(p, q) for p, q in zip(net_a.parameters(), net_c.parameters(), strict=True))


def test_ema_follows_the_warmed_up_formula_and_resumes():
    tr, net, _ = make(cfg(steps=6, ema_decay=0.9))
    start = [p.detach().clone() for p in tr.params]
    expected = [s.clone() for s in start]
    with net.attached():
        for t in range(6):
            tr.train_step()
            d = min(0.9, (1 + t) / (10 + t))
            expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, tr.params, strict=True)]
    assert all(torch.allclose(e, x, atol=1e-7) for e, x in zip(tr.ema, expected, strict=True))
    own = [p.detach().clone() for p in tr.params]
    with tr.ema_applied():
        assert all(torch.equal(p, e) for p, e in zip(tr.params, tr.ema, strict=True))
    assert all(torch.equal(p, o) for p, o in zip(tr.params, own, strict=True))
    assert not all(torch.equal(e, o) for e, o in zip(tr.ema, own, strict=True))
    half, net_h, _ = make(cfg(steps=6, ema_decay=0.9))
    with net_h.attached():
        for _ in range(3):
            half.train_step()
    resumed, net_r, _ = make(cfg(steps=6, ema_decay=0.9))
    resumed.load_state_dict(half.state_dict())
    with net_r.attached():
        for _ in range(3):
            resumed.train_step()
    assert all(torch.equal(a, b) for a, b in zip(tr.ema, resumed.ema, strict=True))
    with pytest.raises(TrainError, match="ema_decay must be in"):
        make(cfg(ema_decay=1.0))


def test_optimizers_that_cannot_run_are_refused():
    from supercond.core import optim

    assert optim.available("cpu") == ["adamw", "prodigy", "adafactor"]  # bitsandbytes' 8-bit AdamW is CUDA-only
    with pytest.raises(TrainError, match=r"'adamw8bit' is not available on cpu here; choose one of"):
        make(cfg(optimizer="adamw8bit"))
    with pytest.raises(TrainError, match="optimizer must be one of"):
        make(cfg(optimizer="sgd"))


def test_bad_input_is_refused_with_a_clear_message():
    with pytest.raises(TrainError, match="steps must be >= 1"):
        make(cfg(steps=0))
    with pytest.raises(TrainError, match="caption_dropout needs"):
        make(cfg(caption_dropout=0.5), empty=False)
    tr, net, model = make(cfg())
    with pytest.raises(TrainError, match="empty"):
        Trainer(cfg(), list(net.parameters()), model, tr.sigmas, torch.zeros(0, 4, 4, 4), tr.conds)
    with pytest.raises(TrainError, match="4 latents but 3 conditionings"):
        Trainer(cfg(), list(net.parameters()), model, tr.sigmas, tr.latents, tr.conds[:3])


def test_nan_loss_stops_before_the_update():
    from supercond.core.train import NaNLoss

    tr, net, model = make(cfg())
    before = [p.clone() for p in net.parameters()]
    tr.denoise = lambda x, s, c: model(x, s, c) * float("nan")
    with net.attached(), pytest.raises(NaNLoss):
        tr.train_step()
    assert all(torch.equal(p, q) for p, q in zip(before, net.parameters(), strict=True))


def test_ranks_split_one_global_batch_and_their_mean_loss_is_the_global_one():
    """Data-parallel: each rank of two draws the same global batch as one process and takes its half; the
    mean of the ranks' losses (what DDP's averaged gradients follow) is the one-process loss."""
    whole, net, model = make(cfg(batch_size=4, cep_gamma=0.5, offset_noise=0.1))
    ranks = [Trainer(whole.cfg, list(net.parameters()), model, whole.sigmas, whole.latents, whole.conds,
                     whole.empty, shard=(r, 2)) for r in range(2)]
    full = whole.batch(3, 0)
    halves = [t.batch(3, 0) for t in ranks]
    for name in ("indices", "x0", "noise", "x_in", "sigma", "target"):
        assert torch.equal(torch.cat([getattr(h, name) for h in halves]), getattr(full, name)), name
    for a, b in zip([row for h in halves for row in h.cond], full.cond, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        mean = sum(float(t.loss(h)) for t, h in zip(ranks, halves, strict=True)) / 2
        assert mean == pytest.approx(float(whole.loss(full)), rel=1e-6)
    with pytest.raises(TrainError, match="cannot be split evenly over 2 processes"):
        Trainer(cfg(batch_size=3), list(net.parameters()), model, whole.sigmas, whole.latents, whole.conds,
                shard=(0, 2))
    # A bucket's last micro-batch of one row on two ranks: rank 0 takes part at weight 0, rank 1 counts twice.
    assert ranks[0]._slice(1) == (slice(0, 1), 0.0) and ranks[1]._slice(1) == (slice(0, 1), 2.0)
    assert ranks[0]._slice(3) == (slice(0, 1), 2 / 3) and ranks[1]._slice(3) == (slice(1, 3), 4 / 3)
