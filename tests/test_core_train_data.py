"""Tier A: what the LoRA trainer draws from a dataset of several bucket sizes, with flips, masks and
caption variants (core/train_data.py), and the masked loss; on a toy denoiser (no ComfyUI)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from test_core_train import Toy, cfg

from supercond.core import objective as obj
from supercond.core.lora import LoRANetwork
from supercond.core.seeds import seeded_generator
from supercond.core.train import Trainer, TrainError
from supercond.core.train_data import TrainData

SIZES = [(4, 6), (6, 4), (4, 6), (4, 4), (6, 4), (4, 6), (4, 4)]  # three buckets, of 3, 2 and 2 items


def items(sizes=SIZES, seed=1):
    g = torch.Generator().manual_seed(seed)
    lat = [torch.randn(1, 4, h, w, generator=g) for h, w in sizes]
    conds = [{"cross_attn": torch.randn(1, 3, 8, generator=g)} for _ in sizes]
    return lat, conds


def test_a_batch_holds_one_bucket_and_an_epoch_every_item_once():
    lat, conds = items()
    data = TrainData(lat, conds)
    assert data.multi_size and data.batches_per_epoch(2) == 2 + 1 + 1
    for epoch in range(3):
        seen = []
        for j in range(4):
            idx, ep = data.draw_indices(2, epoch * 4 + j, seed=5)
            assert len({tuple(lat[i].shape) for i in idx.tolist()}) == 1  # one size per batch
            assert ep.tolist() == [epoch] * len(idx)
            seen += idx.tolist()
        assert sorted(seen) == list(range(len(SIZES)))
    # seeded: the same position draws the same batch (resume), another seed another order
    assert torch.equal(data.draw_indices(2, 6, 5)[0], data.draw_indices(2, 6, 5)[0])
    orders = {tuple(torch.cat([data.draw_indices(2, j, s)[0] for j in range(4)]).tolist()) for s in range(6)}
    assert len(orders) > 1


def test_one_size_keeps_the_order_of_runs_before_buckets():
    lat, conds = items([(4, 4)] * 5)
    data = TrainData(torch.cat(lat), conds)
    assert not data.multi_size
    # positions run across epoch ends through seeded permutations, stream 1 (as before buckets)
    perm0 = torch.randperm(5, generator=seeded_generator(3, 1, 0))
    perm1 = torch.randperm(5, generator=seeded_generator(3, 1, 1))
    assert data.draw_indices(2, 2, 3)[0].tolist() == [int(perm0[4]), int(perm1[0])]


def test_flips_vary_per_epoch_and_masks_follow_them():
    lat, conds = items([(4, 4)] * 3)
    flipped = [t.flip(-1) for t in lat]
    masks = [torch.zeros(1, 1, 4, 4).index_fill_(3, torch.tensor([0]), 1.0) for _ in lat]  # left column
    data = TrainData(lat, conds, masks, flipped)
    states = Counter()
    for epoch in range(12):
        d = data.draw(torch.tensor([0]), torch.tensor([epoch]), seed=2)
        is_flipped = data.flips(0, epoch, 2)
        states[is_flipped] += 1
        assert torch.equal(d.x0, flipped[0] if is_flipped else lat[0])
        assert float(d.mask[0, 0, :, -1 if is_flipped else 0].sum()) == 4.0  # the mask moved with the image
    assert states[True] > 0 and states[False] > 0


def test_caption_variants_are_picked_per_epoch():
    lat, _ = items([(4, 4)] * 2)
    variants = [[{"cross_attn": torch.full((1, 3, 8), float(v))} for v in range(3)] for _ in lat]
    data = TrainData(lat, variants)
    used = {float(data.draw(torch.tensor([1]), torch.tensor([e]), 0).rows[0]["cross_attn"][0, 0, 0])
            for e in range(20)}
    assert used == {0.0, 1.0, 2.0}
    assert data.draw(torch.tensor([1]), torch.tensor([4]), 0).rows[0] is data.draw(
        torch.tensor([1]), torch.tensor([4]), 0).rows[0]


def test_masked_loss_ignores_what_the_mask_excludes():
    pred, target = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    w = torch.tensor([1.0, 2.0])
    mask = torch.zeros(2, 1, 4, 4)
    mask[:, :, :2] = 1.0
    changed = pred.clone()
    changed[:, :, 2:] += 5.0  # only where the mask is 0
    assert obj.weighted_mse(pred, target, w, mask) == obj.weighted_mse(changed, target, w, mask)
    assert obj.weighted_mse(pred, target, w, torch.ones(2, 1, 4, 4)) == obj.weighted_mse(pred, target, w)
    # kohya's normalisation: the mean over all positions, so half the area counts half
    full = ((pred - target) ** 2)[:, :, :2].flatten(1).sum(1) / (4 * 16)
    assert torch.allclose(obj.weighted_mse(pred, target, w, mask), (full * w).mean())


def _trainer(c, lat, conds, **kw):
    model = Toy()
    net = LoRANetwork({"lora_unet_conv": model.conv, "lora_unet_lin": model.lin}, c.rank, c.alpha,
                      seeded_generator(c.seed, 1))
    return Trainer(c, list(net.parameters()), model, torch.linspace(0.03, 14.6, 1000), lat, conds, **kw), net


def test_trainer_learns_from_several_sizes_with_masks_and_resumes_exactly():
    lat, conds = items()
    masks = [torch.ones(1, 1, *t.shape[-2:]) for t in lat]
    masks[0][..., :2, :] = 0
    flipped = [t.flip(-1) for t in lat]
    c = cfg(steps=6, batch_size=2)
    tr, net = _trainer(c, lat, conds, masks=masks, flipped=flipped)
    with net.attached():
        for _ in range(6):
            tr.train_step()
    assert all(torch.isfinite(torch.tensor(tr.losses)))
    tr2, net2 = _trainer(c, lat, conds, masks=masks, flipped=flipped)
    with net2.attached():
        for _ in range(3):
            tr2.train_step()
        state = tr2.state_dict()
        tr3, net3 = _trainer(c, lat, conds, masks=masks, flipped=flipped)
    tr3.load_state_dict(state)
    with net3.attached():
        for _ in range(3):
            tr3.train_step()
    assert tr3.losses == tr.losses
    for a, b in zip(net.parameters(), net3.parameters(), strict=True):
        assert torch.equal(a, b)
    # masks, flips and sizes are part of what a resume must match
    other = [m.clone() for m in masks]
    other[1][..., 0, 0] = 0
    tr4, _ = _trainer(c, lat, conds, masks=other, flipped=flipped)
    with pytest.raises(TrainError, match="other data"):
        tr4.load_state_dict(state)


def test_bad_data_is_named():
    lat, conds = items()
    with pytest.raises(TrainError, match="mask .* does not match its latent"):
        _trainer(cfg(), lat, conds, masks=[torch.ones(1, 1, 2, 2)] * len(lat))
    with pytest.raises(TrainError, match="7 latents but 2 flipped latents"):
        _trainer(cfg(), lat, conds, flipped=lat[:2])
