"""A class-conditional 2-D toy diffusion setup, pure torch, for small honest benchmarks.

Pieces (each usable on its own):

- ``GMM``: K classes, each itself a mixture of a few anisotropic Gaussians, with exact sampling.
  ``default_gmm()`` is the reference instance; ``FiniteDataset`` is a fixed draw from it (the
  finite-data regime the CEP theory is about), while a ``GMM`` used as a training source gives a fresh
  exact sample every step (the infinite-data regime).
- ``VPSchedule``: a discrete variance-preserving schedule (SD's scaled-linear betas by default) with
  ``alphas_cumprod``, ``sigmas`` and timestep spacings, so other benches can plug in other spacings.
- ``Denoiser``: a small residual-MLP eps-predictor of x, conditioned on sinusoidal(t) and a learned
  class embedding; the class table has one extra row, the null class used for CFG.
- ``train``: AdamW on the eps-MSE, CFG label dropout, optional CEP on the class embeddings (through
  the pack's ``core.perturb.apply_cep``), deterministic given its seed.
- ``ddim_sample``: deterministic DDIM (eta 0) over any descending timestep list, optional CFG;
  ``ddim_loop`` is the same loop over any eps function (single-pass heads, the exact oracle) and can
  record the trajectory.
- Two-output models (``outputs=2``, madebyollin's layout: cond then uncond) and ``single_pass_eps``;
  ``Denoiser.trunk``/``block``/``project`` expose the penultimate features for a distilled head.
- ``exact_eps``: the exact eps of the noised GMM (class-conditional or marginal), so an oracle CFG
  sampler gives the reference for guided sampling, where the data distribution is no longer the target.
- Metrics: ``w2`` (exact optimal transport between equal-size samples) and ``kl_entropy``
  (Kozachenko-Leonenko kNN estimator, nats), plus per-class wrappers.

Nothing here touches the global torch RNG: every random draw takes an explicit generator.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from _common import import_pack
from scipy.optimize import linear_sum_assignment
from scipy.special import digamma, gammaln
from torch import nn

import_pack()
perturb = importlib.import_module("supercond.core.perturb")
seeds = importlib.import_module("supercond.core.seeds")
schedules = importlib.import_module("supercond.core.schedules")

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class GMM:
    """Class-conditional Gaussian mixture in 2-D.

    means [K, M, 2], chols [K, M, 2, 2] (lower-triangular covariance factors), weights [K, M]
    (each row sums to 1). Classes are drawn uniformly.
    """

    means: Tensor
    chols: Tensor
    weights: Tensor

    @property
    def num_classes(self) -> int:
        return self.means.shape[0]

    def sample_class(self, k: int, n: int, generator: torch.Generator) -> Tensor:
        """n exact draws from class k, [n, 2]."""
        return self.sample(torch.full((n,), k, dtype=torch.long), generator)

    def sample(self, labels: Tensor, generator: torch.Generator) -> Tensor:
        """One exact draw per label, [len(labels), 2]."""
        comp = torch.multinomial(self.weights[labels], 1, generator=generator).squeeze(1)
        z = torch.randn(len(labels), 2, generator=generator)
        chol = self.chols[labels, comp]
        return self.means[labels, comp] + (chol @ z.unsqueeze(-1)).squeeze(-1)

    def batch(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """A fresh training batch (x [n, 2], y [n]): the infinite-data regime."""
        y = torch.randint(0, self.num_classes, (n,), generator=generator)
        return self.sample(y, generator), y


def default_gmm(num_classes: int = 4) -> GMM:
    """K classes around a ring of radius ~1.5 (data RMS ~1.2, about unit scale).

    Each class has three elongated components with unequal weights (0.5, 0.3, 0.2) at different
    radii, so there is within-class diversity (minor modes, orientations) for a model to lose.
    """
    offsets = (-0.5, 0.0, 0.5)  # radians around the class centre
    radii = (1.7, 1.1, 1.7)
    stds = ((0.30, 0.07), (0.12, 0.12), (0.07, 0.25))  # (tangential, radial)
    weights = (0.5, 0.3, 0.2)
    means, chols = [], []
    for k in range(num_classes):
        centre = 2 * math.pi * k / num_classes
        mk, ck = [], []
        for off, r, (s_tan, s_rad) in zip(offsets, radii, stds, strict=True):
            a = centre + off
            radial = torch.tensor([math.cos(a), math.sin(a)])
            tangent = torch.tensor([-math.sin(a), math.cos(a)])
            rot = torch.stack([tangent, radial], dim=1)  # columns: tangent, radial
            cov = rot @ torch.diag(torch.tensor([s_tan**2, s_rad**2])) @ rot.T
            mk.append(r * radial)
            ck.append(torch.linalg.cholesky(cov))
        means.append(torch.stack(mk))
        chols.append(torch.stack(ck))
    w = torch.tensor(weights).expand(num_classes, -1).clone()
    return GMM(torch.stack(means).float(), torch.stack(chols).float(), w)


@dataclass(frozen=True)
class FiniteDataset:
    """A fixed training set: minibatches are drawn from it with replacement."""

    x: Tensor
    y: Tensor

    def batch(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        idx = torch.randint(0, len(self.y), (n,), generator=generator)
        return self.x[idx], self.y[idx]

    def class_points(self, k: int) -> Tensor:
        return self.x[self.y == k]


def make_dataset(gmm: GMM, n_per_class: int, seed: int) -> FiniteDataset:
    """n_per_class exact draws per class from ``gmm`` (the finite training set)."""
    g = seeds.seeded_generator(seed, 0xDA7A)
    y = torch.arange(gmm.num_classes).repeat_interleave(n_per_class)
    return FiniteDataset(gmm.sample(y, g), y)


class DataSource(Protocol):
    def batch(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]: ...


# ---------------------------------------------------------------------------------------------
# Noise schedule


@dataclass(frozen=True)
class VPSchedule:
    """Discrete VP schedule: x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps, t in 0..T-1."""

    betas: Tensor  # [T], float64

    @classmethod
    def scaled_linear(
        cls, num_steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
    ) -> VPSchedule:
        """Stable Diffusion's schedule: betas linear in sqrt-space."""
        b = torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2
        return cls(b)

    @property
    def num_steps(self) -> int:
        return len(self.betas)

    @property
    def alphas_cumprod(self) -> Tensor:
        return torch.cumprod(1.0 - self.betas, dim=0)

    @property
    def sigmas(self) -> Tensor:
        """The equivalent VE noise levels sqrt((1 - ab) / ab), increasing with t."""
        ab = self.alphas_cumprod
        return ((1.0 - ab) / ab).sqrt()

    def timesteps(self, n: int, spacing: str = "trailing") -> Tensor:
        """n descending integer timesteps for sampling.

        ``trailing`` starts at T-1 (the spacing that reaches the noisiest step); ``leading`` is SD's
        DDIM default (arange * T//n, plus offset 1); ``linspace`` rounds linspace(T-1, 0, n).
        """
        return schedules.spacing_timesteps(spacing, n, self.num_steps)


