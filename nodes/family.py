"""The model adapter: what Supercond knows about each model family ComfyUI loads, in one table.

Every capability asks this module instead of looking at ComfyUI's classes itself:
- which family a MODEL is (by ComfyUI's model config class), and a clear refusal for any other;
- its prediction type (eps, v, flow, and EDM / x0, which only some capabilities serve);
- which parts of its CONDITIONING are text (CEP / CADS perturb those and nothing else) and the width
  of each text-encoder segment;
- where a single-pass head reads its features and which tail a ``last_block`` head copies;
- which layers get a LoRA and the kohya names of their file keys;
- the model call the sampler would make for a latent: the extra conds (SDXL's size embeddings, Flux's
  guidance, ...) built by the model's own ``extra_conds`` through ComfyUI's ``encode_model_conds``,
  rows batched the way the sampler batches them.

Adding a family is adding one ``Family`` entry (and its fixture and tests).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.lora import LAYER_SETS
from .errors import InputError

Cond = dict[str, Any]  # one prompt: {"cross_attn": [1, T, D], "pooled_output": [1, P], other extras}


@dataclass(frozen=True)
class Tail:
    """The end of the diffusion model, as single-pass heads see it."""

    layout: str                  # how the final projection's output becomes the model output (see to_output)
    final: tuple[str, ...]       # the final projection: module paths, applied in sequence
    block: str                   # the last block, copied by last_block heads
    block_entry: str             # the module whose inputs are the last block's inputs
    block_tokens: int | None     # index of the image tokens in the block's output tuple (None: one tensor)


@dataclass(frozen=True)
class Family:
    name: str                          # ComfyUI's model config class (stored in head files)
    label: str                         # what users call it
    token_width: int                   # width of the text tokens (c_crossattn)
    token_segments: tuple[int, ...]    # text-encoder segments along that width
    pooled: tuple[int, ...] | None     # segments of the pooled text embedding at the start of ``y``; None: none
    tail: Tail
    lora_blocks: tuple[str, ...] | None  # module prefixes that get LoRAs (kohya's block targets); None: see _FROZEN
    needs_pooled: bool = False         # the model cannot run without a pooled text embedding
    guidance_distilled: bool = False   # sampled at cfg 1 with a guidance embedding (Flux dev)
    inplace_residual: bool = False     # its blocks update the residual stream in place (``x += ...``)


_UNET = Tail("unet", ("out",), "output_blocks.-1", "output_blocks.-1.0", None)
_FLUX = Tail("flux", ("final_layer",), "single_blocks.-1", "single_blocks.-1", None)

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("SD15", "SD1.x", 768, (768,), None, _UNET, None),
    Family("SDXL", "SDXL", 2048, (768, 1280), (1280,), _UNET, None, needs_pooled=True),
    Family("SD3", "SD3", 4096, (4096,), (768, 1280),
           Tail("mmdit", ("final_layer",), "joint_blocks.-1", "joint_blocks.-1", 1), None, needs_pooled=True),
    Family("Flux", "Flux", 4096, (4096,), (768,), _FLUX, ("double_blocks.", "single_blocks."), needs_pooled=True,
           guidance_distilled=True, inplace_residual=True),
    Family("Chroma", "Chroma", 4096, (4096,), None, _FLUX, ("double_blocks.", "single_blocks."),
           inplace_residual=True),
    Family("QwenImage", "Qwen-Image", 3584, (3584,), None,
           Tail("qwen", ("norm_out", "proj_out"), "transformer_blocks.-1", "transformer_blocks.-1", 1),
           ("transformer_blocks.",)),
    Family("WAN21_T2V", "Wan 2.1 T2V", 4096, (4096,), None,
           Tail("wan", ("head",), "blocks.-1", "blocks.-1", None), ("blocks.",)),
)}

# UNet and MMDiT families: every Linear/Conv except embeddings and the in/out layers (see lora_layers).
_FROZEN = ("time_embed.", "label_emb.", "input_blocks.0.", "out.", "t_embedder.", "y_embedder.",
           "x_embedder.", "final_layer.", "context_embedder.", "pos_embed")


def supported() -> str:
    return ", ".join(f.label for f in FAMILIES.values())


def family_of(model: Any, node: str) -> Family:
    """The family of a MODEL (ModelPatcher), or an InputError naming the node and the supported list."""
    if not hasattr(model, "model") or not hasattr(model, "get_model_object"):
        raise InputError(f"{node} needs a ComfyUI MODEL (from a checkpoint or diffusion-model loader), got "
                         f"{type(model).__name__}")
    config = type(getattr(model.model, "model_config", None)).__name__
    fam = FAMILIES.get(config)
    if fam is None:
        net = type(getattr(model.model, "diffusion_model", None)).__name__
        raise InputError(f"{node} does not support this model family: ComfyUI loaded it as {config} (diffusion "
                         f"model {net}). Supported families: {supported()}")
    return fam


# -- prediction type ---------------------------------------------------------------------------------

def prediction(model_sampling: Any) -> str:
    """eps | v | flow | edm | x0 from ComfyUI's model_sampling class (most specific first:
    EDM is a V_PREDICTION subclass and X0 an EPS subclass), else the class name."""
    import comfy.model_sampling as ms

    for cls, name in ((ms.IMG_TO_IMG, "img_to_img"), (ms.EDM, "edm"), (ms.V_PREDICTION, "v"), (ms.X0, "x0"),
                      (ms.EPS, "eps"), (ms.CONST, "flow")):
        if isinstance(model_sampling, cls):
            return name
    return type(model_sampling).__name__


def model_prediction(model: Any) -> str:
    return prediction(model.get_model_object("model_sampling"))


# -- text parts of the conditioning ------------------------------------------------------------------

def check_conditioning(fam: Family, entries: Sequence[Any], node: str, what: str = "conditioning") -> None:
    """Refuse text embeddings the model cannot take: the wrong width, or no pooled output where it
    needs one. ``entries`` are CONDITIONING pairs or the sampler's converted cond dicts."""
    for i, entry in enumerate(entries):
        tokens, extra = (entry.get("cross_attn"), entry) if isinstance(entry, dict) else entry
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3:
            raise InputError(f"{node}: {what} entry {i} holds no text embedding [batch, tokens, width]")
        width = int(tokens.shape[-1])
        if width != fam.token_width:
            raise InputError(f"{node}: the {what} is {width} wide but {fam.label} models take {fam.token_width}-wide "
                             "text embeddings: encode the prompt with this model's own text encoder (the CLIP "
                             "from its loader)")
        if fam.needs_pooled and not isinstance(extra.get("pooled_output"), torch.Tensor):
            raise InputError(f"{node}: the {what} has no pooled text embedding, which {fam.label} models need: "
                             "encode the prompt with CLIPTextEncode on this model's CLIP (not a conditioning "
                             "that was built without one)")


