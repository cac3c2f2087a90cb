"""SDXL single-file checkpoint: a shallow UNet with SDXL's detected layout, full-size CLIP-L and CLIP-G.

ComfyUI keys SDXL on model_channels 320, use_linear_in_transformer, transformer_depth
[0, 0, 2, 2, 10, 10] (the input side: 3 levels x 2 res blocks), context_dim 2048 (CLIP-L 768 +
CLIP-G 1280), adm_in_channels 2816 (pooled CLIP-G 1280 + 6 x 256 size/crop embeddings) and
use_temporal_attention False. What it does not match on is cut down: channel_mult [1, 1, 1] (every
level at 320 channels, so the 20 transformers of level 3 are cheap), one transformer per output
block and in the middle. The output side keeps SDXL's 9 blocks, the last a ResBlock at 320.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .common import build, comfy_ops, prefixed
from .sd import clip_l, sd15_vae

if TYPE_CHECKING:
    import torch

SDXL_VERSION = 1

SDXL_UNET: dict[str, Any] = {
    "use_checkpoint": False,
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "num_classes": "sequential",
    "adm_in_channels": 2816,
    "model_channels": 320,
    "num_res_blocks": [2, 2, 2],
    "transformer_depth": [0, 0, 2, 2, 10, 10],
    "channel_mult": [1, 1, 1],  # SDXL: [1, 2, 4]
    "transformer_depth_middle": 1,  # SDXL: 10
    "use_linear_in_transformer": True,
    "context_dim": 2048,
    "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1],  # SDXL: [0, 0, 0, 2, 2, 2, 10, 10, 10]
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}


def sdxl_unet() -> torch.nn.Module:
    import torch
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    return UNetModel(**SDXL_UNET, dtype=torch.float32, device="cpu", operations=comfy_ops())


def clip_g() -> torch.nn.Module:
    """Full-size CLIP-G (OpenCLIP bigG text tower) as ComfyUI's SDXLClipG builds it."""
    import comfy.clip_model
    import comfy.sdxl_clip
    import torch

    config_path = Path(comfy.sdxl_clip.__file__).parent / "clip_config_bigg.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    return comfy.clip_model.CLIPTextModel(config, dtype=torch.float32, device="cpu", operations=comfy_ops())


def sdxl_state_dict() -> dict[str, torch.Tensor]:
    import comfy.supported_models

    sd = prefixed(build(sdxl_unet), "model.diffusion_model.")
    # Keys as ComfyUI's own checkpoint saver writes them: CLIP-L under conditioner.embedders.0
    # (HF layout), CLIP-G under conditioner.embedders.1.model in OpenCLIP layout (fused in_proj,
    # transposed text_projection), which SDXL.process_clip_state_dict converts back on load.
    clip = prefixed(build(clip_l), "clip_l.transformer.")
    clip.update(prefixed(build(clip_g), "clip_g.transformer."))
    config = comfy.supported_models.SDXL(SDXL_UNET)
    clip = config.process_clip_state_dict_for_saving(clip)
    # The saver adds CLIP-L's int64 position_ids; ComfyUI's loader ignores them and fp16 can't hold them.
    clip.pop("conditioner.embedders.0.transformer.text_model.embeddings.position_ids", None)
    sd.update(clip)
    sd.update(prefixed(build(sd15_vae), "first_stage_model."))  # the SDXL VAE has SD's architecture
    return sd