# ---------------------------------------------------------------------------------------------
# Model


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """SD-style sinusoidal embedding of (possibly fractional) timesteps t [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float().unsqueeze(1) * freqs.unsqueeze(0)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class Denoiser(nn.Module):
    """Residual-MLP eps-predictor: eps(x_t, t, c), c a learned class embedding of width ``emb_dim``.

    The condition (sinusoidal t, class embedding) goes through one shared layer and is added inside
    every residual block: a small MLP fed the condition only at its input blurs thin modes badly.
    Row ``num_classes`` of the embedding table is the null class (for CFG). The table is initialised
    N(0, 1), so each element has RMS ~1: the scale CEP's gamma/sqrt(d) assumes.
    ``outputs=2`` doubles the output (2 x 2 dims, conditional prediction first, then unconditional:
    the gist's two-head layout); ``forward`` returns them concatenated on the last axis.
    """

    def __init__(
        self, num_classes: int, width: int = 128, depth: int = 2, emb_dim: int = 32, time_dim: int = 32,
        outputs: int = 1,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.time_dim = time_dim
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim)
        self.cond = nn.Linear(time_dim + emb_dim, width)
        self.inp = nn.Linear(2, width)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"a": nn.Linear(width, width), "c": nn.Linear(width, width),
                           "b": nn.Linear(width, width)})
            for _ in range(depth)
        )
        self.out = nn.Linear(width, 2 * outputs)

    @property
    def null_label(self) -> int:
        return self.num_classes

    def embed(self, labels: Tensor) -> Tensor:
        return self.class_emb(labels)

    def forward(self, x: Tensor, t: Tensor, emb: Tensor) -> Tensor:
        """x [B, 2], t [B] (timesteps, may be fractional), emb [B, emb_dim] -> eps [B, 2 * outputs]."""
        return self.project(self.trunk(x, t, emb)[0])

    def trunk(self, x: Tensor, t: Tensor, emb: Tensor, num_blocks: int | None = None) -> tuple[Tensor, Tensor]:
        """(hidden state after the first ``num_blocks`` residual blocks (all by default), condition c)."""
        c = nn.functional.silu(self.cond(torch.cat([sinusoidal_embedding(t, self.time_dim), emb], dim=1)))
        h = self.inp(x)
        for blk in self.blocks[:num_blocks]:
            h = residual_block(blk, h, c)
        return h, c

    def block(self, index: int, h: Tensor, c: Tensor) -> Tensor:
        return residual_block(self.blocks[index], h, c)

    def project(self, h: Tensor) -> Tensor:
        """The last layer: hidden state after the last block -> output."""
        return self.out(nn.functional.silu(h))


def residual_block(blk: nn.ModuleDict, h: Tensor, c: Tensor) -> Tensor:
    """One residual block of ``Denoiser``: h + b(silu(a(silu(h)) + c_proj(c)))."""
    act = nn.functional.silu
    return h + blk["b"](act(blk["a"](act(h)) + blk["c"](c)))


def make_model(num_classes: int, seed: int, **kwargs: int) -> Denoiser:
    """A Denoiser whose initial weights depend only on ``seed`` (torch's usual init, own RNG)."""
    model = Denoiser(num_classes, **kwargs)
    g = seeds.seeded_generator(seed, 0x1A17)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=g)
            bound = 1.0 / math.sqrt(m.in_features)
            nn.init.uniform_(m.bias, -bound, bound, generator=g)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 1.0, generator=g)
    return model


