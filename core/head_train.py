"""Training a second (unconditional) head, pure torch: where the noisy states come from, one step
of either objective, resumable state.

The model is reached only through closures the node builds (``teach``, ``forward``, ``head``),
so nothing here knows ComfyUI. All predictions cross these closures as *denoised* (x0) tensors,
the model's common currency in ComfyUI; the losses turn them into the model's native prediction
(eps, v or flow) with ``core.objective.native_prediction``, so a head is trained in the same
space the model itself was, whatever its parameterisation.

Every random draw comes from a private generator seeded from (seed, stream, step) or, for the
trajectory pool, (seed, stream, chain, lap): step k is the same in a straight run and after a
resume at k, and the global RNG is never touched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch

from . import head_objective as ho
from . import objective as obj
from .seeds import seeded_generator
from .train import NaNLoss
from .train_data import epoch_indices

MODES: tuple[str, ...] = ("distill", "gist")
_DRAW, _POOL, _POOL_SCALE, _POOL_PROMPT, _POOL_NEGATIVE, _NEGATIVE = 0, 2, 3, 4, 5, 6  # 1: epoch_indices' permutations

# (x, sigma, prompt index, negative index per sample) -> (cond x0, uncond x0, features of the positive rows)
Teach = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, Any]]
# (x, sigma, caption index per sample) -> (cond x0, features)
Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, Any]]
# (features, x, sigma) -> the head's uncond x0, with grad
Head = Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor]


class Across(Protocol):
    """What a run on several processes exchanges each step (nodes/train/distributed.py: torch.distributed)."""

    def mean(self, value: torch.Tensor) -> torch.Tensor: ...  # the average over the processes
    def average_grads(self, params: list[torch.nn.Parameter]) -> None: ...  # in place; a missing grad counts 0
    def gather(self, part: torch.Tensor, total: int) -> torch.Tensor: ...  # every process's rows, in rank order


@dataclass
class HeadTrainConfig:
    mode: str = "distill"
    steps: int = 200
    learning_rate: float = 1e-4
    cfg_min: float = 3.0
    cfg_max: float = 9.0
    seed: int = 0
    batch_size: int = 4
    prediction: str = "eps"
    max_grad_norm: float = 1.0
    rolled_fraction: float = ho.GIST_FRACTION  # gist: the share of samples whose caption is swapped

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ho.HeadTrainError(f"mode must be one of {list(MODES)}, got {self.mode!r}")
        if self.steps < 1:
            raise ho.HeadTrainError(f"steps must be >= 1, got {self.steps}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ho.HeadTrainError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.batch_size < 1:
            raise ho.HeadTrainError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.prediction not in obj.PREDICTIONS:
            raise ho.HeadTrainError(f"prediction must be one of {obj.PREDICTIONS}, got {self.prediction!r}")
        if not 0.0 < self.rolled_fraction < 1.0:
            raise ho.HeadTrainError(f"rolled_fraction must be in (0, 1), got {self.rolled_fraction}")
        ho.check_scale_range(self.cfg_min, self.cfg_max)

    def as_dict(self) -> dict:
        return asdict(self)


class TrajectoryPool:
    """``n`` chains, each following Euler steps of the teacher's CFG-guided prediction down a short
    sigma schedule from pure noise (research/singlepass.md 4.3: train on on-policy states).

    A chain draws its guidance scale in [cfg_min, cfg_max], its prompt and its negative prompt (of
    ``n_negatives``) once per lap; a chain
    that reaches the last non-zero sigma restarts from fresh seeded noise. Chains are staggered by
    cutting chain j's *first* lap short by ``j*K/n`` steps, so after a few steps a batch mixes
    sigmas without a single teacher call spent outside training, and every state stays on-policy.
    The Euler step ``x + (x - D)/sigma * (sigma' - sigma)`` is right for eps, v and flow models in
    ComfyUI's coordinates, where D is the guided denoised (x0) prediction.
    """

    def __init__(self, sigmas: torch.Tensor, n: int, shape: Sequence[int], start: Callable[[torch.Tensor], torch.Tensor],
                 n_prompts: int, cfg_min: float, cfg_max: float, seed: int, device: torch.device | str = "cpu",
                 n_negatives: int = 1) -> None:
        sigmas = sigmas.detach().float().cpu()
        if sigmas.dim() != 1 or len(sigmas) < 2 or not (sigmas[:-1] > 0).all():
            raise ho.HeadTrainError("the trajectory schedule needs at least one positive sigma followed by the last one")
        if n < 1 or n_prompts < 1 or n_negatives < 1:
            raise ho.HeadTrainError("the trajectory pool needs at least one chain, one prompt and one negative")
        ho.check_scale_range(cfg_min, cfg_max)
        self.sigmas, self.k = sigmas, len(sigmas) - 1  # states live at sigmas[0..k-1]
        self.n, self.shape, self.start = n, tuple(shape), start
        self.n_prompts, self.cfg_min, self.cfg_max, self.seed = n_prompts, cfg_min, cfg_max, seed
        self.n_negatives = n_negatives
        self.device = torch.device(device)
        self.x = torch.empty((n, *self.shape), device=self.device)
        self.index = torch.zeros(n, dtype=torch.long)
        self.lap = torch.zeros(n, dtype=torch.long)
        self.stop = torch.tensor([self.k - (j * self.k) // n for j in range(n)], dtype=torch.long)
        self.scale = torch.empty(n)
        self.prompt = torch.zeros(n, dtype=torch.long)
        self.negative = torch.zeros(n, dtype=torch.long)
        for j in range(n):
            self._restart(j)

    def _restart(self, j: int) -> None:
        lap = int(self.lap[j])
        noise = torch.randn(self.shape, generator=seeded_generator(self.seed, _POOL, j, lap))
        self.x[j] = self.start(noise.to(self.device)).to(self.x.dtype)
        self.index[j] = 0
        g = seeded_generator(self.seed, _POOL_SCALE, j, lap)
        self.scale[j] = self.cfg_min + (self.cfg_max - self.cfg_min) * torch.rand((), generator=g)
        self.prompt[j] = torch.randint(self.n_prompts, (), generator=seeded_generator(self.seed, _POOL_PROMPT, j, lap))
        if self.n_negatives > 1:  # its own stream: a pool of one negative draws exactly as before
            g = seeded_generator(self.seed, _POOL_NEGATIVE, j, lap)
            self.negative[j] = torch.randint(self.n_negatives, (), generator=g)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x, sigma, guidance scale, prompt index) of every chain, as they are now."""
        return self.x.clone(), self.sigmas[self.index].to(self.device), self.scale.clone(), self.prompt.clone()

    def negatives(self) -> torch.Tensor:
        """The negative prompt index of every chain (its guided trajectory uses it)."""
        return self.negative.clone()

    def advance(self, guided_x0: torch.Tensor) -> None:
        """One Euler step of every chain along the guided prediction at its current state."""
        sigma = self.sigmas[self.index].to(self.device).view(-1, *[1] * len(self.shape))
        nxt = self.sigmas[self.index + 1].to(self.device).view_as(sigma)
        d = (self.x - guided_x0.to(self.x.dtype)) / sigma
        self.x = self.x + d * (nxt - sigma)
        self.index += 1
        for j in torch.nonzero(self.index >= self.stop).flatten().tolist():
            self.lap[j] += 1
            self.stop[j] = self.k
            self._restart(j)

    def state_dict(self) -> dict:
        return {"x": self.x.detach().cpu().clone(), "index": self.index.clone(), "lap": self.lap.clone(),
                "stop": self.stop.clone(), "scale": self.scale.clone(), "prompt": self.prompt.clone(),
                "negative": self.negative.clone()}

    def load_state_dict(self, state: Mapping) -> None:
        if tuple(state["x"].shape) != tuple(self.x.shape):
            raise ho.HeadTrainError(f"the saved trajectory pool has shape {list(state['x'].shape)}, this run needs "
                                    f"{list(self.x.shape)}: resume with the same latent size")
        self.x = state["x"].to(self.device, self.x.dtype)
        for name in ("index", "lap", "stop", "scale", "prompt"):
            setattr(self, name, state[name].clone())
        self.negative = state.get("negative", torch.zeros_like(self.prompt)).clone()  # older states: one


class HeadTrainer:
    """One objective step at a time; ``params`` are what the optimizer trains in the head (the head, or
    a LoRA in it), ``backbone`` the model's own trainable parameters (gist only: a LoRA on the model).

    - distill: ``teach`` (no grad) gives the teacher's cond and uncond predictions (the uncond for each
      sample's negative prompt, of ``n_negatives``) and the features of the positive rows; ``head`` predicts the uncond from those features; loss ``distill_loss``.
      States come from ``pool`` (on-policy trajectories) or, if given, noised ``latents``.
    - gist: each shuffled batch swaps about ``rolled_fraction`` of its captions (``ho.swap_captions``); ``forward`` gives the cond prediction and
      features under the captions as rolled; loss ``gist_loss`` with the head's output on rolled
      samples and the cond output on the others. With ``backbone`` (seed 003 in full) ``forward`` runs
      with grad and its features are not detached: non-rolled samples train the backbone through the
      cond output, rolled ones train the head and, through the shared features, the backbone too.
      Without it the backbone is frozen (no grad) and the cond term trains nothing.

    ``shard`` (rank, processes) with ``across``: data-parallel. Every process draws the global batch (and
    holds the whole trajectory pool, advanced alike from the gathered guided predictions), runs the model
    on its rows only, and the gradients are averaged over the processes before clipping.

    Head and backbone gradients are clipped separately, so the backbone's gradient (from every
    sample) never scales the head's step, which then depends on the rolled samples only.
    """

    def __init__(self, cfg: HeadTrainConfig, params: Sequence[torch.nn.Parameter], head: Head,
                 sigma_table: torch.Tensor, *, teach: Teach | None = None, forward: Forward | None = None,
                 latents: torch.Tensor | None = None, captions: torch.Tensor | None = None, n_prompts: int = 1,
                 pool: TrajectoryPool | None = None, backbone: Sequence[torch.nn.Parameter] = (),
                 device: torch.device | str = "cpu", n_negatives: int = 1, shard: tuple[int, int] = (0, 1),
                 across: Across | None = None) -> None:
        cfg.validate()
        if backbone and cfg.mode != "gist":
            raise ho.HeadTrainError("only gist mode trains the model itself; distill keeps it frozen (its LoRA, "
                                    "if any, lives inside the head)")
        if cfg.mode == "distill" and (teach is None or (pool is None) == (latents is None)):
            raise ho.HeadTrainError("distill mode needs a teacher and either a trajectory pool or latents")
        if cfg.mode == "gist" and (forward is None or latents is None or captions is None):
            raise ho.HeadTrainError("gist mode needs a LATENT with one caption per latent")
        if latents is not None and not torch.isfinite(latents).all():
            raise ho.HeadTrainError("the latents contain NaN or Inf values")
        self.cfg, self.params, self.head = cfg, list(params), head
        self.teach, self.forward, self.pool = teach, forward, pool
        self.sigma_table = sigma_table.detach().float().cpu()
        self.latents = None if latents is None else latents.detach().float().cpu()
        self.captions = captions
        self.n_prompts = n_prompts
        self.n_negatives = n_negatives  # distill: the negative prompts the teacher draws from (per sample)
        self.backbone = list(backbone)
        self.device = torch.device(device)
        self.groups = [g for g in (self.params, self.backbone) if g]
        self.optimizer = torch.optim.AdamW([{"params": g} for g in self.groups], lr=cfg.learning_rate,
                                           weight_decay=0.0)
        self.shard, self.across = shard, across
        if shard[1] > 1 and across is None:
            raise ho.HeadTrainError("a run on several processes needs their communication (across)")
        self.step = 0
        self.losses: list[float] = []
        self.head_samples = 0  # gist: samples that supervised the head (swapped captions), over the run

    def _mine(self, n: int) -> tuple[slice, float]:
        """This process's rows of a global batch of ``n`` (torch.tensor_split's parts, in rank order) and
        the factor that makes its mean loss count by its share: averaged over the processes, the factored
        losses (and their gradients) are the global batch's mean."""
        rank, world = self.shard
        if n < world:
            raise ho.HeadTrainError(f"a batch of {n} cannot be split over {world} processes: raise batch_size "
                                    "(or the LATENT's batch) to at least the number of processes")
        sizes = [len(part) for part in torch.tensor_split(torch.arange(n), world)]
        start = sum(sizes[:rank])
        return slice(start, start + sizes[rank]), sizes[rank] * world / n

    def _native(self, x0: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return obj.native_prediction(self.cfg.prediction, x.float(), x0.float(), sigma.float())

    def _noised(self, idx: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        x0 = self.latents[idx]
        sigma = self.sigma_table[torch.randint(len(self.sigma_table), (len(idx),), generator=g)]
        noise = torch.randn(x0.shape, generator=g)
        x = obj.noisy_input(self.cfg.prediction, x0, noise, sigma)
        target = obj.native_target(self.cfg.prediction, x0, noise, sigma)
        dev = self.device
        return x.to(dev), sigma.to(dev), target.to(dev)

    def distill_loss(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(loss, guided x0 to advance the pool with, if any)."""
        cfg = self.cfg
        g = seeded_generator(cfg.seed, _DRAW, step)
        if self.pool is not None:
            x, sigma, scale, prompt = self.pool.batch()
            negative = self.pool.negatives()
        else:
            n = len(self.latents)
            idx = epoch_indices(n, cfg.batch_size, step * cfg.batch_size, cfg.seed)
            x, sigma, _ = self._noised(idx, g)
            scale = ho.sample_scales(len(idx), cfg.cfg_min, cfg.cfg_max, g)
            prompt = idx if self.n_prompts == n else torch.randint(self.n_prompts, (len(idx),), generator=g)
            negative = torch.randint(self.n_negatives, (len(idx),), generator=seeded_generator(cfg.seed, _NEGATIVE, step))
        n = len(x)  # every process draws the global batch (and holds the whole pool); each takes its rows
        part, share = self._mine(n)
        x, sigma, scale, prompt, negative = (t[part] for t in (x, sigma, scale, prompt, negative))
        with torch.no_grad():
            cond, uncond, feats = self.teach(x, sigma, prompt, negative)
        u_hat = self.head(feats, x, sigma)
        loss = ho.distill_loss(self._native(u_hat, x, sigma), self._native(uncond, x, sigma), scale,
                               cfg.cfg_min, cfg.cfg_max) * share
        guided = None
        if self.pool is not None:
            s = scale.to(cond.device).view(-1, *[1] * (cond.dim() - 1))
            guided = ho.guided(cond.float(), uncond.float(), s)
            if self.across is not None:  # every process advances the whole pool alike
                guided = self.across.gather(guided, n)
        return loss, guided

    def gist_loss(self, step: int) -> torch.Tensor:
        cfg = self.cfg
        g = seeded_generator(cfg.seed, _DRAW, step)
        idx = epoch_indices(len(self.latents), cfg.batch_size, step * cfg.batch_size, cfg.seed)
        captions, rolled = ho.swap_captions(self.captions[idx], self.captions, cfg.rolled_fraction, g)
        self.head_samples += int(rolled.sum())
        x, sigma, target = self._noised(idx, g)
        part, share = self._mine(len(idx))
        x, sigma, target, captions, rolled = (t[part] for t in (x, sigma, target, captions, rolled))
        # A frozen backbone gets no graph: its cond term carries no gradient then.
        with torch.set_grad_enabled(bool(self.backbone)):
            cond, feats = self.forward(x, sigma, captions)
        u_hat = self.head(feats, x, sigma)
        return ho.gist_loss(self._native(cond, x, sigma), self._native(u_hat, x, sigma), target, rolled) * share

    def train_step(self) -> float:
        """One optimizer step. Raises NaNLoss before stepping (the head stays as it was)."""
        # Cosine decay to 0 at `steps`: the head starts at the base weights, and a decaying rate
        # settles it instead of leaving it to wander by lr per step around the optimum.
        factor = obj.lr_factor("cosine", self.step, self.cfg.steps, 0)
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.learning_rate * factor
        self.optimizer.zero_grad(set_to_none=True)
        guided = None
        if self.cfg.mode == "distill":
            loss, guided = self.distill_loss(self.step)
        else:
            loss = self.gist_loss(self.step)
        value = float(loss.detach() if self.across is None else self.across.mean(loss.detach()))
        if not math.isfinite(value):  # the same on every process: all stop together
            raise NaNLoss(self.step)
        loss.backward()
        if self.across is not None:
            self.across.average_grads([p for group in self.groups for p in group])
        if self.cfg.max_grad_norm > 0:
            for group in self.groups:
                torch.nn.utils.clip_grad_norm_(group, self.cfg.max_grad_norm)
        self.optimizer.step()
        if guided is not None:
            self.pool.advance(guided)
        self.step += 1
        self.losses.append(value)
        return value

    def state_dict(self) -> dict:
        return {"step": self.step, "losses": list(self.losses), "optimizer": self.optimizer.state_dict(),
                "params": [p.detach().cpu().clone() for p in self.params],
                "backbone": [p.detach().cpu().clone() for p in self.backbone],
                "pool": None if self.pool is None else self.pool.state_dict(), "head_samples": self.head_samples}

    def load_state_dict(self, state: Mapping) -> None:
        saved = state["params"]
        if len(saved) != len(self.params) or any(tuple(p.shape) != tuple(v.shape)
                                                  for p, v in zip(self.params, saved, strict=False)):
            raise ho.HeadTrainError("the saved training state does not fit this head: resume with the same head "
                                    "type, lora_rank and model, or switch resume off")
        backbone = state.get("backbone") or []
        if len(backbone) != len(self.backbone) or any(tuple(p.shape) != tuple(v.shape)
                                                      for p, v in zip(self.backbone, backbone, strict=False)):
            raise ho.HeadTrainError("the saved training state does not fit this run's LoRA of the model: resume "
                                    "with the same mode, lora_rank and model, or switch resume off")
        if (state.get("pool") is None) != (self.pool is None):
            raise ho.HeadTrainError("the saved training state was made with%s a LATENT: resume with the same inputs"
                                    % ("out" if state.get("pool") is not None else ""))
        with torch.no_grad():
            for p, v in zip(self.params + self.backbone, list(saved) + list(backbone), strict=True):
                p.copy_(v)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.pool is not None:
            self.pool.load_state_dict(state["pool"])
        self.step = int(state["step"])
        self.losses = [float(x) for x in state["losses"]]
        self.head_samples = int(state.get("head_samples", 0))


def merged_state(head: torch.nn.Module, lora: Any) -> dict[str, torch.Tensor]:
    """The head's state with a ``core.lora.LoRANetwork`` on its layers merged into their weights
    (``W + scale * up @ down``; a conv LoRA is a k x k down conv and a 1 x 1 up conv), so a head trained
    with a LoRA is saved in the plain head format."""
    out = {k: v.detach().to("cpu", torch.float32).clone() for k, v in head.state_dict().items()}
    for key, mod in lora.named_loras():
        up, down = mod.up.weight.detach().cpu().float(), mod.down.weight.detach().cpu().float()
        if down.dim() == 4:
            delta = torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
        else:
            delta = up @ down
        out[f"{key}.weight"] = out[f"{key}.weight"] + mod.scale * delta
    return out
