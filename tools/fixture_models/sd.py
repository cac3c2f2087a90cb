"""SD1.x and SD3 single-file checkpoints (the first two fixtures), and the example LoRA.

Moved here unchanged from tools/fixtures.py: same classes, seeds, keys and metadata, so the
files stay byte-identical and caches made before the split stay valid.

* ``supercond_sd15_tiny.safetensors``: SD1.x. A one-level UNet (model_channels 320 and
  context_dim 768 are what ComfyUI keys SD1.x on), full-size CLIP-L, full-size SD VAE.
* ``supercond_sd3_tiny.safetensors``: SD3 (flow matching). A depth-2 MMDiT, full-size CLIP-L
  as the only text encoder, full-size 16-channel SD3 VAE.
* ``loras/supercond/example_lora.safetensors`` (kohya format, seeded random weights) that the
  stock ``LoraLoader`` reads: it touches only the first transformer of the UNet's first level,
  whose layers have the same shapes in the tiny SD1.x fixture and in a real SD1.x checkpoint.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .common import SEED, build, comfy_ops, log, prefixed, safetensors_metadata, setup_comfy, write_atomically

if TYPE_CHECKING:
    import torch

# Version of the sd15 + sd3 pair (one stamp, as before the split); bump when their generation changes.
SD_VERSION = 1

# The example LoRA (under OUT/loras); bump LORA_VERSION when its generation changes.
LORA_FILE = "supercond/example_lora.safetensors"
LORA_VERSION = 1
LORA_RANK = 4
LORA_SCOPE = "down_blocks.0.attentions.0."  # diffusers path prefix; same shapes as a real SD1.x UNet
LORA_UP_STD = 0.08  # weight delta ~ 0.3x the layer's own weight scale: visible, not destructive

# SD1.x UNet cut down to one level; keys and shapes are otherwise SD1.5's.
SD15_UNET: dict[str, Any] = {
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [1],
    "channel_mult": [1],
    "transformer_depth": [1],
    "transformer_depth_output": [1, 1],
    "transformer_depth_middle": 1,
    "context_dim": 768,
    "num_heads": 8,
    "num_head_channels": -1,
    "use_spatial_transformer": True,
    "use_linear_in_transformer": False,
    "legacy": False,
    "adm_in_channels": None,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}

SD3_DEPTH = 2
SD3_HIDDEN = 64 * SD3_DEPTH  # ComfyUI derives depth as hidden_size // 64
SD3_POS_EMBED_MAX = 192  # SD3's value: positions for up to 3072 px
SD3_MMDIT: dict[str, Any] = {
    "input_size": None,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "depth": SD3_DEPTH,
    # CLIP-L pooled (768) + CLIP-G pooled (1280, zeros when absent)
    "adm_in_channels": 2048,
    # The SD3 text encoder pads every hidden state to 4096 (T5-XXL width).
    "context_embedder_config": {
        "target": "torch.nn.Linear",
        "params": {"in_features": 4096, "out_features": SD3_HIDDEN},
    },
    "pos_embed_max_size": SD3_POS_EMBED_MAX,
    "num_patches": SD3_POS_EMBED_MAX**2,
    "pos_embed_scaling_factor": None,
    "x_block_self_attn_layers": [],
}


def sd_vae_ddconfig(z_channels: int) -> dict[str, Any]:
    """The SD1.x / SD3 VAE layout, as comfy.sd.VAE builds it (only z_channels differs)."""
    return {
        "double_z": True,
        "z_channels": z_channels,
        "resolution": 256,
        "in_channels": 3,
        "out_ch": 3,
        "ch": 128,
        "ch_mult": [1, 2, 4, 4],
        "num_res_blocks": 2,
        "attn_resolutions": [],
        "dropout": 0.0,
    }


def clip_l() -> torch.nn.Module:
    """Full-size CLIP-L text model, the class sd1_clip.SDClipModel wraps (keys: text_model.*)."""
    import comfy.clip_model
    import comfy.sd1_clip
    import torch

    config_path = Path(comfy.sd1_clip.__file__).parent / "sd1_clip_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    return comfy.clip_model.CLIPTextModel(config, dtype=torch.float32, device="cpu", operations=comfy_ops())


def sd15_vae() -> torch.nn.Module:
    """As comfy.sd.VAE builds it for SD1.x: AutoencoderKL with quant convs."""
    from comfy.ldm.models.autoencoder import AutoencoderKL

    return AutoencoderKL(ddconfig=sd_vae_ddconfig(4), embed_dim=4)


def sd3_vae() -> torch.nn.Module:
    """As comfy.sd.VAE builds it for 16 latent channels without post_quant_conv (SD3, Flux)."""
    from comfy.ldm.models.autoencoder import AutoencodingEngine

    ddconfig = sd_vae_ddconfig(16)
    return AutoencodingEngine(
        regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
        encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": ddconfig},
        decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": ddconfig},
    )


def sd15_unet() -> torch.nn.Module:
    import torch
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    return UNetModel(**SD15_UNET, dtype=torch.float32, device="cpu", operations=comfy_ops())


def sd3_mmdit() -> torch.nn.Module:
    import torch
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT, get_2d_sincos_pos_embed

    model = MMDiT(**SD3_MMDIT, dtype=torch.float32, device="cpu", operations=comfy_ops())
    # pos_embed is a buffer (torch.empty): SD3 ships the fixed 2D sin-cos table there.
    table = get_2d_sincos_pos_embed(SD3_HIDDEN, SD3_POS_EMBED_MAX)
    model.pos_embed.copy_(torch.from_numpy(table).float().unsqueeze(0))
    return model


def sd15_state_dict() -> dict[str, torch.Tensor]:
    sd = prefixed(build(sd15_unet), "model.diffusion_model.")
    # SD1.x checkpoints carry no text_projection; ComfyUI does not expect one.
    sd.update(prefixed(build(clip_l), "cond_stage_model.transformer.", drop=("text_projection.weight",)))
    sd.update(prefixed(build(sd15_vae), "first_stage_model."))
    return sd


def sd3_state_dict() -> dict[str, torch.Tensor]:
    sd = prefixed(build(sd3_mmdit), "model.diffusion_model.")
    # SD3.clip_target() enables each text encoder whose keys it finds: clip_l only here.
    sd.update(prefixed(build(clip_l), "text_encoders.clip_l.transformer."))
    sd.update(prefixed(build(sd3_vae), "first_stage_model."))
    return sd


# --------------------------------------------------------------------------- example LoRA


def lora_path(out: Path) -> Path:
    return Path(out).expanduser().resolve() / "loras" / LORA_FILE


def lora_stamp() -> dict[str, Any]:
    return {"name": "example_lora", "fixture_version": SD_VERSION, "lora_version": LORA_VERSION}


def ensure_lora(comfyui: Path, out: Path, sd15: Path, *, force: bool = False) -> Path:
    """Write the example LoRA unless a current one is there (checked from its header only)."""
    path = lora_path(out)
    try:
        fresh = json.loads(safetensors_metadata(path).get("supercond_fixture", "null")) == lora_stamp()
    except (OSError, ValueError):
        fresh = False
    if fresh and not force:
        return path
    setup_comfy(comfyui)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = example_lora(sd15)
    metadata = {"supercond_fixture": json.dumps(lora_stamp())}  # one entry: byte-identical files
    from safetensors.torch import save_file

    write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    log.info("generated %s (%d layers, rank %d)", path, len(tensors) // 3, LORA_RANK)
    return path


def example_lora(sd15: Path) -> dict[str, torch.Tensor]:
    """kohya keys (``lora_unet_<diffusers path>.lora_down/lora_up/alpha``) for every Linear and Conv
    weight under LORA_SCOPE, shapes read from the checkpoint; seeded N(0, 1/fan_in) down, small up."""
    import comfy.utils
    import torch
    from safetensors import safe_open

    diffusers = comfy.utils.unet_to_diffusers(SD15_UNET)
    g = torch.Generator().manual_seed(SEED + 1)
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(sd15), framework="pt") as f:
        for key in sorted(k for k in diffusers if k.startswith(LORA_SCOPE) and k.endswith(".weight")):
            shape = f.get_slice("model.diffusion_model." + diffusers[key]).get_shape()
            if len(shape) not in (2, 4):  # norms
                continue
            out_ch, in_ch, *kernel = shape
            fan_in = in_ch * math.prod(kernel)
            name = "lora_unet_" + key[: -len(".weight")].replace(".", "_")
            down = torch.randn(LORA_RANK, in_ch, *kernel, generator=g) / math.sqrt(fan_in)
            up = torch.randn(out_ch, LORA_RANK, *[1 for _ in kernel], generator=g) * LORA_UP_STD / math.sqrt(LORA_RANK)
            tensors[f"{name}.lora_down.weight"] = down.to(torch.float16)
            tensors[f"{name}.lora_up.weight"] = up.to(torch.float16)
            tensors[f"{name}.alpha"] = torch.tensor(float(LORA_RANK), dtype=torch.float16)
    if not tensors:
        raise RuntimeError(f"no layer under {LORA_SCOPE} in {sd15}")
    return tensors