# ---------------------------------------------------------------------------------------------
# Training


def conditioning(
    model: Denoiser,
    labels: Tensor,
    drop: Tensor,
    cep: dict | None,
    cep_gen: torch.Generator | None,
) -> Tensor:
    """Class embeddings for a training batch: CFG dropout to the null row, then CEP (if any).

    CEP perturbs every sample's embedding with fresh noise, the null rows included (as the
    caption-level implementations do: they perturb whatever the text encoder returns) unless
    ``cep["perturb_null"]`` is False. The noise is a constant w.r.t. the weights, so the gradient
    flows into the clean embedding unchanged.
    """
    labels = torch.where(drop, torch.full_like(labels, model.null_label), labels)
    emb = model.embed(labels)
    if not cep:
        return emb
    # gamma == 0 returns emb itself and draws no noise: an exact no-op.
    noisy = perturb.apply_cep(emb, cep["gamma"], cep.get("distribution", "uniform"), "paper", cep_gen)
    if not cep.get("perturb_null", True):
        noisy = torch.where(drop.unsqueeze(1), emb, noisy)
    return noisy


def train_loop(
    params: Iterable[nn.Parameter],
    steps: int,
    lr: float,
    step_loss: Callable[[], Tensor],
    weight_decay: float = 0.0,
    cosine_lr: bool = True,
) -> list[float]:
    """AdamW over ``params`` for ``steps`` steps of ``step_loss()`` (which draws its own batch);
    returns the per-step losses. ``cosine_lr`` decays the learning rate to 0."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    losses = []
    for step in range(steps):
        if cosine_lr:
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss = step_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def noised_batch(
    data: DataSource, batch: int, schedule: VPSchedule, gen: torch.Generator
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_t, t, eps, labels) for a training batch, drawn in ``train``'s order from ``gen``."""
    x0, y = data.batch(batch, gen)
    t = torch.randint(0, schedule.num_steps, (batch,), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    a = schedule.alphas_cumprod.float()[t].unsqueeze(1)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps, t, eps, y


def train(
    model: Denoiser,
    data: DataSource,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    cep: dict | None = None,
    schedule: VPSchedule | None = None,
    cfg_dropout: float = 0.1,
    weight_decay: float = 0.0,
    cosine_lr: bool = True,
) -> list[float]:
    """Train ``model`` in place on the eps-MSE; returns the per-step losses.

    ``cep``: None, or dict(gamma=..., distribution="uniform"|"gaussian", perturb_null=True). CEP
    draws from its own generator, so the data, timesteps and noise are the same stream with and
    without it (a paired comparison), and gamma=0 is bit-identical to no CEP. Never used when
    sampling. ``cosine_lr`` decays the learning rate to 0, so the final weights are not a snapshot of
    a noisy constant-lr walk (that noise would swamp small differences between variants).
    Deterministic given ``seed`` (on one machine and thread count).
    """
    schedule = schedule or VPSchedule.scaled_linear()
    gen = seeds.seeded_generator(seed, 0x7EA1)
    cep_gen = seeds.seeded_generator(seed, 0xCE9) if cep else None

    def step_loss() -> Tensor:
        xt, t, eps, y = noised_batch(data, batch, schedule, gen)
        drop = torch.rand(batch, generator=gen) < cfg_dropout
        emb = conditioning(model, y, drop, cep, cep_gen)
        return torch.mean((model(xt, t, emb) - eps) ** 2)

    model.train()
    losses = train_loop(model.parameters(), steps, lr, step_loss, weight_decay, cosine_lr)
    model.eval()
    return losses


# ---------------------------------------------------------------------------------------------
# Sampling


def guided_eps(model: Denoiser, x: Tensor, t: Tensor, labels: Tensor, cfg_scale: float) -> Tensor:
    """eps_u + s (eps_c - eps_u); at s == 1 only the conditional pass runs."""
    cond = model.embed(labels)
    if cfg_scale == 1.0:
        return model(x, t, cond)
    null = model.embed(torch.full_like(labels, model.null_label))
    eps = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, null]))
    eps_c, eps_u = eps.chunk(2)
    return eps_u + cfg_scale * (eps_c - eps_u)


