"""Wan 2.1 text-to-video diffusion model and the Wan 2.1 VAE (also Qwen-Image's VAE).

ComfyUI reads Wan's width from head.modulation (num_heads = dim // 128), ffn_dim from the first
block and counts the blocks, so the model is 128 wide with one head, a 256-wide FFN and two
blocks; text_dim stays 4096 (UMT5-XXL), which detection leaves at the class default. No
img_emb, so it is detected as t2v; out_dim 16 keeps it Wan 2.1 (Wan 2.2 5B has 48).

The VAE is comfy.sd.VAE's Wan 2.1 branch (decoder.middle.0.residual.0.gamma present, no
decoder.upsamples.0.upsamples.0.residual.2.weight): dim 96, z_dim 16, full size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .common import build, comfy_ops, prefixed

if TYPE_CHECKING:
    import torch

WAN21_VERSION = 1
WAN21_VAE_VERSION = 1

WAN21_DIT: dict[str, Any] = {
    "image_model": "wan2.1",
    "model_type": "t2v",
    "patch_size": (1, 2, 2),
    "in_dim": 16,
    "dim": 128,  # Wan 2.1 1.3B: 1536, 14B: 5120
    "ffn_dim": 256,
    "freq_dim": 256,
    "text_dim": 4096,
    "out_dim": 16,
    "num_heads": 1,  # dim // 128, as detection derives it
    "num_layers": 2,
    "window_size": (-1, -1),
    "qk_norm": True,
    "cross_attn_norm": True,
    "eps": 1e-6,
}
# As comfy.sd.VAE builds the Wan 2.1 VAE.
WAN21_VAE: dict[str, Any] = {
    "dim": 96,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
    "dropout": 0.0,
}


def wan21_dit() -> torch.nn.Module:
    import torch
    from comfy.ldm.wan.model import WanModel

    return WanModel(**WAN21_DIT, dtype=torch.float32, device="cpu", operations=comfy_ops())


def wan21_vae() -> torch.nn.Module:
    from comfy.ldm.wan.vae import WanVAE

    return WanVAE(**WAN21_VAE)


def wan21_state_dict() -> dict[str, torch.Tensor]:
    return prefixed(build(wan21_dit, norm_ones=True), "")


def wan21_vae_state_dict() -> dict[str, torch.Tensor]:
    return prefixed(build(wan21_vae, norm_ones=True), "")
