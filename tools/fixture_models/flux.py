"""Flux (dev-style, guidance-distilled) and Chroma diffusion models, and the Flux VAE.

ComfyUI's detection hard-codes Flux's widths (hidden_size 3072, 24 heads, context_in_dim 4096,
and for Chroma the 5-layer, 5120-wide distilled_guidance_layer) and counts only the blocks, so
both keep one double and one single block. Flux keeps guidance_in (supported_models.Flux, not
FluxSchnell) and vector_in for CLIP-L's 768-wide pooled output. Files hold bare keys (no
model.diffusion_model. prefix), as the released diffusion-model files do.

The Flux VAE ("ae") is the 16-channel AutoencodingEngine, the SD3 fixture's VAE architecture;
built from the same seed it has the same weights, saved with bare encoder./decoder. keys.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .common import build, comfy_ops, prefixed
from .sd import sd3_vae

if TYPE_CHECKING:
    import torch

FLUX_VERSION = 1
CHROMA_VERSION = 1
FLUX_VAE_VERSION = 1

_FLUX_COMMON: dict[str, Any] = {
    "patch_size": 2,
    "context_in_dim": 4096,
    "hidden_size": 3072,
    "mlp_ratio": 4.0,
    "num_heads": 24,
    "depth": 1,  # Flux dev: 19
    "depth_single_blocks": 1,  # Flux dev: 38
    "axes_dim": [16, 56, 56],
    "theta": 10000,
    "qkv_bias": True,
}
FLUX_DIT: dict[str, Any] = {
    **_FLUX_COMMON,
    "in_channels": 16,
    "out_channels": 16,
    "vec_in_dim": 768,
    "guidance_embed": True,
}
CHROMA_DIT: dict[str, Any] = {
    **_FLUX_COMMON,
    "in_channels": 64,  # Chroma counts channels after 2x2 patching
    "out_channels": 64,
    "in_dim": 64,
    "out_dim": 3072,
    "hidden_dim": 5120,
    "n_layers": 5,
}


def flux_dit() -> torch.nn.Module:
    import torch
    from comfy.ldm.flux.model import Flux

    return Flux(**FLUX_DIT, dtype=torch.float32, device="cpu", operations=comfy_ops())


def chroma_dit() -> torch.nn.Module:
    import torch
    from comfy.ldm.chroma.model import Chroma

    return Chroma(**CHROMA_DIT, dtype=torch.float32, device="cpu", operations=comfy_ops())


def flux_state_dict() -> dict[str, torch.Tensor]:
    return prefixed(build(flux_dit, norm_ones=True), "")


def chroma_state_dict() -> dict[str, torch.Tensor]:
    return prefixed(build(chroma_dit, norm_ones=True), "")


def flux_vae_state_dict() -> dict[str, torch.Tensor]:
    return prefixed(build(sd3_vae), "")
