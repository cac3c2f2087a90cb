"""Qwen-Image diffusion model (MMDiT, 3072 wide, 3584-wide Qwen2.5-VL text input).

ComfyUI detects Qwen-Image by txt_norm.weight and reads only in_channels (64: 16 latent
channels x 2x2 patch) and the number of transformer blocks; every width is the class default,
so only num_layers shrinks (Qwen-Image: 60). Its VAE is the Wan 2.1 VAE (see wan.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .common import build, comfy_ops, prefixed

if TYPE_CHECKING:
    import torch

QWEN_IMAGE_VERSION = 1

QWEN_IMAGE_DIT: dict[str, Any] = {"image_model": "qwen_image", "in_channels": 64, "num_layers": 1}


def qwen_image_dit() -> torch.nn.Module:
    import torch
    from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel(**QWEN_IMAGE_DIT, dtype=torch.float32, device="cpu", operations=comfy_ops())


def qwen_image_state_dict() -> dict[str, torch.Tensor]:
    return prefixed(build(qwen_image_dit, norm_ones=True), "")
