"""The trained LoRA in diffusers' key names (``export_format``): the same layers and the same weight delta,
only spelled for another loader.

Our files are kohya's: ``<prefix>.lora_down.weight`` (A), ``<prefix>.lora_up.weight`` (B) and a scalar
``<prefix>.alpha``, and loaders add ``(alpha / rank) * B @ A``. Diffusers files carry no alpha
(``load_lora_weights`` refuses keys without "lora" in their name, and without alphas it uses PEFT's
``lora_alpha = r``, a scale of 1), so the scale is folded into B here: the delta is unchanged.

Two spellings, both under the pipeline component diffusers loads them into (``unet.`` / ``transformer.``;
a text-encoder LoRA's layers under ``text_encoder.`` / ``text_encoder_2.``):

- ``"peft"``: ``<component>.<module path>.lora_A.weight`` / ``.lora_B.weight``, PEFT's own names.
  Diffusers reads them; ComfyUI's LoraLoader (0.3.64) does not read a UNet's attention projections
  spelled this way (it knows only the attention-processor names below) and skips those layers.
- ``"diffusers"``: what both read. For a UNet, the attention projections take the attention-processor
  names (``unet.<block>.attn1.processor.to_q_lora.down.weight``; ``to_out.0`` is ``to_out``) and the
  other layers ``unet.<path>.lora.down.weight`` / ``.lora.up.weight``; diffusers converts both to
  PEFT on load (it decides that from the first key, so no key may be in PEFT's spelling). Text-encoder
  layers then take the old ``<path>.lora_linear_layer.down.weight`` names too. For a transformer the
  PEFT names, which both read.

Which diffusers module a kohya prefix is (``DiffusersLayout``) comes from the caller: ComfyUI knows it
(``nodes.family.diffusers_names``), this module stays free of ComfyUI. A fused layer of ours (SD3's
and Flux's qkv, Flux's linear1) is several modules in diffusers: each takes its rows of B and all of
A, which keeps the rank and the delta exact.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .lora import LoRAError

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("kohya", "diffusers", "peft")

# A UNet attention projection: the part up to the attention module, and the projection.
_UNET_ATTN = re.compile(r"^(?P<attn>.+\.attn\d+)\.(?P<proj>to_q|to_k|to_v|to_out\.0)$")
# kohya's text-encoder layers: lora_te_ (SD1.x's CLIP-L), lora_te1_ / lora_te2_ (SDXL's CLIP-L / CLIP-G).
_TEXT_ENCODER = re.compile(r"^lora_te(?P<which>[12]?)_text_model_encoder_layers_(?P<layer>\d+)_"
                           r"(?P<part>self_attn|mlp)_(?P<proj>[qkv]_proj|out_proj|fc[12])$")


@dataclass(frozen=True)
class DiffusersTarget:
    """One diffusers module that (part of) a layer of ours is."""

    path: str  # module path in the diffusers model (no component prefix)
    # Rows of our B (output features) that this module takes: (start, count) pieces, concatenated in
    # order (SD3's last context adaLN swaps its halves). None: all rows.
    rows: tuple[tuple[int, int], ...] | None = None


@dataclass(frozen=True)
class DiffusersLayout:
    """Where a model's LoRA layers are in its diffusers model."""

    component: str  # the pipeline attribute the LoRA loads into: "unet" or "transformer"
    targets: Mapping[str, tuple[DiffusersTarget, ...]]  # kohya prefix -> its diffusers module(s)


@dataclass(frozen=True)
class KohyaLayer:
    down: torch.Tensor  # A: [rank, in] or [rank, in, kh, kw]
    up: torch.Tensor  # B: [out, rank] or [out, rank, 1, 1]
    alpha: float

    @property
    def scale(self) -> float:
        return self.alpha / self.down.shape[0]


