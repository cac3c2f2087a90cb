"""Tier A: the head-training core (core/head_train.py, core/head_objective.py) on toy tensors."""

from __future__ import annotations

import threading

import pytest
import torch

from supercond.core import head_objective as ho
from supercond.core import head_train as ht
from supercond.core.head_train import (
    HeadTrainConfig,
    HeadTrainer,
    TrajectoryPool,
    epoch_indices,
    merged_state,
)
from supercond.core.lora import LoRANetwork
from supercond.core.seeds import seeded_generator

SIGMAS = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.0])  # K = 4 states per lap


def pool(n=4, seed=0, **kw):
    return TrajectoryPool(SIGMAS, n, (1, 2, 2), lambda z: z * 8.0, n_prompts=3, cfg_min=3.0, cfg_max=9.0,
                          seed=seed, **kw)


def test_pool_follows_euler_steps_of_the_guided_prediction():
    p = pool(n=1)
    x, sigma, scale, prompt = p.batch()
    assert sigma.tolist() == [8.0] and 3.0 <= float(scale) <= 9.0 and 0 <= int(prompt) < 3
    d = torch.full_like(x, 0.5)
    p.advance(d)  # x + (x - D)/8 * (4 - 8) = (x + D)/2
    assert torch.allclose(p.x, (x + d) / 2)
    assert p.batch()[1].tolist() == [4.0]


def test_pool_staggers_the_first_lap_and_restarts_finished_chains_from_seeded_noise():
    p = pool(n=4)
    assert p.stop.tolist() == [4, 3, 2, 1]  # chain j's first lap is cut by j*K/n steps
    seen = []
    for _ in range(6):
        seen.append(p.batch()[1].tolist())
        p.advance(torch.zeros_like(p.x))
    assert seen[0] == [8.0] * 4
    assert len(set(seen[2])) > 1, "after a few steps a batch mixes sigmas"
    # first laps of 4, 3, 2, 1 steps, then 4 each: after 6 steps chains 2 and 3 are on their third lap
    assert p.lap.tolist() == [1, 1, 2, 2]
    # A restart draws the (chain, lap) noise, whatever happened before.
    q = pool(n=4)
    q.lap[2] = 3
    q._restart(2)
    fresh = torch.randn((1, 2, 2), generator=seeded_generator(0, 2, 2, 3)) * 8.0
    assert torch.equal(q.x[2], fresh)


def test_pool_state_round_trips():
    a, b = pool(seed=5), pool(seed=5)
    for _ in range(3):
        a.advance(a.x * 0.1)
    b.load_state_dict(a.state_dict())
    for _ in range(4):
        a.advance(a.x * 0.1)
        b.advance(b.x * 0.1)
    assert torch.equal(a.x, b.x) and torch.equal(a.lap, b.lap) and torch.equal(a.scale, b.scale)


def test_pool_refuses_a_schedule_without_states():
    with pytest.raises(ho.HeadTrainError, match="positive sigma"):
        TrajectoryPool(torch.tensor([0.0]), 2, (1,), lambda z: z, 1, 3.0, 9.0, 0)


def test_epoch_indices_cover_each_sample_once_per_epoch():
    got = torch.cat([epoch_indices(6, 4, s * 4, seed=1) for s in range(3)])  # 12 draws = 2 epochs
    assert sorted(got[:6].tolist()) == list(range(6)) and sorted(got[6:].tolist()) == list(range(6))


def test_gist_gradient_reaches_the_uncond_output_only_on_rolled_samples():
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(6, 2, 3, 3, generator=g, requires_grad=True)
    uncond = torch.randn(6, 2, 3, 3, generator=g, requires_grad=True)
    target = torch.randn(6, 2, 3, 3, generator=g)
    rolled = torch.tensor([True, False, False, True, False, False])
    ho.gist_loss(cond, uncond, target, rolled).backward()
    per_u = uncond.grad.flatten(1).abs().sum(1)
    per_c = cond.grad.flatten(1).abs().sum(1)
    assert (per_u[~rolled] == 0).all() and (per_u[rolled] > 0).all()
    assert (per_c[rolled] == 0).all() and (per_c[~rolled] > 0).all()


