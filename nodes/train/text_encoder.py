"""The text-encoder LoRA of SupercondTrainLoRA (SD1.x and SDXL, the CLIP families): kohya's layer set
(each encoder layer's q/k/v/out projections and MLP), kohya's key names, and captions encoded with
grad through ComfyUI's own CLIP code while the LoRA's hooks are attached."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import InputError

FAMILIES = ("SD15", "SDXL")
# kohya's targets in each CLIP encoder layer, by module path -> the suffix of its key.
_TARGETS = {"self_attn.q_proj": "self_attn_q_proj", "self_attn.k_proj": "self_attn_k_proj",
            "self_attn.v_proj": "self_attn_v_proj", "self_attn.out_proj": "self_attn_out_proj",
            "mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2"}


def te_layers(clip: Any, family: str, node: str) -> dict[str, nn.Module]:
    """kohya key prefix -> Linear: ``lora_te_`` for SD1.x's CLIP-L, ``lora_te1_`` (CLIP-L) and
    ``lora_te2_`` (CLIP-G) for SDXL, as kohya writes them and ComfyUI's LoraLoader reads them."""
    if family not in FAMILIES:
        raise InputError(f"{node}: text-encoder training covers SD1.x and SDXL (CLIP text encoders), not this "
                         f"model; set text_encoder_lr to 0")
    cm = clip.cond_stage_model
    parts = [p for p in ("clip_l", "clip_g") if hasattr(cm, p)]
    prefix = {"clip_l": "lora_te_"} if parts == ["clip_l"] else {"clip_l": "lora_te1_", "clip_g": "lora_te2_"}
    out: dict[str, nn.Module] = {}
    for part in parts:
        for b, layer in enumerate(getattr(cm, part).transformer.text_model.encoder.layers):
            for path, suffix in _TARGETS.items():
                out[f"{prefix[part]}text_model_encoder_layers_{b}_{suffix}"] = layer.get_submodule(path)
    if not out:
        raise InputError(f"{node}: this CLIP has no CLIP-L/CLIP-G encoder layers to train; set text_encoder_lr to 0")
    return out


def prepare(clip: Any) -> Any:
    """A clone of the CLIP, loaded (its weights are shared: train under ``autograd_weights``)."""
    import comfy.model_management as mm

    te = clip.clone()
    mm.load_models_gpu([te.patcher], force_full_load=True)
    return te


def encoder(clip: Any) -> Callable[[list[str]], list[dict[str, torch.Tensor]]]:
    """captions -> one row of text parts each (``cross_attn``, ``pooled_output``), with grad."""
    def encode(texts: list[str]) -> list[dict[str, torch.Tensor]]:
        rows = []
        for text in texts:
            tokens, extra = clip.encode_from_tokens_scheduled(clip.tokenize(text))[0]
            row = {"cross_attn": tokens.float()}
            if isinstance(extra.get("pooled_output"), torch.Tensor):
                row["pooled_output"] = extra["pooled_output"].float()
            rows.append(row)
        return rows

    return encode
