"""Fast checks of the superconditioning-head toy benches (bench/head_gist_toy.py, bench/head_distill_toy.py)
in their quick configurations: the claims hold robustly at this size, the numbers themselves are the benches'.

Imports them the way the benches do: bench/ on sys.path, the pack registered by _common.import_pack().
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import _common  # noqa: E402

_common.import_pack()
import head_distill_toy as hd  # noqa: E402
import head_gist_toy as hg  # noqa: E402
import toy_gmm as tg  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
SCH = tg.VPSchedule.scaled_linear()
GIST_CFG = replace(hg.QUICK, seeds=(0,))
DISTILL_CFG = replace(hd.QUICK, variants=("proj/policy", "block/policy"))


@pytest.fixture(scope="module")
def gmm() -> tg.GMM:
    return tg.default_gmm()


@pytest.fixture(scope="module")
def gist_pair(gmm: tg.GMM) -> dict[str, tg.Denoiser]:
    torch.set_num_threads(1)
    return hg.train_pair(GIST_CFG, gmm, seed=0)[0]


def _samples(model: tg.Denoiser, method: str, scale: float, n: int = 200) -> list[torch.Tensor]:
    return hg.sample_method(model, method, n, SCH, SCH.timesteps(GIST_CFG.sample_steps), 0, scale)


def test_gist_single_pass_at_scale_one_matches_truth(gmm: tg.GMM, gist_pair) -> None:
    truth = tg.truth_samples(gmm, 200, seed=1000)
    gist = tg.per_class_w2(_samples(gist_pair[hg.GIST], hg.GIST, 1.0), truth)
    drop = tg.per_class_w2(_samples(gist_pair[hg.DROPOUT], hg.DROPOUT, 1.0), truth)
    untrained = tg.per_class_w2(_samples(tg.make_model(4, 0, width=64, outputs=2), hg.GIST, 1.0), truth)
    # truth vs truth reads ~0.13 at this size, a 300-step model ~0.25, an untrained one > 1
    assert gist < 0.4 and abs(gist - drop) < 0.1 and untrained > 3 * gist, (gist, drop, untrained)


def test_gist_guidance_moves_the_samples(gist_pair) -> None:
    model = gist_pair[hg.GIST]
    assert tg.per_class_w2(_samples(model, hg.GIST, 3.0), _samples(model, hg.GIST, 1.0)) > 0.1


@pytest.mark.parametrize(("method", "scale", "per_step"),
                         [(hg.GIST, 1.0, 1), (hg.GIST, 3.0, 1), (hg.DROPOUT, 1.0, 1), (hg.DROPOUT, 3.0, 2)])
def test_evaluations_per_step(gist_pair, method: str, scale: float, per_step: int) -> None:
    steps = GIST_CFG.sample_steps
    with hg.count_evals(gist_pair[method]) as counter:
        _samples(gist_pair[method], method, scale, n=5)
    assert counter.calls == steps and counter.rows == per_step * 20 * steps


def test_gist_roll_mask_is_the_dropout_mask(gmm: tg.GMM, monkeypatch) -> None:
    """The pairing the bench relies on, in the two training functions themselves: with the same seed the
    gist's swapped samples are exactly the dropout run's dropped ones, step by step."""
    dropped, swapped = [], []
    conditioning, gist_loss = tg.conditioning, hg.ho.gist_loss

    def record_drop(model, y, drop, *args):
        dropped.append(drop.clone())
        return conditioning(model, y, drop, *args)

    def record_roll(pred_cond, pred_uncond, target, rolled):
        swapped.append(rolled.clone())
        return gist_loss(pred_cond, pred_uncond, target, rolled)

    monkeypatch.setattr(tg, "conditioning", record_drop)
    monkeypatch.setattr(hg.ho, "gist_loss", record_roll)
    tg.train(tg.make_model(4, 0, width=16, depth=1), gmm, 3, 64, 1e-3, seed=5)
    hg.train_gist(tg.make_model(4, 0, outputs=2, width=16, depth=1), gmm, 3, 64, 1e-3, seed=5)
    assert len(dropped) == len(swapped) == 3
    assert all(torch.equal(d, r) for d, r in zip(dropped, swapped, strict=True))
    assert 0 < int(torch.stack(dropped).sum()) < 3 * 64  # some, not all: the masks can differ


@pytest.fixture(scope="module")
def distilled(gmm: tg.GMM) -> tuple[tg.Denoiser, dict[str, torch.Tensor], hd.SeedResult]:
    torch.set_num_threads(1)
    teacher = tg.make_model(4, 0, width=DISTILL_CFG.width, depth=DISTILL_CFG.depth)
    tg.train(teacher, gmm, DISTILL_CFG.steps, DISTILL_CFG.batch, DISTILL_CFG.lr, seed=0)
    teacher.requires_grad_(False)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    pool = hd.policy_pool(teacher, DISTILL_CFG, SCH, seed=0)
    heads = {hd.FRESH: hd.fresh_head(teacher)}
    for name in DISTILL_CFG.variants:
        heads[name], _ = hd.train_head(teacher, hd.VARIANTS[name], DISTILL_CFG, gmm, pool, seed=0)
    res = hd.SeedResult()
    hd.evaluate(teacher, heads, DISTILL_CFG, gmm, 0, res)
    return teacher, before, res


def test_distilled_head_beats_the_fresh_head(distilled) -> None:
    res = distilled[2]
    for s in DISTILL_CFG.scales:
        assert res.rel_delta[hd.FRESH, s, "all"] == pytest.approx(1.0, abs=1e-6)
        assert res.rel_delta["block/policy", s, "all"] < 0.6, res.rel_delta
        assert res.rel_guided["block/policy", s, "all"] < 0.5 * res.rel_guided[hd.FRESH, s, "all"]
        assert res.w2_two_pass["block/policy", s] < 0.5 * res.w2_two_pass[hd.FRESH, s]


def test_distilled_single_pass_is_one_trunk_pass(distilled) -> None:
    assert all(v == 1.0 for v in distilled[2].evals_per_step.values()), distilled[2].evals_per_step


def test_teacher_untouched_by_head_training(distilled) -> None:
    teacher, before, _ = distilled
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_fresh_head_is_the_conditional_prediction(gmm: tg.GMM, distilled) -> None:
    teacher = distilled[0]
    xt, t, _, y = tg.noised_batch(gmm, 64, SCH, torch.Generator().manual_seed(0))
    for kind in (hd.PROJ, hd.BLOCK):
        f = hd.cond_pass(teacher, xt, t, y)
        assert torch.equal(hd.DistilledHead(teacher, kind)(f), teacher(xt, t, teacher.embed(y)))
        assert torch.equal(f.cond, teacher(xt, t, teacher.embed(y)))


def test_oracle_at_scale_one_is_near_truth(gmm: tg.GMM) -> None:
    truth = tg.truth_samples(gmm, 300, seed=1000)
    oracle = tg.oracle_sample_classes(gmm, 300, SCH, SCH.timesteps(50), seed=0)
    assert tg.per_class_w2(oracle, truth) < 0.2