class Toy:
    """A 'model' whose cond and uncond x0 predictions are fixed linear maps of x; the head is a 1x1 conv
    on the features (x itself), initialised to the cond map (a fresh head predicts the cond)."""

    def __init__(self):
        g = torch.Generator().manual_seed(3)
        self.wc = torch.randn(2, 2, generator=g) * 0.3
        self.wu = self.wc + torch.randn(2, 2, generator=g) * 0.1

    def apply(self, w, x):
        return torch.einsum("oc,bchw->bohw", w, x)

    def teach(self, x, sigma, prompt, negative=None):
        return self.apply(self.wc, x), self.apply(self.wu, x), x

    def head(self):
        conv = torch.nn.Conv2d(2, 2, 1, bias=False)
        with torch.no_grad():
            conv.weight.copy_(self.wc[:, :, None, None])
        return conv


def distill_run(steps, resume_at=None, seed=0):
    toy = Toy()
    cfg = HeadTrainConfig("distill", steps, 3e-2, 3.0, 9.0, seed, 4, "eps")

    def make():
        head = toy.head()
        p = TrajectoryPool(SIGMAS, 4, (2, 3, 3), lambda z: z * 8.0, 1, 3.0, 9.0, seed)
        return head, HeadTrainer(cfg, list(head.parameters()), lambda f, x, s: head(f), torch.tensor([1.0]),
                                 teach=toy.teach, pool=p)

    head, tr = make()
    while tr.step < steps:
        tr.train_step()
        if resume_at is not None and tr.step == resume_at:
            state = tr.state_dict()
            head, tr = make()
            tr.load_state_dict(state)
    return toy, head, tr


def test_distillation_learns_the_uncond_and_resume_equals_a_straight_run():
    toy, head, tr = distill_run(40)
    err = (head.weight[:, :, 0, 0] - toy.wu).norm() / (toy.wc - toy.wu).norm()
    assert err < 0.2, err
    assert tr.losses[-1] < 0.1 * tr.losses[0]
    _, head2, tr2 = distill_run(40, resume_at=20)
    assert torch.equal(head.weight, head2.weight) and tr.losses == tr2.losses


def test_nan_loss_stops_before_the_update():
    toy = Toy()
    head = toy.head()
    before = head.weight.detach().clone()
    cfg = HeadTrainConfig("distill", 3, 1e-2, 3.0, 9.0, 0, 2, "eps")
    p = TrajectoryPool(SIGMAS, 2, (2, 3, 3), lambda z: z * 8.0, 1, 3.0, 9.0, 0)
    tr = HeadTrainer(cfg, list(head.parameters()), lambda f, x, s: head(f) * float("nan"), torch.tensor([1.0]),
                     teach=toy.teach, pool=p)
    from supercond.core.train import NaNLoss

    with pytest.raises(NaNLoss):
        tr.train_step()
    assert torch.equal(head.weight, before) and tr.step == 0


