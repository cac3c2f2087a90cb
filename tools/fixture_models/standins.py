"""Stand-in text encoders: a genuine ``comfy.sd.CLIP`` with the real encoder's conditioning layout.

T5-XXL (Flux, Chroma), UMT5-XXL (Wan) and Qwen2.5-VL-7B (Qwen-Image) are far too large to build
here. ``standin_clip(family)`` builds ComfyUI's own text-encoder class for the family
(flux.flux_clip, pixart_t5.pixart_te, wan.te, qwen_image.te) with its real tokenizer wrapper, so
special tokens, padding, attention masks, zero_out_masked, the Qwen template trimming and the
pooled output are ComfyUI's code. Only the transformer shrinks, through the hooks ComfyUI's
wrappers read: ``model_options["<name>_model_config"]`` (one layer, one head, a 256-wide FFN,
a 4096-row embedding table indexed by token id modulo 4096) and, for Qwen, ``"<name>_class"``
(Qwen25_7BVLI always builds its 670 M-parameter vision tower). Widths stay: T5/UMT5 4096,
Qwen 3584, CLIP-L 768. Weights are seeded random, built on the CPU at construction (no file).

Needs ComfyUI importable (comfy, transformers); tools/fixture_models.common.setup_comfy does it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import comfy.sd
import comfy.sd1_clip
import comfy.supported_models_base
import comfy.text_encoders.flux
import comfy.text_encoders.llama
import comfy.text_encoders.pixart_t5
import comfy.text_encoders.qwen_image
import comfy.text_encoders.wan
import torch
from transformers import T5TokenizerFast

from .common import SEED, init_weights, nan_filled_empty

log = logging.getLogger("supercond.fixtures.standins")

FAMILIES = ("flux", "chroma", "qwen_image", "wan")
DESCRIPTION = {
    "flux": "T5-XXL padded to >= 256 tokens x 4096 + CLIP-L pooled_output [1, 768]",
    "chroma": "T5-XXL unpadded (prompt + end token) x 4096, no pooled_output",
    "qwen_image": "Qwen2.5-VL-7B, chat template trimmed, x 3584, no pooled_output, no attention_mask",
    "wan": "UMT5-XXL padded to >= 512 tokens x 4096, zero after the end token, no pooled_output",
}
# Rows of the stand-ins' embedding tables: token ids index them modulo this (the real tables have
# 32128 (T5), 256384 (UMT5) and 152064 (Qwen) rows of 4096 or 3584: 0.1-1 G parameters).
VOCAB = 4096
FFN = 256

_T5: dict[str, Any] = {"num_layers": 1, "num_heads": 1, "d_kv": 64, "d_ff": FFN, "vocab_size": VOCAB}
_CLIP_L: dict[str, Any] = {"num_hidden_layers": 1, "intermediate_size": FFN}  # vocab is not configurable
_QWEN: dict[str, Any] = {"num_hidden_layers": 1, "num_attention_heads": 1, "num_key_value_heads": 1,
                         "intermediate_size": FFN, "vocab_size": VOCAB}


class ModuloEmbedding(torch.nn.Module):
    """The shrunk embedding table, looked up at token id modulo its size (ids stay the real tokenizer's)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    @property
    def weight(self) -> torch.Tensor:  # SDClipModel reads the device from it
        return self.inner.weight

    def forward(self, ids: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.inner(ids % self.inner.num_embeddings, out_dtype=out_dtype)


class StandInQwen25VL(comfy.text_encoders.llama.Qwen25_7BVLI):
    """Qwen25_7BVLI's text model (its own Llama2_, shrunk by the config) without the vision tower.
    Its forward is the real one; image inputs (Qwen-Image-Edit) are not supported."""

    def __init__(self, config_dict: dict, dtype: Any, device: Any, operations: Any) -> None:
        torch.nn.Module.__init__(self)
        config = comfy.text_encoders.llama.Qwen25_7BVLI_Config(**config_dict)
        self.num_layers = config.num_hidden_layers
        self.model = comfy.text_encoders.llama.Llama2_(config, device=device, dtype=dtype, ops=operations)
        self.dtype = dtype

    def preprocess_embed(self, embed: dict, device: Any) -> tuple[None, None]:
        raise NotImplementedError("the Qwen-Image stand-in text encoder has no vision tower")


class StandInQwen25VLModel(comfy.text_encoders.qwen_image.Qwen25_7BVLIModel):
    def __init__(self, device: Any = "cpu", layer: str = "last", layer_idx: int | None = None, dtype: Any = None,
                 attention_mask: bool = True, model_options: dict | None = None) -> None:
        # Qwen25_7BVLIModel.__init__ of ComfyUI v0.3.64, argument for argument, but for model_class:
        # the real class hard-codes Qwen25_7BVLI. tests/test_fixture_families compares the settings.
        comfy.sd1_clip.SDClipModel.__init__(
            self, device=device, layer=layer, layer_idx=layer_idx, textmodel_json_config={}, dtype=dtype,
            special_tokens={"pad": 151643}, layer_norm_hidden_state=False, model_class=StandInQwen25VL,
            enable_attention_masks=attention_mask, return_attention_masks=attention_mask,
            model_options=model_options or {})


class StandInUMT5Tokenizer(comfy.sd1_clip.SDTokenizer):
    """UMT5XXlTokenizer's settings on ComfyUI's T5 tokenizer files: UMT5's SentencePiece model does not
    ship with ComfyUI (it comes inside the text-encoder file). Same pad (0) and end (1) ids, same
    padding to 512; the ids of the words differ from UMT5's."""

    def __init__(self, embedding_directory: str | None = None, tokenizer_data: dict | None = None) -> None:
        path = os.path.join(os.path.dirname(os.path.realpath(comfy.text_encoders.flux.__file__)), "t5_tokenizer")
        super().__init__(path, pad_with_end=False, embedding_size=4096, embedding_key="umt5xxl",
                         tokenizer_class=T5TokenizerFast, has_start_token=False, pad_to_max_length=False,
                         max_length=99999999, min_length=512, pad_token=0, tokenizer_data=tokenizer_data or {})

    def state_dict(self) -> dict:
        return {}


# family -> (tokenizer class, real text-encoder class, model_options that shrink it, tokenizer_data)
def _targets() -> dict[str, tuple[type, type, dict[str, Any], dict[str, Any]]]:
    return {
        "flux": (comfy.text_encoders.flux.FluxTokenizer, comfy.text_encoders.flux.flux_clip(),
                 {"t5xxl_model_config": _T5, "clip_l_model_config": _CLIP_L}, {}),
        "chroma": (comfy.text_encoders.pixart_t5.PixArtTokenizer, comfy.text_encoders.pixart_t5.pixart_te(),
                   {"t5xxl_model_config": _T5}, {}),
        "qwen_image": (comfy.text_encoders.qwen_image.QwenImageTokenizer, comfy.text_encoders.qwen_image.te(),
                       {"qwen25_7b_model_config": _QWEN, "qwen25_7b_class": StandInQwen25VLModel}, {}),
        "wan": (comfy.text_encoders.wan.WanT5Tokenizer, comfy.text_encoders.wan.te(),
                {"umt5xxl_model_config": _T5}, {"clip_umt5xxl_tokenizer_class": StandInUMT5Tokenizer}),
    }


def _seeded(base: type, shrink: dict[str, Any], seed: int) -> type:
    """base with the shrinking model_options, built under a fixed seed, every weight initialised."""

    class StandIn(base):
        def __init__(self, device: Any = "cpu", dtype: Any = None, model_options: dict | None = None) -> None:
            options = {**shrink, **(model_options or {})}
            with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream alone
                torch.manual_seed(seed)
                with nan_filled_empty():
                    super().__init__(device=device, dtype=dtype, model_options=options)
                for enc in self.modules():
                    if isinstance(enc, comfy.sd1_clip.SDClipModel):
                        enc.transformer.set_input_embeddings(ModuloEmbedding(enc.transformer.get_input_embeddings()))
                init_weights(self, norm_ones=True)

    StandIn.__name__ = StandIn.__qualname__ = f"StandIn{base.__name__}"
    return StandIn


def standin_clip(family: str) -> comfy.sd.CLIP:
    """A fresh stand-in CLIP for "flux", "chroma", "qwen_image" or "wan" (same weights every call)."""
    if family not in FAMILIES:
        raise ValueError(f"no stand-in text encoder for {family!r}; one of {FAMILIES}")
    tokenizer, encoder, shrink, tokenizer_data = _targets()[family]
    target = comfy.supported_models_base.ClipTarget(tokenizer, _seeded(encoder, shrink, SEED + FAMILIES.index(family)))
    clip = comfy.sd.CLIP(target=target, tokenizer_data=tokenizer_data)
    log.debug("stand-in text encoder %s: %s", family, DESCRIPTION[family])
    return clip
