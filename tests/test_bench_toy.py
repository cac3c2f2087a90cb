"""Fast checks of bench/toy_gmm.py, the toy diffusion library the CEP and schedule benches use.

Imports it the way the benches do: bench/ on sys.path, the pack registered by _common.import_pack().
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import _common  # noqa: E402

_common.import_pack()
import toy_gmm as tg  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS, BATCH, LR, WIDTH = 300, 128, 3e-3, 64
N = 400  # points per class for the metrics


@pytest.fixture(scope="module")
def gmm() -> tg.GMM:
    return tg.default_gmm()


@pytest.fixture(scope="module")
def truth(gmm: tg.GMM) -> list[torch.Tensor]:
    return tg.truth_samples(gmm, N, seed=1)


def _model() -> tg.Denoiser:
    return tg.make_model(4, seed=0, width=WIDTH, depth=2)


def _train(gmm: tg.GMM, cep: dict | None = None) -> tuple[tg.Denoiser, list[float]]:
    model = _model()
    losses = tg.train(model, gmm, STEPS, BATCH, LR, seed=0, cep=cep)
    return model, losses


def _w2(model: tg.Denoiser, truth: list[torch.Tensor]) -> float:
    sch = tg.VPSchedule.scaled_linear()
    samples = tg.sample_classes(model, N, sch, sch.timesteps(20), seed=0)
    return tg.per_class_w2(samples, truth)


@pytest.fixture(scope="module")
def clean(gmm: tg.GMM) -> tuple[tg.Denoiser, list[float]]:
    torch.set_num_threads(1)
    return _train(gmm)


def test_training_loss_decreases(clean: tuple[tg.Denoiser, list[float]]) -> None:
    losses = clean[1]
    first, last = sum(losses[:50]) / 50, sum(losses[-50:]) / 50
    assert last < 0.8 * first, (first, last)


def test_trained_beats_untrained(clean: tuple[tg.Denoiser, list[float]], truth) -> None:
    trained, untrained = _w2(clean[0], truth), _w2(_model(), truth)
    assert trained < 0.5 * untrained, (trained, untrained)


def test_truth_against_itself_is_small(gmm: tg.GMM, truth) -> None:
    other = tg.truth_samples(gmm, N, seed=2)
    self_w2 = tg.per_class_w2(truth, other)
    # Sampling noise only: far below the spread of a class (~0.5) and the distance between classes.
    assert 0 < self_w2 < 0.2, self_w2
    shifted = [t + torch.tensor([0.5, 0.0]) for t in other]
    assert tg.per_class_w2(truth, shifted) > 0.4


def test_w2_exact_on_a_permuted_copy(truth) -> None:
    x = truth[0]
    assert tg.w2(x, x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))]) == 0.0


def test_entropy_of_a_gaussian() -> None:
    # KL estimator against the closed form 0.5 * log((2 pi e)^2 det S) for S = diag(1, 0.25).
    x = torch.randn(4000, 2, generator=torch.Generator().manual_seed(0)) * torch.tensor([1.0, 0.5])
    exact = 0.5 * torch.log(torch.tensor((2 * torch.pi * torch.e) ** 2 * 0.25)).item()
    assert abs(tg.kl_entropy(x) - exact) < 0.05


def test_cep_gamma_zero_is_bit_identical(gmm: tg.GMM, clean) -> None:
    # Also checks that training is deterministic given the seed.
    model, losses = _train(gmm, cep=dict(gamma=0.0, distribution="uniform"))
    assert losses == clean[1]
    for a, b in zip(model.state_dict().values(), clean[0].state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("distribution", ["uniform", "gaussian"])
def test_cep_changes_the_weights(gmm: tg.GMM, clean, distribution: str) -> None:
    model, _ = _train(gmm, cep=dict(gamma=1.0, distribution=distribution))
    diffs = [
        (a - b).abs().max().item()
        for a, b in zip(model.state_dict().values(), clean[0].state_dict().values(), strict=True)
    ]
    assert max(diffs) > 1e-4