@pytest.mark.parametrize("layer", [torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Linear(5, 4)])
def test_a_lora_merged_into_the_head_gives_the_attached_output(layer):
    head = torch.nn.Sequential(layer)
    lora = LoRANetwork({"0": layer}, 2, 3.0, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for m in lora.loras.values():
            m.up.weight.normal_(generator=torch.Generator().manual_seed(1))
    x = torch.randn(2, 3, 6, 6) if isinstance(layer, torch.nn.Conv2d) else torch.randn(2, 5)
    with lora.attached(), torch.no_grad():
        want = head(x)
    merged = torch.nn.Sequential(type(layer)(*(
        (3, 4, 3) if isinstance(layer, torch.nn.Conv2d) else (5, 4)), **(
        {"padding": 1} if isinstance(layer, torch.nn.Conv2d) else {})))
    merged.load_state_dict(merged_state(head, lora))
    with torch.no_grad():
        assert torch.allclose(merged(x), want, atol=1e-5)


@pytest.mark.parametrize("bad, message", [
    (dict(steps=0), "steps must be >= 1"),
    (dict(cfg_min=9.0, cfg_max=3.0), "cfg_min <= cfg_max"),
    (dict(mode="other"), "mode must be one of"),
])
def test_config_refuses_bad_settings(bad, message):
    with pytest.raises(ho.HeadTrainError, match=message):
        HeadTrainConfig(**bad).validate()


def test_distill_weight_is_half_flat_and_normalised():
    g = torch.Generator().manual_seed(0)
    s = ho.sample_scales(200_000, 3.0, 9.0, g)
    gap = ho.mean_square_gap(3.0, 9.0)
    assert abs(float((s - 1).pow(2).mean()) / gap - 1) < 0.01  # the closed form
    assert ho.distill_floor(3.0, 9.0) == gap  # half of the mean weight is flat
    ones = torch.ones(len(s), 1)
    # per-sample error 1 everywhere: the normalised weights average to 1 for any range
    assert abs(float(ho.distill_loss(ones, torch.zeros_like(ones), s, 3.0, 9.0)) - 1) < 0.01
    # a high scale weighs more than a low one, at most (8^2 + gap) / gap times
    hi = ho.distill_loss(ones[:1], torch.zeros(1, 1), torch.tensor([9.0]), 3.0, 9.0)
    lo = ho.distill_loss(ones[:1], torch.zeros(1, 1), torch.tensor([3.0]), 3.0, 9.0)
    assert 1 < float(hi / lo) <= (64 + gap) / gap
    # the range [1, 1] is the plain MSE
    assert float(ho.distill_loss(ones, torch.zeros_like(ones), torch.ones(len(s)), 1.0, 1.0)) == 1.0


class GistToy:
    """A 'model' for gist mode with a trainable backbone: features ``A x + caption`` (A stands for a LoRA on
    the model), cond x0 ``features + b`` (b: a parameter only the cond output uses), head x0 ``H features``."""

    def __init__(self):
        g = torch.Generator().manual_seed(4)
        self.a = torch.nn.Parameter(torch.eye(2) + 0.1 * torch.randn(2, 2, generator=g))
        self.b = torch.nn.Parameter(torch.zeros(1, 2, 1, 1))
        self.h = torch.nn.Parameter(torch.eye(2) + 0.1 * torch.randn(2, 2, generator=g))
        self.caption = torch.randn(4, 2, 1, 1, generator=g)

    def forward(self, x, sigma, captions):
        f = torch.einsum("oc,bchw->bohw", self.a, x) + self.caption[captions]
        return f + self.b, f

    def head(self, feats, x, sigma):
        return torch.einsum("oc,bchw->bohw", self.h, feats)

    def trainer(self, latents, seed, steps=1, max_grad_norm=0.0):
        cfg = HeadTrainConfig("gist", steps, 1e-2, 3.0, 9.0, seed, 4, "eps", max_grad_norm)
        return HeadTrainer(cfg, [self.h], self.head, torch.tensor([0.5, 1.0, 2.0]), forward=self.forward,
                           latents=latents, captions=torch.arange(4), backbone=[self.a, self.b])


def gist_step0(seed):
    idx = epoch_indices(4, 4, 0, seed)
    _, rolled = ho.swap_captions(torch.arange(4), torch.arange(4), ho.GIST_FRACTION,
                                 seeded_generator(seed, ht._DRAW, 0))
    return idx, rolled


def gist_grads(latents, seed, max_grad_norm=0.0):
    toy = GistToy()
    toy.trainer(latents, seed, max_grad_norm=max_grad_norm).train_step()
    return {"a": toy.a.grad.clone(), "b": toy.b.grad.clone(), "h": toy.h.grad.clone()}


LATENTS = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(6))
SEED_ROLLED = next(s for s in range(200) if gist_step0(s)[1].any())
SEED_NONE = next(s for s in range(200) if not gist_step0(s)[1].any())


def test_gist_with_a_backbone_cond_term_sees_only_non_rolled_samples_and_the_head_only_rolled_ones():
    """Exact on constructed batches: the parameter only the cond output uses (b) has the same gradient
    whatever a rolled sample's image is; the head's gradient the same whatever the non-rolled ones are;
    the backbone's features reach the head's loss (A moves with a rolled sample's image)."""
    idx, rolled = gist_step0(SEED_ROLLED)
    assert rolled.any() and (~rolled).any()
    base = gist_grads(LATENTS, SEED_ROLLED)
    assert all(float(v.abs().sum()) > 0 for v in base.values())
    other = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(7))
    moved_rolled, moved_others = LATENTS.clone(), LATENTS.clone()
    moved_rolled[idx[rolled]] = other[idx[rolled]]
    moved_others[idx[~rolled]] = other[idx[~rolled]]
    r, o = gist_grads(moved_rolled, SEED_ROLLED), gist_grads(moved_others, SEED_ROLLED)
    assert torch.equal(r["b"], base["b"]), "a rolled sample reached the conditional term"
    assert not torch.equal(r["h"], base["h"]) and not torch.equal(r["a"], base["a"])
    assert torch.equal(o["h"], base["h"]), "a non-rolled sample reached the head"
    assert not torch.equal(o["b"], base["b"]) and not torch.equal(o["a"], base["a"])