def text_segments(fam: Family) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """(token segments, pooled segments) of a family's text embeddings."""
    return fam.token_segments, fam.pooled


def conditioning_segments(token_width: int, pooled_width: int | None
                          ) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """Segments of a CONDITIONING seen without its MODEL (the static perturbation node), told by
    the widths it carries: a family's split applies only to that family's signature (token width and
    pooled width together), so SDXL's 768|1280 never reaches another 2048-wide encoder."""
    for fam in FAMILIES.values():
        pooled = sum(fam.pooled) if fam.pooled else None
        if fam.token_width == token_width and pooled == pooled_width:
            return fam.token_segments, fam.pooled
    return (token_width,), None if pooled_width is None else (pooled_width,)


# -- where heads read features, and the model output they produce ------------------------------------

def resolve(net: nn.Module, path: str) -> tuple[nn.Module, str]:
    """The module at a dotted path (negative indices allowed) and its canonical path."""
    mod, parts = net, []
    for p in path.split("."):
        if p.lstrip("-").isdigit():
            i = int(p) % len(mod)
            mod, p = mod[i], str(i)
        else:
            mod = getattr(mod, p)
        parts.append(p)
    return mod, ".".join(parts)


def to_output(tail: Tail, net: nn.Module, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The final projection's output -> the diffusion model's output layout, as each model's own
    forward does it after its final layer (x: the model input, for the latent's shape)."""
    if tail.layout == "unet":
        return out
    if tail.layout == "mmdit":
        h, w = x.shape[-2:]
        return net.unpatchify(out, hw=(h, w))[:, :, :h, :w]
    if tail.layout == "flux":  # drop reference tokens, unpatchify 2x2, crop the padding
        h, w = x.shape[-2:]
        p = net.patch_size
        hl, wl = (h + p // 2) // p, (w + p // 2) // p
        out = out[:, :hl * wl]
        b, c = out.shape[0], out.shape[-1] // (p * p)
        out = out.reshape(b, hl, wl, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, hl * p, wl * p)
        return out[:, :, :h, :w]
    if tail.layout == "qwen":  # [B, C, T, H, W] latents, 2x2 patches of the padded frame
        b, c, t, h, w = x.shape
        hp, wp = h + (-h) % 2, w + (-w) % 2
        out = out[:, :(hp // 2) * (wp // 2)].view(b, hp // 2, wp // 2, c, 2, 2)
        return out.permute(0, 3, 1, 4, 2, 5).reshape(b, c, t, hp, wp)[..., :h, :w]
    if tail.layout == "wan":
        t, h, w = x.shape[-3:]
        pt, ph, pw = net.patch_size
        grid = (-(-t // pt), -(-h // ph), -(-w // pw))
        return net.unpatchify(out, grid)[:, :, :t, :h, :w]
    raise ValueError(f"unknown tail layout {tail.layout!r}")


def block_tokens(tail: Tail, block_out: Any, final_tokens: int) -> torch.Tensor:
    """The image tokens the final projection reads, from the last block's output (Flux and Chroma
    single blocks carry the text tokens in front; MMDiT and Qwen blocks return (text, image))."""
    tokens = block_out if tail.block_tokens is None else block_out[tail.block_tokens]
    return tokens[:, -final_tokens:] if tokens.shape[1] != final_tokens else tokens


def block_reads_text(tail: Tail, block: nn.Module) -> bool:
    """True if a copied last block attends to the prompt through a ``context`` it is handed: a UNet
    output block with a cross-attention transformer (SD1.x; SDXL's last output block is a ResBlock),
    every Wan block. MMDiT, Flux/Chroma and Qwen-Image blocks carry the text as an evolved stream
    of their own instead, which a head cannot swap for another prompt's tokens."""
    if tail.layout == "unet":
        return any(type(m).__name__ == "SpatialTransformer" for m in block.modules())
    return tail.layout == "wan"


def block_context(tail: Tail, net: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """A prompt's tokens (c_crossattn) as the last block's cross-attention reads them: as they are
    in a UNet, through the text embedding in Wan (as its forward does before the blocks)."""
    if tail.layout == "unet":
        return tokens
    if tail.layout == "wan":
        weight = next(net.text_embedding.parameters())
        return net.text_embedding(tokens.to(weight.device, weight.dtype))
    raise ValueError(f"the {tail.layout} layout's last block reads no context")


# -- LoRA layers and their kohya names ---------------------------------------------------------------

def kohya_names(model: Any) -> dict[str, str]:
    """diffusion_model module path -> LoRA file prefix, as kohya's trainers write them and ComfyUI's
    ``comfy/lora.py`` reads them: ``lora_unet_<diffusers path>`` where ComfyUI maps one (SD1.x, SDXL),
    else ``lora_unet_<module path>`` (kohya's SD3 and Flux, musubi-tuner's Qwen-Image and Wan)."""
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


# The transformer parts of UNets and MMDiTs: kohya's default LoRA adapts the layers inside these only.
_TRANSFORMERS = ("SpatialTransformer", "SpatialVideoTransformer", "JointBlock")


def lora_layers(model: Any, node: str, layer_set: str = "all") -> dict[str, nn.Module]:
    """LoRA file prefix -> the Linear/Conv2d layer it adapts. DiTs: the family's transformer blocks. UNet and
    MMDiT: ``all`` is every layer but the embeddings and in/out layers (the ResBlocks' convolutions and
    time-embedding projections too, as kohya's LoCon / conv_dim); ``transformer`` the transformer blocks'
    layers only (attention, feed-forward, proj_in/out), kohya's default LoRA."""
    if layer_set not in LAYER_SETS:
        raise InputError(f"{node}: lora_layers must be one of {LAYER_SETS}, got {layer_set!r}")
    fam = family_of(model, node)
    names = kohya_names(model)
    dm = model.model.diffusion_model
    inside = tuple(f"{p}." for p, m in dm.named_modules() if type(m).__name__ in _TRANSFORMERS)
    out = {}
    for path, mod in dm.named_modules():
        if not isinstance(mod, (nn.Linear, nn.Conv2d)) or path not in names:
            continue
        chosen = path.startswith(fam.lora_blocks) if fam.lora_blocks else not path.startswith(_FROZEN)
        if chosen and (layer_set == "all" or fam.lora_blocks or path.startswith(inside)):
            out[names[path]] = mod
    if not out:
        raise InputError(f"{node}: found no Linear or Conv2d layer with a LoRA key in this {fam.label} model")
    return out


# -- the model call the sampler makes ----------------------------------------------------------------

# CONDITIONING extras a prompt carries into the model's extra_conds (and that a trainer keeps per row).
COND_EXTRAS = ("pooled_output", "attention_mask", "guidance", "width", "height", "crop_w", "crop_h",
               "target_width", "target_height")


def model_conds(base: Any, x: torch.Tensor, row: Cond, device: torch.device) -> dict[str, Any]:
    """The model's extra conds for one prompt at the latent ``x`` (batch 1), built by ComfyUI's own
    ``encode_model_conds``: what the sampler feeds the diffusion model for that latent size."""
    import comfy.samplers

    entry = {**row, "model_conds": {}}
    (out,) = comfy.samplers.encode_model_conds(base.extra_conds, [entry], x, device, "positive")
    return {k: v.process_cond(batch_size=x.shape[0], area=None) for k, v in out["model_conds"].items()}


def _groups(conds: list[dict[str, Any]]) -> list[list[int]]:
    """Rows that ComfyUI would batch into one model call (same keys, every cond can_concat)."""
    groups: list[list[int]] = []
    for i, c in enumerate(conds):
        for g in groups:
            first = conds[g[0]]
            if first.keys() == c.keys() and all(first[k].can_concat(c[k]) for k in c):
                g.append(i)
                break
        else:
            groups.append([i])
    return groups


def split_to(groups: list[list[int]], calls: int) -> list[list[int]]:
    """``groups`` with the largest halved until there are ``calls`` of them or each holds one row."""
    groups = [list(g) for g in groups]
    while len(groups) < calls and max(map(len, groups)) > 1:
        big = max(range(len(groups)), key=lambda i: len(groups[i]))
        g = groups.pop(big)
        groups[big:big] = [g[:len(g) // 2], g[len(g) // 2:]]
    return groups


class ModelCall:
    """(x_in, sigma, rows) -> x0 estimate through the model's ``apply_model`` (its patches and
    transformer_options included), one cond row per latent, called as the sampler calls it: each row's
    extra conds for this latent size, rows that can share a call batched (token lengths by ComfyUI's
    rules), the others in calls of their own."""

    def __init__(self, model: Any, device: torch.device) -> None:
        self.base = model.model
        self.device = device
        self.topts = dict(model.model_options.get("transformer_options", {}))

    def batches(self, x_in: torch.Tensor, rows: Sequence[Cond],
                calls: int | None = None) -> list[tuple[list[int], dict[str, Any]]]:
        """(row indices, model kwargs) of each model call, in ComfyUI's batching; with ``calls``, the
        largest batches halved until there are that many calls (or one row each)."""
        if len(rows) != x_in.shape[0]:
            raise ValueError(f"{x_in.shape[0]} latents but {len(rows)} conditionings")
        conds = [model_conds(self.base, x_in[i:i + 1], r, self.device) for i, r in enumerate(rows)]
        out = []
        for g in split_to(_groups(conds), calls or 0):
            first = conds[g[0]]
            out.append((g, {k: first[k].concat([conds[i][k] for i in g[1:]]) for k in first}))
        return out

    def apply(self, x_in: torch.Tensor, sigma: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        return self.base.apply_model(x_in, sigma, transformer_options=dict(self.topts), **kwargs)

    def __call__(self, x_in: torch.Tensor, sigma: torch.Tensor, rows: Sequence[Cond]) -> torch.Tensor:
        return self.run(x_in, sigma, self.batches(x_in, rows))

    def run(self, x_in: torch.Tensor, sigma: torch.Tensor, batches: list[tuple[list[int], dict[str, Any]]]
            ) -> torch.Tensor:
        """The model on each of ``batches`` (from ``batches``), the rows back in their order."""
        if len(batches) == 1:
            return self.apply(x_in, sigma, batches[0][1])
        outs = [self.apply(x_in[g], sigma[g], kw) for g, kw in batches]
        return restore_order(torch.cat(outs), [g for g, _ in batches])


def restore_order(stacked: torch.Tensor, groups: Sequence[Sequence[int]]) -> torch.Tensor:
    """Rows stacked group by group -> the original row order."""
    order = torch.tensor([i for g in groups for i in g], device=stacked.device)
    return stacked[torch.argsort(order)]


def latent_in(model: Any, samples: torch.Tensor) -> torch.Tensor:
    """A LATENT (the VAE's raw output) as samplers feed it to the model (``process_latent_in``: SD's
    0.18215 scale, SD3's shift, Wan's per-channel statistics), after the sampler's own shape fix
    (an empty 4-D latent from EmptySD3LatentImage becomes Qwen-Image's one-frame 5-D latent)."""
    import comfy.sample

    return model.model.process_latent_in(comfy.sample.fix_empty_latent_channels(model, samples.float()))


# -- the LoRA layers' names in diffusers (export_format "diffusers" / "peft") ------------------------

from ..core.lora_export import DiffusersLayout, DiffusersTarget  # noqa: E402  (pure torch, no ComfyUI)

# The diffusers pipeline component each family's LoRA loads into, for the families whose diffusers
# export is checked against diffusers itself (tests/test_lora_export.py). ComfyUI also maps diffusers
# names for Chroma and Qwen-Image, but nothing here checks those against diffusers' models; Wan has none.
_DIFFUSERS_COMPONENT = {"SD15": "unet", "SDXL": "unet", "SD3": "transformer", "Flux": "transformer"}


def diffusers_names(model: Any, node: str) -> DiffusersLayout:
    """kohya prefix -> the diffusers module(s) that layer is, read from the diffusers mapping ComfyUI's own
    LoRA loader uses (so what we write in these names loads back in ComfyUI as the kohya file does).
    A fused layer (SD3's and Flux's qkv, Flux's linear1) is several modules, each with its rows."""
    import comfy.lora
    import comfy.utils

    fam = family_of(model, node)
    component = _DIFFUSERS_COMPONENT.get(fam.name)
    if component is None:
        raise InputError(f"{node}: diffusers export is not available for {fam.label} models; use "
                         "export_format kohya. Diffusers export supports: "
                         f"{', '.join(FAMILIES[f].label for f in _DIFFUSERS_COMPONENT)}")
    if component == "unet":  # diffusers path -> ComfyUI weight, as model_lora_keys_unet reads them
        unet = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
        mapping = {k.removesuffix(".weight"): "diffusion_model." + v for k, v in unet.items()
                   if k.endswith(".weight")}
    else:  # the "transformer." entries of ComfyUI's LoRA key map: diffusers path -> weight (and rows)
        keys = comfy.lora.model_lora_keys_unet(model.model, {})
        mapping = {k[len("transformer."):]: v for k, v in keys.items() if k.startswith("transformer.")}
    prefixes = kohya_names(model)
    net = model.model.diffusion_model
    targets: dict[str, list[DiffusersTarget]] = {}
    for path, to in sorted(mapping.items()):
        weight = to if isinstance(to, str) else to[0]
        if not (weight.startswith("diffusion_model.") and weight.endswith(".weight")):
            continue
        prefix = prefixes.get(weight[len("diffusion_model."):-len(".weight")])
        if prefix is not None:
            targets.setdefault(prefix, []).append(DiffusersTarget(path, _diffusers_rows(to, net)))
    # A layer with two whole-weight names is an alias, not a fused layer (SD's label_emb is both diffusers'
    # add_embedding and class_embedding): which one a file needs is not known, so it gets no name.
    return DiffusersLayout(component, {k: tuple(v) for k, v in targets.items()
                                       if sum(t.rows is None for t in v) < 2})


def _diffusers_rows(to: Any, net: nn.Module) -> tuple[tuple[int, int], ...] | None:
    """The rows of a ComfyUI weight that one diffusers module is, from its entry in ComfyUI's LoRA key map:
    a key (all rows), (key, (dim, start, count)) for a slice of a fused weight, or (key, None,
    swap_scale_shift) for a weight whose halves diffusers keeps in the other order."""
    import comfy.utils

    if isinstance(to, str):
        return None
    key, offset, *function = to
    if offset is not None and not function and offset[0] == 0:
        return ((offset[1], offset[2]),)
    if offset is None and function == [comfy.utils.swap_scale_shift]:
        half = net.get_submodule(key[len("diffusion_model."):-len(".weight")]).weight.shape[0] // 2
        return ((half, half), (0, half))
    raise ValueError(f"ComfyUI maps {key} to diffusers in a way the export does not know: {to!r}")
