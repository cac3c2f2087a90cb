"""Sampling-time conditioning perturbation through ComfyUI's keyed wrappers.

Two wrappers per patched MODEL, both keyed so they stack with other packs' wrappers:
- OUTER_SAMPLE opens a run: it reads the sampler's seed and the schedule and keeps them in a
  per-run state in that run's own model options (clones share the hook object), and closes it
  when sampling ends.
- CALC_COND_BATCH swaps perturbed copies of the text conditioning into the positive and/or
  negative cond entries before ComfyUI batches them, so the branch of every cond is known from
  its list position (no ``cond_or_uncond`` guessing) and nothing persistent is mutated.

Noise comes from private CPU generators derived from (seed, call, branch, entry, part), so the
same seed gives the same image and the global RNG is never touched. What is text, and the width of
each text-encoder segment, comes from the model adapter (nodes/family.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ...core import perturb
from ...core.seeds import seeded_generator
from .. import family as fm
from ..errors import InputError
from ..model_time import sampling_time

log = logging.getLogger("supercond.perturb")

BRANCHES: tuple[str, ...] = ("positive", "negative", "both")
APPLY_TO: tuple[str, ...] = ("tokens", "pooled", "both")

WRAPPER_KEY = "supercond.perturb"


@dataclass(frozen=True)
class CEPConfig:
    gamma: float
    distribution: str
    scale: str
    apply_to: str
    branch: str
    resample: str  # "every_step" | "once_per_run"
    seed_offset: int = 0
    kind: str = "cep"


@dataclass(frozen=True)
class CADSConfig:
    tau1: float
    tau2: float
    noise_scale: float
    psi: float
    apply_to: str
    branch: str
    time_base: str
    seed_offset: int = 0
    kind: str = "cads"


Config = CEPConfig | CADSConfig


@dataclass
class RunState:
    seed: int
    sample_sigmas: torch.Tensor
    model_sampling: Any
    segments: tuple[tuple[int, ...], tuple[int, ...] | None]  # (tokens, pooled) encoder segments
    calls: int = 0
    times: dict[float, float] = field(default_factory=dict)


_KIND_SALT = {"cep": 1, "cads": 2}
_BRANCH_INDEX = {"positive": (0,), "negative": (1,), "both": (0, 1)}
_BRANCH_NAMES = {"positive": ("positive",), "negative": ("negative",), "both": ("positive", "negative")}


class PerturbHook:
    """One patched MODEL's perturbation: config plus the wrappers that apply it."""

    def __init__(self, config: Config, node: str) -> None:
        self.config = config
        self.node = node
        # Clones share this object: a run's state lives in that run's options (a guider clones them per
        # sampling), under a key of this hook's own, so stacked patches and nested or concurrent runs
        # each keep theirs.
        self._key = f"{WRAPPER_KEY}.run.{id(self):x}"

    # -- wrappers ------------------------------------------------------------------------
    def outer_sample(self, executor, noise, latent_image, sampler, sigmas, denoise_mask, callback,
                     disable_pbar, seed, *args, **kwargs):
        # *args, **kwargs: what newer ComfyUI adds to the chain (latent_shapes=, docs/compat.md), passed on as is
        guider = executor.class_obj
        fam = fm.family_of(guider.model_patcher, self.node)
        for name in _BRANCH_NAMES[self.config.branch]:
            fm.check_conditioning(fam, guider.conds.get(name) or [], self.node, f"{name} conditioning")
        state = RunState(
            seed=int(seed or 0),
            sample_sigmas=sigmas.detach().float().cpu(),
            model_sampling=guider.model_patcher.get_model_object("model_sampling"),
            segments=fm.text_segments(fam),
        )
        options = guider.model_options.setdefault("transformer_options", {})
        previous = options.get(self._key)
        options[self._key] = state
        try:
            return executor(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed, *args,
                            **kwargs)
        finally:
            if previous is None:
                options.pop(self._key, None)
            else:
                options[self._key] = previous

    def calc_cond_batch(self, executor, model, conds, x_in, timestep, model_options):
        state: RunState | None = model_options.get("transformer_options", {}).get(self._key)
        if state is None:  # sampled without a guider run (nothing to seed from): leave alone
            return executor(model, conds, x_in, timestep, model_options)
        call = state.calls
        state.calls += 1
        perturb_fn = self._perturb_fn(state, call, float(timestep.flatten()[0]))
        if perturb_fn is None:
            return executor(model, conds, x_in, timestep, model_options)
        rows = x_in.shape[0]
        new_conds = list(conds)
        for branch in _BRANCH_INDEX[self.config.branch]:
            if branch < len(conds) and conds[branch] is not None:
                new_conds[branch] = [
                    perturb_entry(entry, self.config.apply_to, rows,
                                  lambda t, part, b=branch, i=i: perturb_fn(t, (b, i, part)))
                    for i, entry in enumerate(conds[branch])
                ]
        return executor(model, new_conds, x_in, timestep, model_options)

    # -- the perturbation for one call ---------------------------------------------------
    def _perturb_fn(self, state: RunState, call: int, sigma: float
                    ) -> Callable[[torch.Tensor, tuple[int, int, int]], torch.Tensor] | None:
        cfg = self.config
        salt = _KIND_SALT[cfg.kind]
        if isinstance(cfg, CEPConfig):
            draw = call if cfg.resample == "every_step" else 0

            def cep(t: torch.Tensor, where: tuple[int, int, int]) -> torch.Tensor:
                gen = seeded_generator(state.seed, cfg.seed_offset, salt, draw, *where)
                return perturb.apply_cep(t, cfg.gamma, cfg.distribution, cfg.scale, gen, state.segments[where[2]])

            return cep
        g = perturb.cads_gamma(self.time_of(state, sigma), cfg.tau1, cfg.tau2)
        if g >= 1.0:
            return None

        def cads(t: torch.Tensor, where: tuple[int, int, int]) -> torch.Tensor:
            gen = seeded_generator(state.seed, cfg.seed_offset, salt, call, *where)
            return perturb.apply_cads(t, g, cfg.noise_scale, cfg.psi, gen)

        return cads

    def time_of(self, state: RunState, sigma: float) -> float:
        if sigma not in state.times:
            base = getattr(self.config, "time_base", "sigma")
            state.times[sigma] = sampling_time(state.model_sampling, state.sample_sigmas, sigma, base)
        return state.times[sigma]