def test_gist_with_a_backbone_clips_the_head_on_its_own():
    """Clipping is per group: with it biting, the head's step still depends on the rolled samples only."""
    idx, rolled = gist_step0(SEED_ROLLED)
    moved = LATENTS.clone()
    moved[idx[~rolled]] *= 5.0
    base, o = gist_grads(LATENTS, SEED_ROLLED, 1e-3), gist_grads(moved, SEED_ROLLED, 1e-3)
    assert float(base["h"].norm()) == pytest.approx(1e-3, rel=1e-3)  # clipped
    assert torch.equal(o["h"], base["h"])


def test_gist_with_a_backbone_and_no_rolled_sample_moves_only_the_backbone():
    toy = GistToy()
    h0, a0, b0 = toy.h.detach().clone(), toy.a.detach().clone(), toy.b.detach().clone()
    toy.trainer(LATENTS, SEED_NONE).train_step()
    assert torch.equal(toy.h, h0)
    assert not torch.equal(toy.a, a0) and not torch.equal(toy.b, b0)


def test_gist_with_a_backbone_resumes_exactly_and_refuses_a_state_without_it():
    def run(resume_at=None):
        toy = GistToy()
        tr = toy.trainer(LATENTS, SEED_ROLLED, steps=6, max_grad_norm=1.0)
        while tr.step < 6:
            tr.train_step()
            if tr.step == resume_at:
                state = tr.state_dict()
                assert len(state["backbone"]) == 2 and len(state["optimizer"]["param_groups"]) == 2
                toy = GistToy()
                tr = toy.trainer(LATENTS, SEED_ROLLED, steps=6, max_grad_norm=1.0)
                tr.load_state_dict(state)
        return toy, tr

    (t1, r1), (t2, r2) = run(), run(resume_at=3)
    assert r1.losses == r2.losses and r1.head_samples == r2.head_samples > 0
    assert all(torch.equal(getattr(t1, k), getattr(t2, k)) for k in "abh")
    toy = GistToy()
    head_only = HeadTrainer(HeadTrainConfig("gist", 6, 1e-2, 3.0, 9.0, 0, 4, "eps"), [toy.h], toy.head,
                            torch.tensor([1.0]), forward=toy.forward, latents=LATENTS, captions=torch.arange(4))
    with pytest.raises(ho.HeadTrainError, match="does not fit this run's LoRA of the model"):
        GistToy().trainer(LATENTS, 0).load_state_dict(head_only.state_dict())


def test_only_gist_trains_the_backbone():
    toy = Toy()
    cfg = HeadTrainConfig("distill", 3, 1e-2, 3.0, 9.0, 0, 2, "eps")
    p = TrajectoryPool(SIGMAS, 2, (2, 3, 3), lambda z: z * 8.0, 1, 3.0, 9.0, 0)
    head = toy.head()
    with pytest.raises(ho.HeadTrainError, match="only gist mode trains the model itself"):
        HeadTrainer(cfg, list(head.parameters()), lambda f, x, s: head(f), torch.tensor([1.0]), teach=toy.teach,
                    pool=p, backbone=[torch.nn.Parameter(torch.zeros(1))])


def test_swapped_captions_ignore_the_image_even_on_a_tiny_dataset():
    """Two images with different captions: the gist's roll (the other sample's caption) gave a swapped sample
    the *other* caption every time, an "anti-conditional" target. Drawn from the dataset's captions, a
    swapped sample keeps its own caption half the time, as the caption distribution says."""
    pool = torch.tensor([0, 1])
    g = torch.Generator().manual_seed(0)
    swapped_n = own = 0
    for _ in range(400):
        captions, swapped = ho.swap_captions(pool, pool, 0.5, g)
        swapped_n += int(swapped.sum())
        own += int((captions == pool)[swapped].sum())
    assert swapped_n > 300 and 0.42 < own / swapped_n < 0.58
    skewed = torch.tensor([0, 0, 0, 1])  # by frequency: a swapped sample gets caption 0 three times in four
    drawn = torch.cat([ho.swap_captions(skewed, skewed, 0.99, g)[0] for _ in range(300)])
    assert 0.7 < float((drawn == 0).float().mean()) < 0.8
    with pytest.raises(ho.HeadTrainError, match="at least 2 different captions"):
        ho.swap_captions(torch.tensor([3, 3]), torch.tensor([3, 3]), 0.1, g)



