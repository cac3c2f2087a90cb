"""In-process use of the real ComfyUI: load the fixture checkpoints with its loaders, sample with
its KSampler. Shared by the integration tests (imported after the ``comfy`` fixture ran)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

FAMILIES = ("eps", "v", "flow")


@dataclass
class Family:
    name: str
    model: Any
    clip: Any
    vae: Any
    latent_channels: int


_loaded: dict[str, Family] = {}
_last_family: dict[str, Family] = {}


def load_family(name: str, checkpoints: dict[str, Path]) -> Family:
    """eps: the SD1.x fixture; v: the same sampled as v-prediction through ModelSamplingDiscrete;
    flow: the SD3 fixture."""
    if name in _loaded:
        return _loaded[name]
    import folder_paths
    import nodes
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    key = "sd3" if name == "flow" else "sd15"
    folder_paths.add_model_folder_path("checkpoints", str(checkpoints[key].parent))
    model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(checkpoints[key].name)
    if name == "v":
        (model,) = ModelSamplingDiscrete().patch(model, "v_prediction", False)
    fam = Family(name, model, clip, vae, 16 if name == "flow" else 4)
    _loaded[name] = fam
    return fam


def load_model_family(name: str, models_dir: Path) -> Family:
    """One of the new families (sdxl, flux, chroma, qwen_image, wan21) through the loaders a user
    would use (tools/fixture_models.check.load): CheckpointLoaderSimple for SDXL, UNETLoader +
    VAELoader + the family's stand-in text encoder otherwise. Only the last one stays cached: SDXL's
    full-size CLIP-G and Flux's and Chroma's 4096-wide blocks take gigabytes each."""
    if name in _last_family:
        return _last_family[name]
    from supercond.tools.fixture_models.check import free_models, load
    from supercond.tools.fixture_models.registry import FAMILIES as SPECS

    _last_family.clear()
    free_models()
    model, clip, vae = load(name, models_dir)
    fam = Family(name, model, clip, vae, SPECS[name].latent_channels)
    _last_family[name] = fam
    return fam


def encode(fam: Family, text: str) -> list:
    import nodes

    return nodes.CLIPTextEncode().encode(fam.clip, text)[0]


def sample(fam: Family, model: Any, positive: list, negative: list, seed: int = 1, steps: int = 4,
           cfg: float = 5.0, batch: int = 1, size: int = 64, sampler: str = "euler") -> torch.Tensor:
    """The final latent of a KSampler run (what the VAE would decode)."""
    import nodes

    latent = {"samples": torch.zeros(batch, fam.latent_channels, size // 8, size // 8)}
    scheduler = "sgm_uniform" if fam.name == "flow" else "normal"
    (out,) = nodes.common_ksampler(model, seed, steps, cfg, sampler, scheduler, positive, negative, latent)
    return out["samples"]


class CondRecorder:
    """A keyed CALC_COND_BATCH wrapper added after Supercond's, so it sees the perturbed conds."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, executor, model, conds, x_in, timestep, model_options):
        rec = {"sigma": float(timestep.flatten()[0]), "rows": x_in.shape[0]}
        for branch, entries in enumerate(conds):
            if entries:
                mc = entries[0]["model_conds"]
                rec[branch] = {k: mc[k].cond.detach().clone() for k in ("c_crossattn", "y") if k in mc}
        self.calls.append(rec)
        return executor(model, conds, x_in, timestep, model_options)

    def install(self, model: Any) -> Any:
        import comfy.patcher_extension as pe

        m = model.clone()
        m.add_wrapper_with_key(pe.WrappersMP.CALC_COND_BATCH, "supercond.test.record", self)
        return m


def cep(model, **kw):
    """SupercondCEP with the defaults the tests use, overridden by ``kw``; returns the patched MODEL."""
    from supercond.nodes.perturb.nodes import SupercondCEP

    args = dict(gamma=1.0, distribution="uniform", scale="paper", apply_to="tokens", branch="positive",
                resample="every_step", seed_offset=0) | kw
    return SupercondCEP.execute(model, **args).result[0]


def cads(model, **kw):
    """SupercondCADS likewise."""
    from supercond.nodes.perturb.nodes import SupercondCADS

    args = dict(tau1=0.6, tau2=0.9, noise_scale=0.25, psi=1.0, apply_to="tokens", branch="positive",
                time_base="sigma", seed_offset=0) | kw
    return SupercondCADS.execute(model, **args).result[0]