def perturb_entry(entry: dict, apply_to: str, rows: int,
                  fn: Callable[[torch.Tensor, int], torch.Tensor]) -> dict:
    """A shallow copy of one cond entry with its text conditioning perturbed.

    Tokens live in ``c_crossattn``; the pooled embedding is the leading ``pooled_output`` width
    of ``y`` (SDXL appends size and crop embeddings there, which stay untouched). Attention
    masks, guidance, reference latents and everything else pass through as they are.
    """
    mc = entry.get("model_conds", {})
    new_mc = dict(mc)
    if apply_to in ("tokens", "both"):
        ca = mc.get("c_crossattn")
        if ca is None:
            raise InputError(
                "this model takes no text cross-attention conditioning ('c_crossattn'), so there "
                "are no tokens to perturb; use a text-to-image model or set apply_to to pooled."
            )
        tokens = ca.cond
        if tokens.dim() != 3:
            raise InputError(f"expected token conditioning of shape [batch, tokens, width], got {list(tokens.shape)}")
        if not torch.count_nonzero(tokens):
            return entry  # a zeroed-out prompt means "no prompt": leave it alone
        new_mc["c_crossattn"] = ca._copy_with(fn(_to_rows(tokens, rows), 0))
    if apply_to in ("pooled", "both"):
        y = mc.get("y")
        pooled = entry.get("pooled_output")
        if y is None or pooled is None:
            raise InputError(
                "this model does not use a pooled text embedding (SD1.x has none); set apply_to to tokens."
            )
        width = pooled.shape[-1]
        yt = _to_rows(y.cond, rows)
        new_y = torch.cat([fn(yt[:, :width], 1), yt[:, width:]], dim=1)
        new_mc["y"] = y._copy_with(new_y)
    out = entry.copy()
    out["model_conds"] = new_mc
    return out


def _to_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Repeat a batch-1 conditioning to the latent batch so every row gets its own draw."""
    if t.shape[0] == rows:
        return t
    if t.shape[0] == 1:
        return t.expand(rows, *t.shape[1:]).contiguous()
    return t


def patch_model(model: Any, config: Config, node: str) -> Any:
    """A clone of ``model`` with the perturbation installed (the input MODEL is not changed)."""
    import comfy.patcher_extension as pe

    if not hasattr(model, "add_wrapper_with_key"):
        raise InputError(f"{node}: expected a ComfyUI MODEL (ModelPatcher), got {type(model).__name__}")
    fam = fm.family_of(model, node)
    if config.apply_to in ("pooled", "both") and fam.pooled is None:
        raise InputError(f"{node}: {fam.label} models take no pooled text embedding, so there is nothing to "
                         "perturb with apply_to pooled; set apply_to to tokens")
    if not hasattr(model.get_model_object("model_sampling"), "percent_to_sigma"):
        raise InputError(f"{node}: this MODEL has no model_sampling with percent_to_sigma; it cannot be scheduled")
    m = model.clone()
    hook = PerturbHook(config, node)
    m.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, hook.outer_sample)
    m.add_wrapper_with_key(pe.WrappersMP.CALC_COND_BATCH, WRAPPER_KEY, hook.calc_cond_batch)
    return m


def installed_configs(model: Any) -> list[Config]:
    """The perturbation configs installed on a MODEL, in the order they were added."""
    import comfy.patcher_extension as pe

    return [w.__self__.config for w in model.get_wrappers(pe.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY)
            if isinstance(getattr(w, "__self__", None), PerturbHook)]