def single_pass_eps(model: Denoiser, x: Tensor, t: Tensor, labels: Tensor, cfg_scale: float | Tensor) -> Tensor:
    """A two-output model (``outputs=2``): u + s (c - u) from ONE forward pass, at every scale."""
    eps_c, eps_u = model(x, t, model.embed(labels)).chunk(2, dim=-1)
    return eps_u + cfg_scale * (eps_c - eps_u)


EpsFn = Callable[[Tensor, Tensor], Tensor]  # (x [B, 2], t [B]) -> eps [B, 2]


@torch.no_grad()
def ddim_loop(
    eps_fn: EpsFn,
    x: Tensor,
    schedule: VPSchedule,
    timesteps: Sequence[int] | Tensor,
    record: list[tuple[int, Tensor]] | None = None,
) -> Tensor:
    """Deterministic DDIM (eta = 0) from x over descending ``timesteps`` with any eps function.

    ``record``, if given, receives (t, x_t) for every step before it is taken (the trajectory).
    """
    ab = schedule.alphas_cumprod.float()
    ts = torch.as_tensor(timesteps, dtype=torch.long).tolist()
    for i, t in enumerate(ts):
        if record is not None:
            record.append((t, x))
        a_t = ab[t]
        a_prev = ab[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
        eps = eps_fn(x, torch.full((len(x),), t))
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x


@torch.no_grad()
def ddim_sample(
    model: Denoiser,
    labels: Tensor,
    schedule: VPSchedule,
    timesteps: Sequence[int] | Tensor,
    generator: torch.Generator,
    cfg_scale: float = 1.0,
) -> Tensor:
    """Deterministic DDIM (eta = 0) from x_T ~ N(0, I) over descending ``timesteps``.

    The last step goes to alpha_bar = 1, i.e. returns the model's x0 prediction there.
    """
    x = torch.randn(len(labels), 2, generator=generator)
    return ddim_loop(lambda xt, t: guided_eps(model, xt, t, labels, cfg_scale), x, schedule, timesteps)


def exact_eps(gmm: GMM, x: Tensor, alpha_bar: float | Tensor, labels: Tensor | None = None) -> Tensor:
    """The exact eps-prediction E[eps | x_t] of the noised GMM at alpha_bar (a float), per sample
    class (``labels``) or of the class marginal (None): -sqrt(1 - ab) * grad log p_t(x).

    Each component N(mu, S) becomes N(sqrt(ab) mu, ab S + (1 - ab) I). Computed in float64.
    """
    a = torch.as_tensor(alpha_bar, dtype=torch.float64)
    means = a.sqrt() * gmm.means.double()  # [K, M, 2]
    chols = gmm.chols.double()
    cov = a * chols @ chols.transpose(-1, -2) + (1 - a) * torch.eye(2, dtype=torch.float64)
    prec, logdet = torch.linalg.inv(cov), torch.logdet(cov)  # per component, before any batching
    logw = gmm.weights.double().log() - 0.5 * logdet
    if labels is None:  # marginal: all K * M components, classes uniform
        means, prec = means.reshape(1, -1, 2), prec.reshape(1, -1, 2, 2)
        logw = (logw - math.log(gmm.num_classes)).reshape(1, -1)
    else:
        means, prec, logw = means[labels], prec[labels], logw[labels]
    diff = x.double().unsqueeze(1) - means  # [B, C, 2]
    sol = (prec @ diff.unsqueeze(-1)).squeeze(-1)  # S^-1 (x - mu)
    logp = logw - 0.5 * (diff * sol).sum(-1)
    score = -(torch.softmax(logp, dim=1).unsqueeze(-1) * sol).sum(1)
    return (-(1 - a).sqrt() * score).to(x.dtype)


def oracle_sample_classes(
    gmm: GMM, n_per_class: int, schedule: VPSchedule, timesteps: Sequence[int] | Tensor, seed: int,
    cfg_scale: float = 1.0,
) -> list[Tensor]:
    """``sample_classes`` with the exact eps in place of a model (same noise for the same seed): the
    reference for what CFG at ``cfg_scale`` should give with this sampler, and at scale 1 nearly the
    truth (up to the DDIM discretisation)."""
    labels = torch.arange(gmm.num_classes).repeat_interleave(n_per_class)
    ab = schedule.alphas_cumprod

    def eps_fn(x: Tensor, t: Tensor) -> Tensor:
        a = ab[int(t[0])]
        eps_c = exact_eps(gmm, x, a, labels)
        return eps_c if cfg_scale == 1.0 else eps_c + (cfg_scale - 1) * (eps_c - exact_eps(gmm, x, a))

    x = torch.randn(len(labels), 2, generator=seeds.seeded_generator(seed, 0x5A3))
    return list(ddim_loop(eps_fn, x, schedule, timesteps).split(n_per_class))


def sample_classes(
    model: Denoiser,
    n_per_class: int,
    schedule: VPSchedule,
    timesteps: Sequence[int] | Tensor,
    seed: int,
    cfg_scale: float = 1.0,
) -> list[Tensor]:
    """n_per_class samples for every class, as a list indexed by class."""
    labels = torch.arange(model.num_classes).repeat_interleave(n_per_class)
    x = ddim_sample(model, labels, schedule, timesteps, seeds.seeded_generator(seed, 0x5A3), cfg_scale)
    return list(x.split(n_per_class))


# ---------------------------------------------------------------------------------------------
# Metrics


def w2(a: Tensor, b: Tensor) -> float:
    """Exact W2 between two equal-size point clouds: sqrt of the mean squared matched distance
    under the optimal one-to-one matching (Hungarian algorithm)."""
    if len(a) != len(b):
        raise ValueError(f"w2 needs equal-size samples, got {len(a)} and {len(b)}")
    cost = torch.cdist(a.double(), b.double()).pow(2).numpy()
    rows, cols = linear_sum_assignment(cost)
    return float(np.sqrt(cost[rows, cols].mean()))


def kl_entropy(x: Tensor, k: int = 5) -> float:
    """Kozachenko-Leonenko kNN estimate of differential entropy, in nats.

    H = psi(n) - psi(k) + log V_d + (d / n) sum_i log r_i, r_i the distance to the k-th neighbour.
    Duplicate points (r = 0) make it -inf, as they should for a degenerate sample.
    """
    n, d = x.shape
    dist = torch.cdist(x.double(), x.double())
    dist.fill_diagonal_(float("inf"))
    r = dist.topk(k, dim=1, largest=False).values[:, -1]
    log_vd = (d / 2) * math.log(math.pi) - gammaln(d / 2 + 1)
    return float(digamma(n) - digamma(k) + log_vd + d * torch.log(r).mean().item())


def per_class_w2(samples: Sequence[Tensor], truth: Sequence[Tensor]) -> float:
    """Mean over classes of W2(samples[k], truth[k])."""
    return float(np.mean([w2(s, t) for s, t in zip(samples, truth, strict=True)]))


def per_class_entropy(samples: Sequence[Tensor], k: int = 5) -> float:
    """Mean over classes of the KL entropy of each class's samples."""
    return float(np.mean([kl_entropy(s, k) for s in samples]))


def mean_nn_distance(x: Tensor, ref: Tensor) -> float:
    """Mean distance from each point of x to its nearest point of ref (a memorisation probe:
    compare a model's samples against the training set with fresh truth against it)."""
    return float(torch.cdist(x.double(), ref.double()).min(dim=1).values.mean())


def truth_samples(gmm: GMM, n_per_class: int, seed: int) -> list[Tensor]:
    """Independent exact draws per class (seed picks the draw)."""
    g = seeds.seeded_generator(seed, 0x7207)
    return [gmm.sample_class(k, n_per_class, g) for k in range(gmm.num_classes)]
