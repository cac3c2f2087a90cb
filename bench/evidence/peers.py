"""The zero-training peers a user would pick instead of a single-pass head, as they work in ComfyUI,
written here from their papers (no pack code copied):

- Adaptive guidance (Castillo et al., AAAI 2025): two-pass CFG until the cosine similarity of the
  conditional and unconditional predictions reaches a threshold, then the conditional prediction
  alone (cfg 1: one call a step) for the rest of the run. A GUIDER that decides for the whole batch
  and compares the denoised predictions, as the ComfyUI node (asagi4/ComfyUI-Adaptive-Guidance,
  threshold 0.99 by default) does. The paper compares noise predictions; on the evidence model
  those agree to a cosine of 0.998 or more at every sigma of a 20-step run, so that reading stops
  guiding after the first step (it is cfg 1), while the denoised ones pass 0.99 about a third of
  the way down.
- Guidance interval (Kynkaanniemi et al. 2024): CFG only while sigma is inside (lo, hi], cfg 1
  elsewhere, where ComfyUI then skips the unconditional call. A PREDICT_NOISE wrapper that sets the
  guider's cfg per call, as ComfyUI's newer CFGOverride node does.
- ComfyUI's own caches, at their defaults: LazyCache reuses the whole guided prediction on steps where
  the input changed little, EasyCache the diffusion model's output per prompt. Both stack with a
  single-pass head. Under two-pass CFG only LazyCache is measured: ComfyUI 0.3.64's EasyCache adds each
  prompt's cached difference to the whole batch when cond and uncond share a model call (later
  ComfyUI slices it per prompt), which at batch 1 mixes the two and at a larger batch stops with a
  size error.
"""

from __future__ import annotations

from typing import Any

import torch

AG_THRESHOLD = 0.99  # the ComfyUI node's default
INTERVAL = (0.28, 5.42)  # the guidance-interval paper's sigma range for SD-XL (an eps model like this one)
INTERVAL_KEY = "supercond.evidence.guidance_interval"
CACHE_DEFAULTS = (0.2, 0.15, 0.95)  # the cache nodes' defaults: reuse_threshold, start_percent, end_percent


def adaptive_guider(threshold: float = AG_THRESHOLD):
    """A guider factory for ``Evidence.draw``."""
    import comfy.samplers

    class AdaptiveGuider(comfy.samplers.CFGGuider):
        def __init__(self, model: Any) -> None:
            super().__init__(model)
            self.truncated = False
            self.cfg_steps = 0

        def sample(self, *args: Any, **kwargs: Any) -> torch.Tensor:
            self.truncated, self.cfg_steps = False, 0  # per run, not per guider object
            return super().sample(*args, **kwargs)

        def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 (ComfyUI's signature)
            positive, negative = self.conds.get("positive"), self.conds.get("negative")
            if self.truncated:
                return comfy.samplers.sampling_function(self.inner_model, x, timestep, negative, positive, 1.0,
                                                        model_options=model_options, seed=seed)
            cond, uncond = comfy.samplers.calc_cond_batch(self.inner_model, [positive, negative], x, timestep,
                                                          model_options)
            self.cfg_steps += 1
            sim = torch.nn.functional.cosine_similarity(cond.flatten(), uncond.flatten(), dim=0)
            if float(sim) >= threshold:
                self.truncated = True
            return comfy.samplers.cfg_function(self.inner_model, cond, uncond, self.cfg, x, timestep,
                                               model_options=model_options, cond=positive, uncond=negative)

    def make(model: Any, positive: list, negative: list, cfg: float) -> Any:
        g = AdaptiveGuider(model)
        g.set_conds(positive, negative)
        g.set_cfg(cfg)
        return g

    return make


class _Interval:
    def __init__(self, lo: float, hi: float) -> None:
        self.lo, self.hi = lo, hi

    def __call__(self, executor: Any, x: torch.Tensor, timestep: torch.Tensor, model_options={},  # noqa: B006
                 seed: int | None = None) -> torch.Tensor:  # ComfyUI's PREDICT_NOISE signature
        guider = executor.class_obj
        sigma = float(timestep.flatten()[0])
        if self.lo < sigma <= self.hi:
            return executor(x, timestep, model_options, seed)
        cfg = guider.cfg
        guider.cfg = 1.0  # ComfyUI's cfg-1 path skips the unconditional call
        try:
            return executor(x, timestep, model_options, seed)
        finally:
            guider.cfg = cfg


def guidance_interval(model: Any, lo: float = INTERVAL[0], hi: float = INTERVAL[1]) -> Any:
    """A clone of ``model`` guided only for sigma in (lo, hi]."""
    import comfy.patcher_extension as pe

    m = model.clone()
    m.add_wrapper_with_key(pe.WrappersMP.PREDICT_NOISE, INTERVAL_KEY, _Interval(lo, hi))
    return m


def cached(model: Any, cache: str, reuse_threshold: float = CACHE_DEFAULTS[0]) -> Any:
    """A clone of ``model`` under ComfyUI's EasyCache or LazyCache node. Their wrappers are added before
    the call counter's (sampling.counted), so they are the outer ones: a step they skip is not counted."""
    from comfy_extras.nodes_easycache import EasyCacheNode, LazyCacheNode

    node = {"EasyCache": EasyCacheNode, "LazyCache": LazyCacheNode}[cache]
    return node.execute(model, reuse_threshold, *CACHE_DEFAULTS[1:], False).result[0]