def kohya_layers(sd: Mapping[str, torch.Tensor]) -> dict[str, KohyaLayer]:
    """The layers of a kohya LoRA state dict by prefix. A missing alpha means alpha = rank (scale 1),
    as kohya's and ComfyUI's loaders read it; any key that is not down, up or alpha is an error."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
            if key.endswith(suffix):
                parts.setdefault(key[: -len(suffix)], {})[suffix] = value
                break
        else:
            raise LoRAError(f"{key} is not a kohya LoRA key (<prefix>.lora_down.weight, .lora_up.weight, "
                            ".alpha)")
    out = {}
    for prefix, p in sorted(parts.items()):
        if ".lora_down.weight" not in p or ".lora_up.weight" not in p:
            raise LoRAError(f"the LoRA has no lora_down or no lora_up weight for {prefix}")
        down, up = p[".lora_down.weight"], p[".lora_up.weight"]
        if up.shape[1] != down.shape[0]:
            raise LoRAError(f"{prefix}: lora_up has rank {up.shape[1]}, lora_down {down.shape[0]}")
        alpha = float(p[".alpha"].item()) if ".alpha" in p else float(down.shape[0])
        out[prefix] = KohyaLayer(down, up, alpha)
    return out


def folded_up(layer: KohyaLayer, dtype: torch.dtype) -> torch.Tensor:
    """B * alpha / rank, computed in float32: the B of a file that has no alpha (scale 1)."""
    return (layer.up.float() * layer.scale).to(dtype).contiguous()


def take_rows(up: torch.Tensor, rows: tuple[tuple[int, int], ...] | None) -> torch.Tensor:
    """The rows of B that one diffusers module takes."""
    if rows is None:
        return up.clone()  # its own tensor: safetensors refuses tensors that share memory
    return torch.cat([up[start:start + count] for start, count in rows]).contiguous()


def check_rows(prefix: str, rows: list[tuple[tuple[int, int], ...] | None], n: int) -> None:
    """The modules of a layer must take each of its n outputs exactly once: else part of the delta is
    lost or doubled."""
    taken = torch.zeros(n, dtype=torch.int64)
    for pieces in rows:
        for start, count in pieces or ((0, n),):
            if start < 0 or count <= 0 or start + count > n:
                raise LoRAError(f"{prefix}: rows {start}..{start + count} are outside its {n} outputs")
            taken[start:start + count] += 1
    if not bool((taken == 1).all()):
        raise LoRAError(f"{prefix}: its diffusers modules leave out {int((taken == 0).sum())} of its {n} "
                        f"outputs and take {int((taken > 1).sum())} more than once")


def text_encoder_module(prefix: str) -> tuple[str, str] | None:
    """(pipeline component, module path) of a kohya text-encoder layer, or None for other layers:
    ``text_encoder`` (SD1.x, SDXL's CLIP-L) or ``text_encoder_2`` (SDXL's CLIP-G), transformers' paths."""
    m = _TEXT_ENCODER.match(prefix)
    if m is None:
        return None
    component = "text_encoder_2" if m["which"] == "2" else "text_encoder"
    return component, f"text_model.encoder.layers.{m['layer']}.{m['part']}.{m['proj']}"


def diffusers_keys(component: str, path: str, style: str) -> tuple[str, str]:
    """(A key, B key) of one diffusers module in a spelling (see the module docstring)."""
    if style == "diffusers" and component.startswith("text_encoder"):  # with a UNet's old names: old ones
        return f"{component}.{path}.lora_linear_layer.down.weight", f"{component}.{path}.lora_linear_layer.up.weight"
    if style == "diffusers" and component == "unet":
        attn = _UNET_ATTN.match(path)
        if attn:
            stem = f"unet.{attn['attn']}.processor.{attn['proj'].removesuffix('.0')}_lora"
            return f"{stem}.down.weight", f"{stem}.up.weight"
        return f"unet.{path}.lora.down.weight", f"unet.{path}.lora.up.weight"
    if style not in ("diffusers", "peft"):
        raise LoRAError(f"unknown diffusers key style {style!r}: diffusers or peft")
    return f"{component}.{path}.lora_A.weight", f"{component}.{path}.lora_B.weight"


def to_diffusers(kohya_sd: Mapping[str, torch.Tensor], layout: DiffusersLayout, style: str = "diffusers",
                 dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Our kohya LoRA state dict in diffusers key names, alpha folded into B (scale 1), the same
    ``W + delta`` in every loader. ``dtype``: of the written tensors (default: each layer's own; in fp16
    the folded B rounds to 2^-11 relative unless alpha / rank is a power of two)."""
    layers = kohya_layers(kohya_sd)
    out: dict[str, torch.Tensor] = {}
    for prefix, layer in layers.items():
        component, targets = layout.component, layout.targets.get(prefix)
        text_encoder = text_encoder_module(prefix)
        if text_encoder is not None:
            component, path = text_encoder
            targets = (DiffusersTarget(path),)
        if not targets:
            raise LoRAError(f"{prefix} has no diffusers name: this layer cannot be written for diffusers")
        check_rows(prefix, [t.rows for t in targets], layer.up.shape[0])
        dt = dtype or layer.up.dtype
        up = folded_up(layer, dt)
        for target in targets:
            a_key, b_key = diffusers_keys(component, target.path, style)
            if a_key in out:
                raise LoRAError(f"two layers map to the diffusers module {target.path}")
            # A copy of A per module: safetensors refuses tensors that share memory.
            out[a_key] = layer.down.to(dt, copy=True).contiguous()
            out[b_key] = take_rows(up, target.rows)
    log.debug("wrote %d kohya layers as %d %s-style diffusers modules", len(layers), len(out) // 2, style)
    return out


def export_state_dict(kohya_sd: Mapping[str, torch.Tensor], export_format: str,
                      layout: DiffusersLayout | None = None,
                      dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The state dict to write for an ``export_format`` (one of EXPORT_FORMATS); kohya is ours unchanged."""
    if export_format not in EXPORT_FORMATS:
        raise LoRAError(f"unknown export_format {export_format!r}: one of {', '.join(EXPORT_FORMATS)}")
    if export_format == "kohya":
        return dict(kohya_sd)
    if layout is None:
        raise LoRAError(f"export_format {export_format!r} needs the model's diffusers layout")
    return to_diffusers(kohya_sd, layout, export_format, dtype)