class _Lockstep:
    """Processes of a data-parallel run played by threads: what ``Across`` exchanges, through a barrier
    (nodes/train/distributed.py does it with torch.distributed; tests/test_train_distributed.py runs that)."""

    def __init__(self, world: int) -> None:
        self.world, self.barrier, self.slots = world, threading.Barrier(world), [None] * world

    def rank(self, r: int):
        hub = self

        class Across:
            def _swap(self, value):
                hub.slots[r] = value
                hub.barrier.wait()
                got = list(hub.slots)
                hub.barrier.wait()
                return got

            def mean(self, value):
                return sum(self._swap(value.clone())) / hub.world

            def average_grads(self, params):
                got = self._swap([p.grad.clone() for p in params])
                for i, p in enumerate(params):
                    p.grad = sum(g[i] for g in got) / hub.world

            def gather(self, part, total):
                return torch.cat(self._swap(part))

        return Across()


def _alone(trainer, steps: int):
    for _ in range(steps):
        trainer.train_step()
    return trainer


def _in_lockstep(make, world: int, steps: int) -> list:
    """``make(rank, across)`` -> trainer, run ``steps`` steps on ``world`` threads; returns the trainers."""
    hub = _Lockstep(world)
    trainers = [make(r, hub.rank(r)) for r in range(world)]
    failed = []

    def run(t):
        try:
            for _ in range(steps):
                t.train_step()
        except Exception as e:  # noqa: BLE001 - reported below
            failed.append(e)
            hub.barrier.abort()

    threads = [threading.Thread(target=run, args=(t,)) for t in trainers]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not failed, failed
    return trainers


def test_two_processes_with_half_the_batch_each_train_the_head_as_one_with_the_whole():
    """distill on the trajectory pool (each process runs its chains, every process advances the whole pool)
    and gist with a LoRA on the model: two processes of 2 samples give one process's 4-sample run, losses
    and weights, within float rounding (the mean is summed in another order)."""
    toy, steps = Toy(), 6
    cfg = HeadTrainConfig("distill", steps, 3e-2, 3.0, 9.0, 0, 4, "eps")

    def distill(rank, across, world):
        head = toy.head()
        pool = TrajectoryPool(SIGMAS, 4, (2, 3, 3), lambda z: z * 8.0, 1, 3.0, 9.0, 0)
        return HeadTrainer(cfg, list(head.parameters()), lambda f, x, s: head(f), torch.tensor([1.0]),
                           teach=toy.teach, pool=pool, shard=(rank, world), across=across)

    one = _alone(distill(0, None, 1), steps)
    two = _in_lockstep(lambda r, a: distill(r, a, 2), 2, steps)
    for t in two:
        assert t.losses == pytest.approx(one.losses, rel=1e-5)
        torch.testing.assert_close(t.params[0], one.params[0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(t.pool.x, one.pool.x, atol=1e-5, rtol=1e-5)
    assert not torch.equal(one.params[0], toy.head().weight)  # it trained: the comparison means something

    def gist(rank, across, world):
        g = GistToy()
        cfg = HeadTrainConfig("gist", steps, 1e-2, 3.0, 9.0, SEED_ROLLED, 4, "eps", 0.0)
        t = HeadTrainer(cfg, [g.h], g.head, torch.tensor([0.5, 1.0, 2.0]), forward=g.forward, latents=LATENTS,
                        captions=torch.arange(4), backbone=[g.a, g.b], shard=(rank, world), across=across)
        t.toy = g
        return t

    one = _alone(gist(0, None, 1), steps)
    two = _in_lockstep(lambda r, a: gist(r, a, 2), 2, steps)
    for t in two:
        assert t.losses == pytest.approx(one.losses, rel=1e-5)
        for name in ("a", "b", "h"):
            torch.testing.assert_close(getattr(t.toy, name), getattr(one.toy, name), atol=1e-6, rtol=1e-5)
    with pytest.raises(ho.HeadTrainError, match="cannot be split over 8 processes"):
        distill(0, two[0].across, 8).train_step()
