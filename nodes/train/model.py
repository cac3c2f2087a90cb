"""ComfyUI glue for the trainer: which layers get a LoRA (and their kohya names), the denoise
closure over ``apply_model``, gradient checkpointing, and the checkpoint files under ``loras``."""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InputError

log = logging.getLogger("supercond")

# Embeddings and the in/out convs stay frozen, as in kohya's default LoRA/LoCon target set.
_FROZEN = ("time_embed.", "label_emb.", "input_blocks.0.", "out.", "t_embedder.", "y_embedder.",
           "x_embedder.", "final_layer.", "context_embedder.", "pos_embed", "time_in.", "vector_in.",
           "guidance_in.", "img_in.", "txt_in.")


def auto_prediction(model: Any, choice: str) -> str:
    import comfy.model_sampling as ms

    sampling = model.get_model_object("model_sampling")
    kind = ("flow" if isinstance(sampling, ms.CONST) else "v" if isinstance(sampling, ms.V_PREDICTION)
            else "eps" if isinstance(sampling, ms.EPS) else None)
    if kind is None:
        raise InputError(f"this model's sampling ({type(sampling).__name__}) is not eps, v or flow")
    if choice == "auto":
        return kind
    if (choice == "flow") != (kind == "flow"):
        raise InputError(f"prediction {choice!r} does not fit this {kind} model: flow needs a flow model "
                              "and eps/v need a discrete (eps or v) model; use auto")
    return choice


def kohya_names(model: Any) -> dict[str, str]:
    """diffusion_model module path -> file prefix: kohya's ``lora_unet_<diffusers path>`` where ComfyUI
    maps one (SD1.x, SDXL), else ``lora_unet_<comfy path>`` (kohya's SD3 form), else ``diffusion_model.<path>``."""
    import comfy.lora

    by_weight: dict[str, list[str]] = {}
    for name, target in comfy.lora.model_lora_keys_unet(model.model, {}).items():
        if isinstance(target, str):
            by_weight.setdefault(target, []).append(name)
    out = {}
    for weight, names in by_weight.items():
        if not (weight.startswith("diffusion_model.") and weight.endswith(".weight")):
            continue
        path = weight[len("diffusion_model."):-len(".weight")]
        comfy_form = "lora_unet_" + path.replace(".", "_")
        kohya = [n for n in names if n.startswith("lora_unet_") and n != comfy_form]
        out[path] = kohya[0] if kohya else comfy_form if comfy_form in names else "diffusion_model." + path
    return out


def target_layers(model: Any) -> dict[str, nn.Module]:
    """file prefix -> Linear/Conv2d layer of the diffusion model that gets a LoRA."""
    names = kohya_names(model)
    out = {}
    for path, mod in model.model.diffusion_model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)) and path in names and not path.startswith(_FROZEN):
            out[names[path]] = mod
    if not out:
        raise InputError("found no Linear or Conv2d layer with a LoRA key in this model")
    return out


def materialize_weights(module: nn.Module) -> None:
    """Weights loaded under ComfyUI's inference_mode are inference tensors, which autograd refuses
    to save for backward: replace each by a normal frozen copy (same values, same device)."""
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and (p.is_inference() or p.requires_grad):
                mod._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=False)


def model_space(mp: Any, samples: torch.Tensor) -> torch.Tensor:
    """A LATENT (the VAE's raw output) as samplers feed it to the model (``process_latent_in``: SD's
    0.18215 scale, SD3's shift): what both trainers train on, as ComfyUI's TrainLoraNode does."""
    return mp.model.process_latent_in(samples.float())


def denoiser(model: Any, device: torch.device):
    """(x_in, sigma, cond) -> x0 estimate through the model's ``apply_model`` (its model patches and
    transformer_options included), conds built by the model's own ``extra_conds``."""
    base = model.model
    topts = dict(model.model_options.get("transformer_options", {}))

    def denoise(x_in: torch.Tensor, sigma: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        extra = {k: v for k, v in cond.items() if k != "cross_attn"}
        conds = base.extra_conds(cross_attn=cond["cross_attn"], noise=x_in, device=device, **extra)
        kwargs = {k: v.process_cond(x_in.shape[0], area=None).cond.to(device) for k, v in conds.items()}
        return base.apply_model(x_in, sigma, transformer_options=dict(topts), **kwargs)

    return denoise


def _highest_forward_children(module: nn.Module, out: list[nn.Module]) -> list[nn.Module]:
    for child in module.children():
        if isinstance(child, (nn.ModuleList, nn.Sequential, nn.ModuleDict)):
            _highest_forward_children(child, out)
        else:
            out.append(child)
    return out


@contextmanager
def checkpointing(diffusion_model: nn.Module, enabled: bool):
    """Gradient checkpointing per top-level block (ResBlock / SpatialTransformer / DiT block):
    an instance-level ``forward`` override, restored on exit."""
    patched = []
    try:
        if enabled:
            for m in _highest_forward_children(diffusion_model, []):
                if not any(True for _ in m.parameters()):
                    continue
                orig = m.forward

                def fwd(*args, _orig=orig, **kwargs):
                    return torch.utils.checkpoint.checkpoint(_orig, *args, use_reentrant=False, **kwargs)

                m.forward = fwd
                patched.append(m)
        yield
    finally:
        for m in patched:
            del m.forward  # drops the instance attribute: the class forward is back


# -- files -----------------------------------------------------------------------------------------
def checkpoint_file(stem: Path, step: int) -> Path:
    return stem.with_name(f"{stem.name}_{step:06d}.safetensors")


def state_file(lora_file: Path) -> Path:
    return lora_file.with_suffix(".state.pt")


def last_checkpoint(stem: Path) -> tuple[Path, int] | None:
    """The highest-step ``<stem>_<step>.safetensors`` that has its optimizer-state file."""
    pattern = re.compile(re.escape(stem.name) + r"_(\d{6})\.safetensors$")
    best = None
    if stem.parent.is_dir():
        for p in stem.parent.iterdir():
            m = pattern.match(p.name)
            if m and state_file(p).exists() and (best is None or int(m.group(1)) > best[1]):
                best = (p, int(m.group(1)))
    return best


def base_model_name(model: Any) -> str:
    return type(model.model).__name__

