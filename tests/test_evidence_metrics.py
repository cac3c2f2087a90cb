"""Tier A: the evidence model's data split and the metrics its tables report (bench/evidence)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from evidence import data, metrics  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def split() -> tuple[data.Digits, data.Digits]:
    return data.load()


@pytest.fixture(scope="module")
def judge(split) -> metrics.Judge:
    return metrics.Judge(*split)


def test_the_split_is_seeded_stratified_and_disjoint(split):
    train, test = split
    assert len(train) + len(test) == 1797
    again = data.load()
    assert torch.equal(again[1].pixels, test.pixels)
    for d in range(10):
        share = len(test.of(d)) / (len(test.of(d)) + len(train.of(d)))
        assert share == pytest.approx(data.TEST_FRACTION, abs=0.01)
    flat = {tuple(p.flatten().tolist()) for p in train.pixels}
    assert sum(tuple(p.flatten().tolist()) in flat for p in test.pixels) < 5  # a few digits repeat in the data
    other = data.load(seed=1)[1]
    assert not torch.equal(other.pixels, test.pixels)


def test_rendering_and_reading_back_are_exact(split):
    pix = split[1].pixels[:20]
    img = data.render(pix)
    assert img.shape == (20, 64, 64, 3) and img.dtype == torch.float32
    assert torch.equal(data.read(img), pix)
    assert data.caption(7) == "a handwritten seven"


def test_the_classifier_reads_the_held_out_digits(judge, split):
    acc = metrics.accuracy(judge.net, split[1])
    assert acc > 0.95
    # adherence of the real held-out images prompted with their own labels is exactly that accuracy
    assert metrics.adherence(judge.net, split[1].pixels, split[1].labels) == pytest.approx(acc)
    rep = judge.report(split[1].pixels, split[1].labels, rounds=50)
    assert rep.adherence.value == pytest.approx(acc)
    assert rep.adherence.low <= acc <= rep.adherence.high


def test_frechet_distance_is_zero_for_identical_sets_and_large_for_noise(judge, split):
    train, test = split
    f = judge.test_features
    assert metrics.frechet(f, f) == pytest.approx(0.0, abs=1e-6)
    gen = torch.Generator().manual_seed(0)
    noise = torch.rand(len(test), 8, 8, generator=gen)
    real = metrics.frechet(judge.features(train.pixels), f)
    fake = metrics.frechet(judge.features(noise), f)
    assert real < fake / 10
    # per prompted digit, as the tables report it: real training images vs noise
    fives = train.of(5).pixels[:30]
    rep_real = judge.report(fives, torch.full((30,), 5), rounds=30)
    rep_noise = judge.report(noise[:30], torch.full((30,), 5), rounds=30)
    assert rep_real.fd.high < rep_noise.fd.low
    assert rep_noise.adherence.value < 0.5


def test_diversity_and_memorization_tell_copies_from_new_images(judge, split):
    train, test = split
    one = train.pixels[:1].expand(20, -1, -1)
    f_one = judge.features(one)
    assert metrics.vendi(f_one) == pytest.approx(1.0, abs=1e-6)
    assert metrics.mean_pairwise(f_one) == pytest.approx(0.0, abs=1e-6)
    assert metrics.vendi(torch.eye(7)) == pytest.approx(7.0)
    sevens = test.of(7).pixels[:20]
    f_sevens = judge.features(sevens)
    assert metrics.vendi(f_sevens) > 2 and metrics.mean_pairwise(f_sevens) > 5
    # copies of training images sit at distance 0; held-out images at their own typical distance
    copies = judge.report(train.of(7).pixels[:20], torch.full((20,), 7), rounds=30)
    fresh = judge.report(sevens, torch.full((20,), 7), rounds=30)
    assert copies.memorization.value == pytest.approx(0.0)
    assert 0.5 < fresh.memorization.value < 2.0


def test_copying_of_a_small_fine_tuning_set(judge, split):
    train, test = split
    few = train.of(5).pixels[:8]
    copies = judge.copying(few.repeat(3, 1, 1), few, 5, rounds=30)
    assert copies.value == pytest.approx(0.0) and copies.high == pytest.approx(0.0)
    fresh = judge.copying(train.of(5).pixels[8:40], few, 5, rounds=30)  # unseen training fives
    assert 0.6 < fresh.value < 1.6 and fresh.low < 1.0 < fresh.high


def test_bootstrap_intervals_hold_the_value_and_shrink_with_more_samples():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, generator=gen)

    def mean_of(n):
        return metrics.bootstrap(lambda g: float(x[g[0]].mean()), [torch.arange(n)], rounds=200)

    small, big = mean_of(25), mean_of(400)
    assert small.low <= small.value <= small.high and big.low <= big.value <= big.high
    assert (big.high - big.low) < (small.high - small.low) / 2
    assert metrics.bootstrap(lambda g: float(x[g[0]].mean()), [torch.arange(25)], rounds=200) == small  # seeded


def test_diversity_intervals_hold_their_value(judge, split):
    """Duplicates in a with-replacement redraw would pull Vendi below its own value."""
    test = split[1]
    idx = torch.cat([torch.nonzero(test.labels == d).flatten()[:16] for d in range(10)])
    rep = judge.report(test.pixels[idx], test.labels[idx], rounds=60)
    for fig in (rep.vendi, rep.pairwise, rep.fd, rep.memorization):
        assert fig.low <= fig.value <= fig.high, fig


def test_compare_tells_reproduced_figures_from_ones_that_moved(tmp_path):
    from evidence import compare

    a, b = tmp_path / "a.md", tmp_path / "b.md"
    a.write_text("# head\n## 1. T (x)\n| setting | calls/image | FD | Vendi |\n|---|---|---|---|\n"
                 "| r1 | 40.0 | 300 [250, 350] | 1.2 [1.1, 1.3] |\n| r2 | 20.0 | 1.5e+03 [1e+03, 2e+03] | 2 [1.9, 2.1] |\n"
                 "| r3 | 20.0 | 1.2e-05 [-3e-06, 2.5e-05] | nan [nan, nan] |\n")
    b.write_text("## 1. T (y)\n| setting | calls/image | FD | Vendi |\n|---|---|---|---|\n"
                 "| r1 | 40.0 | 320 [280, 360] | 1.5 [1.4, 1.6] |\n| r2 | 20.0 | 2.1e+03 [1.9e+03, 2.3e+03] | 2 [1.9, 2.1] |\n")
    assert compare.tables(a)[("1.", "r2", "FD")] == (1500.0, 1000.0, 2000.0)
    assert compare.tables(a)[("1.", "r3", "FD")] == (1.2e-05, -3e-06, 2.5e-05)  # only in a: not compared
    lines = compare.compare(a, b)
    # r1 FD: both inside; r2 FD: 2100 is outside a's interval but the intervals overlap; r1 Vendi: apart
    assert lines[0] == "4 figures in both reports; each value inside the other's interval: 2; intervals overlapping: 3"
    assert lines[1:] == ["  apart: 1. / r1 / Vendi: (1.2, 1.1, 1.3) vs (1.5, 1.4, 1.6)"]
