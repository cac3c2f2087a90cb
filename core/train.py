"""The LoRA training loop, pure torch: batches, regularizers, loss, optimizer, resumable state.

The model is a closure ``denoise(x_in, sigma, rows) -> x0_hat`` with one cond row per latent (the
node wraps ComfyUI's ``apply_model`` and batches the rows as its sampler would), so this file knows
nothing about ComfyUI. Every random draw comes from a private
generator seeded from (seed, step, micro-step, stream), so step k is the same whether the run
started at 0 or resumed at k, and each regularizer has its own stream: switching one on changes
only what it should.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any

import torch

from . import objective as obj
from . import optim
from .lora import LAYER_SETS
from .noise import row_generators, structure_noise
from .perturb import DISTRIBUTIONS, apply_cep
from .seeds import seeded_generator
from .train_data import DataError, TrainData

log = logging.getLogger("supercond")

Cond = dict[str, Any]  # one prompt, e.g. {"cross_attn": [1, T, D], "pooled_output": [1, P], "guidance": 3.5}
Denoise = Callable[[torch.Tensor, torch.Tensor, Sequence[Cond]], torch.Tensor]
# The text parts of a row that CEP perturbs, and their encoder segments (None: one segment).
TEXT_PARTS: dict[str, tuple[int, ...] | None] = {"cross_attn": None, "pooled_output": None}

# Streams of the per-step generators.
_MAIN, _PERM, _IP, _CEP, _DROP, _STRUCT, _VAL = range(7)
VALIDATION_POINTS = (0.1, 0.3, 0.5, 0.7, 0.9)  # quantiles of the model's sigmas the validation loss uses
PYRAMID_DISCOUNT = 0.3  # kohya's usual multires discount


class TrainError(ValueError):
    """Bad training input: the message says what was wrong and what to do."""


class NaNLoss(RuntimeError):
    def __init__(self, step: int) -> None:
        self.step = step
        super().__init__(f"the loss became NaN/Inf at step {step + 1}")


@dataclass
class TrainConfig:
    steps: int = 100
    learning_rate: float = 1e-4
    rank: int = 8
    alpha: float = 8.0
    batch_size: int = 1
    grad_accumulation: int = 1
    prediction: str = "eps"
    loss_weighting: str = "none"
    min_snr_gamma: float = 5.0
    cep_gamma: float = 0.0
    cep_distribution: str = "uniform"
    input_perturbation: float = 0.0
    offset_noise: float = 0.0
    pyramid_iterations: int = 0
    caption_dropout: float = 0.0
    seed: int = 0
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    max_grad_norm: float = 0.0
    optimizer: str = "adamw"
    ema_decay: float = 0.0  # 0 = off
    text_encoder_lr: float = 0.0  # 0 = the text encoder is not trained
    lora_layers: str = "all"  # which layers get a LoRA: core.lora.LAYER_SETS

    def validate(self) -> None:
        if self.steps < 1:
            raise TrainError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1 or self.grad_accumulation < 1:
            raise TrainError("batch_size and grad_accumulation must be >= 1")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise TrainError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.prediction not in obj.PREDICTIONS:
            raise TrainError(f"prediction must be one of {obj.PREDICTIONS}, got {self.prediction!r}")
        if self.loss_weighting not in obj.WEIGHTINGS:
            raise TrainError(f"loss_weighting must be one of {obj.WEIGHTINGS}, got {self.loss_weighting!r}")
        if self.cep_distribution not in DISTRIBUTIONS:
            raise TrainError(f"cep_distribution must be one of {DISTRIBUTIONS}")
        if self.optimizer not in optim.OPTIMIZERS:
            raise TrainError(f"optimizer must be one of {optim.OPTIMIZERS}, got {self.optimizer!r}")
        if self.lora_layers not in LAYER_SETS:
            raise TrainError(f"lora_layers must be one of {LAYER_SETS}, got {self.lora_layers!r}")
        if not (0.0 <= self.ema_decay < 1.0):
            raise TrainError(f"ema_decay must be in [0, 1) (0 = off, 0.999 typical), got {self.ema_decay}")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise TrainError(f"caption_dropout must be in [0, 1], got {self.caption_dropout}")
        for name in ("cep_gamma", "input_perturbation", "offset_noise", "max_grad_norm", "text_encoder_lr"):
            v = getattr(self, name)
            if v < 0 or not math.isfinite(v):
                raise TrainError(f"{name} must be a finite number >= 0, got {v}")

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Batch:
    indices: torch.Tensor
    x0: torch.Tensor
    noise: torch.Tensor  # the noise the target is built from (offset/pyramid included)
    x_in: torch.Tensor  # the model input (input perturbation included)
    sigma: torch.Tensor
    target: torch.Tensor
    cond: list[Cond]  # one row per latent
    mask: torch.Tensor | None = None  # [B, 1, h, w] loss weights (masked loss), None: all ones
    share: float = 1.0  # data-parallel: this rank's rows / its even share of the micro-batch (Trainer._slice)


def batch_cond(conds: Sequence[Cond]) -> Cond:
    """Stack per-sample conds' tensors; token axes of different lengths are repeated to their LCM (as
    ComfyUI does for cross-attention). Other values must agree across the rows."""
    out: Cond = {}
    for key in conds[0]:
        parts = [c[key] for c in conds]
        if not isinstance(parts[0], torch.Tensor):
            if any(p != parts[0] for p in parts[1:]):
                raise TrainError(f"the prompts of one batch disagree on {key!r}: use batch_size 1")
            out[key] = parts[0]
            continue
        if parts[0].dim() == 3 and len({p.shape[1] for p in parts}) > 1:
            lcm = math.lcm(*(p.shape[1] for p in parts))
            parts = [p.repeat(1, lcm // p.shape[1], 1) for p in parts]
        out[key] = torch.cat(parts, dim=0)
    return out


class Trainer:
    def __init__(self, cfg: TrainConfig, params: Sequence[torch.nn.Parameter], denoise: Denoise,
                 sigmas: torch.Tensor, latents: torch.Tensor, conds: Sequence[Cond],
                 empty_cond: Cond | None = None, device: torch.device | str = "cpu",
                 text_parts: Mapping[str, tuple[int, ...] | None] | None = None,
                 masks: Sequence[torch.Tensor | None] | None = None,
                 flipped: Sequence[torch.Tensor] | None = None, text_params: Sequence[torch.nn.Parameter] = (),
                 encode_text: Callable[[list[str]], list[Cond]] | None = None,
                 shard: tuple[int, int] = (0, 1), mean_across: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 ) -> None:
        """``latents``: [N, ...] or N tensors [1, ...] of bucket sizes; ``conds``: a row per latent (or one
        for all), or per latent a list of caption variants; ``masks``/``flipped``: see TrainData.
        ``text_params`` (a text-encoder LoRA, trained at ``cfg.text_encoder_lr``) with ``encode_text``
        (captions -> fresh text parts, with grad): rows then carry their caption as ``text``.
        ``shard`` (rank, world): data-parallel training. ``cfg.batch_size`` is the global batch; every rank
        draws it whole (the same draws as one process) and trains on its slice of ``batch_size / world``
        rows, ``denoise`` averages the gradients across ranks (DistributedDataParallel) and
        ``mean_across`` the step's loss, so every rank steps alike and the losses are the global ones."""
        cfg.validate()
        rank, world = shard
        if world < 1 or not 0 <= rank < world or cfg.batch_size % world:
            raise TrainError(f"a batch of {cfg.batch_size} cannot be split evenly over {world} processes: use a "
                             f"batch_size per process, and the same on every process")
        self.shard = shard
        self.mean_across = mean_across
        if cfg.caption_dropout > 0 and empty_cond is None:
            raise TrainError("caption_dropout needs the empty prompt's conditioning; use SupercondLoadDataset "
                             "(it adds it) or set caption_dropout to 0")
        stored = [[stored_row(r) for r in c] if isinstance(c, (list, tuple)) else stored_row(c) for c in conds]
        try:
            self.data = TrainData(latents, stored, masks, flipped)
        except DataError as e:
            raise TrainError(str(e)) from None
        self.cfg = cfg
        self.params = list(params) + list(text_params)
        self.encode_text = encode_text
        if text_params and encode_text is None:
            raise TrainError("a text-encoder LoRA needs a text encoder to encode the captions with")
        groups = [{"params": list(params), "base_lr": cfg.learning_rate}]
        if text_params:
            groups.append({"params": list(text_params), "base_lr": cfg.text_encoder_lr})
        self.denoise = denoise
        self.sigmas = sigmas.detach().float().cpu()
        self.latents = self.data.stacked  # [N, ...] when the items share one size, else None
        self.conds = stored
        self.empty = stored_row(empty_cond) if empty_cond else None
        self.text_parts = dict(TEXT_PARTS if text_parts is None else text_parts)
        self.device = torch.device(device)
        try:
            self.optimizer = optim.make(cfg.optimizer, groups, cfg.learning_rate, self.device)
        except optim.OptimizerError as e:
            raise TrainError(str(e)) from None
        self.step = 0  # optimizer steps done
        self.ema = [p.detach().float().clone() for p in self.params] if cfg.ema_decay > 0 else None
        self.losses: list[float] = []
        self.val_losses: list[tuple[int, float]] = []  # (step, held-out loss)

    # -- data ------------------------------------------------------------------------------------
    def indices(self, step: int, micro: int) -> torch.Tensor:
        return self._drawn_indices(step, micro)[0]

    def _drawn_indices(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data.draw_indices(self.cfg.batch_size, step * self.cfg.grad_accumulation + micro, self.cfg.seed)

    def batch(self, step: int, micro: int) -> Batch:
        cfg = self.cfg
        drawn = self.data.draw(*self._drawn_indices(step, micro), cfg.seed)
        idx, x0 = drawn.indices, drawn.x0
        g = seeded_generator(cfg.seed, _MAIN, step, micro)
        sigma = self.sigmas[torch.randint(len(self.sigmas), (len(idx),), generator=g)]
        noise = torch.randn(x0.shape, generator=g)
        if cfg.offset_noise > 0 or cfg.pyramid_iterations > 0:
            gens = row_generators(int(seeded_generator(cfg.seed, _STRUCT, step, micro).initial_seed()), idx.tolist())
            noise = structure_noise(noise, gens, cfg.offset_noise, cfg.pyramid_iterations, PYRAMID_DISCOUNT,
                                    normalize=False)
        model_noise = noise
        if cfg.input_perturbation > 0:  # DDPM-IP: perturb the input only; the target keeps `noise`
            xi = torch.randn(x0.shape, generator=seeded_generator(cfg.seed, _IP, step, micro))
            model_noise = noise + cfg.input_perturbation * xi
        x_in = obj.noisy_input(cfg.prediction, x0, model_noise, sigma)
        target = obj.native_target(cfg.prediction, x0, noise, sigma)
        rows = self._cond(drawn.rows, step, micro)
        mine, share = self._slice(len(idx))
        dev = self.device
        mask = drawn.mask[mine].to(dev) if drawn.mask is not None else None
        return Batch(idx[mine], x0[mine].to(dev), noise[mine].to(dev), x_in[mine].to(dev), sigma[mine].to(dev),
                     target[mine].to(dev), [_on(r, dev) for r in rows[mine]], mask, share)

    def _slice(self, rows: int) -> tuple[slice, float]:
        """This rank's rows of a micro-batch of ``rows`` and the factor on its mean loss that makes the
        ranks' average the mean over all rows. A bucket's last micro-batch may hold fewer rows than ranks:
        a rank left without one trains on the first row at weight 0 (every rank must take part in a step)."""
        rank, world = self.shard
        mine = slice(rank * rows // world, (rank + 1) * rows // world)  # all of it with one process
        n = mine.stop - mine.start
        return (mine, n * world / rows) if n else (slice(0, 1), 0.0)

    def _cond(self, rows: list[Cond], step: int, micro: int) -> list[Cond]:
        cfg = self.cfg
        if cfg.caption_dropout > 0:
            drop = torch.rand(len(rows), generator=seeded_generator(cfg.seed, _DROP, step, micro))
            rows = [self.empty if d < cfg.caption_dropout else r for r, d in zip(rows, drop.tolist(), strict=True)]
        rows = self.encoded(rows)
        if cfg.cep_gamma > 0:  # after dropout, as in OneTrainer #1235; training only; one stream, row by row
            g = seeded_generator(cfg.seed, _CEP, step, micro)
            rows = [{k: apply_cep(v, cfg.cep_gamma, cfg.cep_distribution, "paper", g, self.text_parts[k])
                     if k in self.text_parts and isinstance(v, torch.Tensor) else v for k, v in r.items()}
                    for r in rows]
        return rows

    # -- loss and step ---------------------------------------------------------------------------
    def loss(self, b: Batch) -> torch.Tensor:
        cfg = self.cfg
        x0_hat = self.denoise(b.x_in, b.sigma, b.cond)
        pred = obj.native_prediction(cfg.prediction, b.x_in.float(), x0_hat.float(), b.sigma.float())
        w = obj.loss_weight(cfg.loss_weighting, cfg.prediction, b.sigma, cfg.min_snr_gamma)
        loss = obj.weighted_mse(pred, b.target, w, b.mask)
        return loss if b.share == 1.0 else loss * b.share

    def train_step(self, between_micro: Callable[[], None] | None = None) -> float:
        """One optimizer step (grad_accumulation micro-batches). Raises NaNLoss before stepping."""
        cfg = self.cfg
        factor = obj.lr_factor(cfg.lr_schedule, self.step, cfg.steps, cfg.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = group.get("base_lr", cfg.learning_rate) * factor
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        # DistributedDataParallel (several processes): gradients are averaged across them once, on the last
        # micro-batch's backward; the others only accumulate (its no_sync).
        no_sync = getattr(self.denoise, "no_sync", None)
        for micro in range(cfg.grad_accumulation):
            if between_micro is not None:
                between_micro()
            last = micro == cfg.grad_accumulation - 1
            with no_sync() if no_sync is not None and not last else contextlib.nullcontext():
                loss = self.loss(self.batch(self.step, micro)) / cfg.grad_accumulation
                loss.backward()
            total += loss.detach()
        if self.mean_across is not None:
            total = self.mean_across(total)
        value = float(total)  # one sync per optimizer step
        if not math.isfinite(value):
            self.optimizer.zero_grad(set_to_none=True)
            raise NaNLoss(self.step)
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        self.optimizer.step()
        self._update_ema()
        self.step += 1
        self.losses.append(value)
        return value

    def encoded(self, rows: list[Cond]) -> list[Cond]:
        """With a text-encoder LoRA: each row's text parts encoded afresh from its caption (with grad)."""
        if self.encode_text is None:
            return rows
        fresh = self.encode_text([r["text"] for r in rows])
        return [{**r, **f} for r, f in zip(rows, fresh, strict=True)]

    # -- validation ----------------------------------------------------------------------------------
    def validation_loss(self, held_out: TrainData) -> float:
        """The plain objective (no regularizer) on every held-out item at fixed sigmas (VALIDATION_POINTS)
        with fixed noise per item: the same draws at every step and after resume, so the curve compares
        weights, not luck. Recorded in ``val_losses`` at the current step."""
        cfg = self.cfg
        q = torch.tensor(VALIDATION_POINTS)
        sigma = self.sigmas[(q * (len(self.sigmas) - 1)).round().long()]
        total, count = 0.0, 0
        with torch.no_grad():
            for i in range(held_out.n):
                drawn = held_out.draw(torch.tensor([i]), torch.tensor([-1]), cfg.seed)
                x0 = drawn.x0.expand(len(sigma), *drawn.x0.shape[1:])
                noise = torch.randn(x0.shape, generator=seeded_generator(cfg.seed, _VAL, i))
                mask = drawn.mask.expand(len(sigma), *drawn.mask.shape[1:]) if drawn.mask is not None else None
                dev = self.device
                b = Batch(drawn.indices, x0.to(dev), noise.to(dev), obj.noisy_input(cfg.prediction, x0, noise, sigma).to(dev),
                          sigma.to(dev), obj.native_target(cfg.prediction, x0, noise, sigma).to(dev),
                          [_on(self.encoded(drawn.rows)[0], dev)] * len(sigma),
                          mask.to(dev) if mask is not None else None)
                total += float(self.loss(b))
                count += 1
        value = total / count
        self.val_losses = [v for v in self.val_losses if v[0] != self.step] + [(self.step, value)]
        return value

    # -- EMA -------------------------------------------------------------------------------------
    def _update_ema(self) -> None:
        """ema <- d ema + (1 - d) params, d = min(ema_decay, (1 + t) / (10 + t)) at update t = 0, 1, ...
        (diffusers' EMAModel warm-up), so a short run's EMA is not stuck near the zero-initialised start."""
        if self.ema is None:
            return
        d = min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for e, p in zip(self.ema, self.params, strict=True):
                e.mul_(d).add_(p.detach().float(), alpha=1 - d)

    @contextmanager
    def ema_applied(self) -> Iterator[None]:
        """The parameters hold the EMA inside the block (to save or sample it), their own values after."""
        if self.ema is None:
            yield
            return
        own = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, e in zip(self.params, self.ema, strict=True):
                p.copy_(e)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, o in zip(self.params, own, strict=True):
                    p.copy_(o)

    # -- resume ----------------------------------------------------------------------------------
    @cached_property
    def data_digest(self) -> str:
        """Identity of what the run trains on: the latents and every conditioning tensor (fixed for the run,
        so hashed once, not at every save)."""
        h = hashlib.sha256()
        simple = self.latents is not None and self.data.flipped is None and self.data.masks is None and all(
            len(v) == 1 for v in self.data.conds)
        if simple:  # the form states recorded before buckets, flips and masks existed: they still resume
            pairs = [p for row in [{"latents": self.latents}, *self.conds] for p in sorted(row.items())]
        else:
            pairs = self.data.tensors()
        for key, value in [*pairs, *sorted((self.empty or {}).items())]:
            h.update(key.encode())
            if isinstance(value, torch.Tensor):
                h.update(str(tuple(value.shape)).encode())
                h.update(value.detach().float().contiguous().numpy().tobytes())
            else:
                h.update(repr(value).encode())
        return h.hexdigest()[:32]

    def state_dict(self) -> dict:
        return {"step": self.step, "losses": list(self.losses), "optimizer": self.optimizer.state_dict(),
                "params": [p.detach().cpu().clone() for p in self.params],
                "config": resumable_config(self.cfg), "data": self.data_digest,
                "val_losses": [list(v) for v in self.val_losses],
                "ema": [e.cpu().clone() for e in self.ema] if self.ema is not None else None}

    def load_state_dict(self, state: Mapping) -> None:
        missing = [k for k in ("step", "losses", "optimizer", "params") if not isinstance(state, Mapping)
                   or k not in state]
        if missing:
            raise TrainError(f"it is not a Supercond trainer state (no {', '.join(missing)})")
        if len(state["params"]) != len(self.params):  # first: another model says more than its settings
            was = {**_DEFAULTS, **(state.get("config") or {})}["lora_layers"]
            if was != self.cfg.lora_layers:
                raise TrainError(f"the run was started with other settings (lora_layers {was!r} -> "
                                 f"{self.cfg.lora_layers!r}). Resume with the same lora_layers or switch resume off")
            raise TrainError("the checkpoint's LoRA has a different layer set: train on the same model and rank")
        check_resume(state, resumable_config(self.cfg), self.data_digest)
        with torch.no_grad():
            for p, v in zip(self.params, state["params"], strict=True):
                if p.shape != v.shape:
                    raise TrainError(f"the checkpoint's LoRA has shape {list(v.shape)} where {list(p.shape)} "
                                     "is expected (a different rank?)")
                p.copy_(v)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None:
            ema = state.get("ema") or [p.detach().float() for p in self.params]  # older states: start it here
            self.ema = [e.to(p.device, torch.float32).clone() for e, p in zip(ema, self.params, strict=True)]
        self.step = int(state["step"])
        self.losses = [float(x) for x in state["losses"]]
        self.val_losses = [(int(s), float(v)) for s, v in state.get("val_losses", [])]


_DEFAULTS = {"text_encoder_lr": 0.0, "lora_layers": "all"}


def resumable_config(cfg: Any) -> dict:
    """The settings a resumed run must share with the run it continues: all but ``steps`` (a resumed
    run may go on to a new total)."""
    return {k: v for k, v in asdict(cfg).items() if k != "steps"}


def check_resume(state: Mapping, config: Mapping, data: str) -> None:
    """Refuse to continue a run with other settings or data, naming what changed. States written before
    these were recorded are resumed as before, with a warning."""
    if "config" not in state:
        log.warning("supercond: this trainer state does not record its settings (an older Supercond): "
                    "resuming without checking that they match")
        return
    old = {**_DEFAULTS, **state["config"]}  # settings added since the state was written: their defaults
    changed = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in config.items() if old.get(k) != v]
    if changed:
        raise TrainError(f"the run was started with other settings ({'; '.join(changed)}). Resume with the "
                         "same settings (only steps may change) or switch resume off to start over")
    if state.get("data") != data:
        raise TrainError("the run was started on other data (the latents or captions differ). Resume on the "
                         "same dataset or switch resume off to start over")


def stored_row(row: Cond) -> Cond:
    """A row kept for the whole run: float tensors on the CPU, detached; other values as they are."""
    return {k: v.detach().float().cpu() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in row.items()}


def _on(row: Cond, device: torch.device) -> Cond:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in row.items()}
