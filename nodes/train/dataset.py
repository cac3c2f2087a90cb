"""SupercondLoadDataset: a folder of images + captions -> LATENT and CONDITIONING for the trainer,
encoded once and cached on disk by content; kornia flip / random-crop applied before encoding."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from comfy_api.v0_0_2 import io

from ...core.dataset import EXAMPLE_NAME, DatasetError, content_key, list_pairs
from ...core.seeds import seeded_generator
from ..inputs import MAX_SEED
from .dataset_files import load_image, write_example

log = logging.getLogger("supercond")
CACHE_VERSION = "2"  # 2: keys include CLIP skip and LoRA patches


def _fingerprint(module: torch.nn.Module, backup: dict | None = None) -> str:
    """Cheap identity of a model's base weights (count, first, middle and last tensors' sums) for cache
    keys. ``backup``: ModelPatcher's originals of weights patched in place, so a model that is loaded
    with its LoRA applied reads the same as when it is not."""
    state = [(k, v) for k, v in module.state_dict().items() if torch.is_tensor(v) and v.numel()]
    if not state:
        return "none"
    picks = [state[0], state[len(state) // 2], state[-1]]
    sums = []
    for key, value in picks:
        original = (backup or {}).get(key)
        tensor = original.weight if original is not None else value
        sums.append(f"{float(tensor.float().sum()):.6e}")
    return f"{len(state)}:" + ":".join(sums)


def _describe(value, out: list[str], depth: int = 0) -> None:
    """A patch's content as text: tensors by shape and sums, adapters by their weights, numbers as is."""
    if depth > 4:
        out.append(type(value).__name__)
    elif torch.is_tensor(value):
        v = value.detach().float()
        out.append(f"T{tuple(v.shape)}:{float(v.sum()):.6e}:{float(v.abs().sum()):.6e}")
    elif isinstance(value, (tuple, list)):
        for item in value:
            _describe(item, out, depth + 1)
    elif hasattr(value, "weights"):  # comfy.weight_adapter adapters (LoRA, LoHa, ...)
        out.append(type(value).__name__)
        _describe(value.weights, out, depth + 1)
    elif value is None or isinstance(value, (str, int, float, bool)):
        out.append(repr(value))
    else:
        out.append(getattr(value, "__name__", type(value).__name__))


def encoder_identity(patcher, extra: str = "") -> str:
    """What decides an encoder's outputs: its base weights, every patch on them (a LoRA from LoraLoader,
    with its strengths) and ``extra`` settings (CLIPSetLastLayer's layer). Without the patches a cache
    keyed on weights alone returns the unpatched encoding after a LoRA is added."""
    parts = [_fingerprint(patcher.model, getattr(patcher, "backup", None)), extra]
    for key in sorted(getattr(patcher, "patches", {}), key=str):
        parts.append(str(key))
        _describe(patcher.patches[key], parts)
    return content_key(*parts)


def augment(pixels: torch.Tensor, resolution: int, flip: bool, random_crop: bool, seed: int) -> torch.Tensor:
    """[1, 3, H, W] -> [1, 3, res, res]: shorter side to res (x1.15 with random_crop), then a random
    (or centre) crop and an optional random horizontal flip, seeded."""
    import kornia.augmentation as K
    from kornia.geometry.transform import resize

    h, w = pixels.shape[-2:]
    scale = resolution * (1.15 if random_crop else 1.0) / min(h, w)
    pixels = resize(pixels, (max(resolution, round(h * scale)), max(resolution, round(w * scale))),
                    interpolation="bilinear", antialias=True)
    crop = K.RandomCrop((resolution, resolution)) if random_crop else K.CenterCrop((resolution, resolution))
    ops = [crop] + ([K.RandomHorizontalFlip(p=0.5)] if flip else [])
    with torch.random.fork_rng(devices=[]):  # kornia draws from the global RNG: seed it privately
        torch.manual_seed(int(seeded_generator(seed).initial_seed()))
        for op in ops:
            pixels = op(pixels)
    return pixels.clamp(0, 1)


def _encode_text(clip, text: str) -> dict[str, torch.Tensor]:
    cond = clip.encode_from_tokens_scheduled(clip.tokenize(text))
    tokens, extra = cond[0]
    out = {"cross_attn": tokens}
    if isinstance(extra.get("pooled_output"), torch.Tensor):
        out["pooled_output"] = extra["pooled_output"]
    return out


def _cached(path: Path, make) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from ...core.files import save_atomic

    if path.exists():
        try:
            return load_file(str(path))
        except Exception as e:  # a damaged cache entry is rebuilt, never trusted
            log.warning("supercond: rebuilding damaged cache entry %s (%s)", path.name, e)
    value = {k: v.detach().cpu().contiguous() for k, v in make().items()}
    save_atomic(path, value, {"supercond_cache": CACHE_VERSION})
    return value


class SupercondLoadDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SupercondLoadDataset",
            display_name="Load Training Dataset (Supercond)",
            category="supercond/training",
            description=("Images with same-name .txt captions from a folder under ComfyUI's input directory, "
                         "encoded once with the VAE and CLIP and cached on disk (a re-run is fast). "
                         f"Folder '{EXAMPLE_NAME}' is a built-in example set, written on first use."),
            inputs=[
                io.String.Input("folder", default=EXAMPLE_NAME,
                                tooltip="Sub-folder of ComfyUI's input directory holding image + .txt pairs."),
                io.Clip.Input("clip", tooltip="Encodes the captions (and the empty prompt, for caption dropout)."),
                io.Vae.Input("vae", tooltip="Encodes the images to latents."),
                io.Int.Input("resolution", default=512, min=64, max=4096, step=64,
                             tooltip="Square training size in pixels (shorter side resized, then cropped)."),
                io.Boolean.Input("flip", default=False, tooltip="Random horizontal flip (seeded), before encoding."),
                io.Boolean.Input("random_crop", default=False,
                                 tooltip="Random crop from a 15% larger resize (seeded) instead of a centre crop."),
                io.Int.Input("seed", default=0, min=0, max=MAX_SEED, tooltip="Seed of the augmentation."),
            ],
            outputs=[
                io.Latent.Output(display_name="LATENT"),
                io.Conditioning.Output(display_name="CONDITIONING", tooltip="One entry per image, for the trainer."),
            ],
        )

    @classmethod
    def execute(cls, folder, clip, vae, resolution, flip, random_crop, seed) -> io.NodeOutput:
        import folder_paths

        root = Path(folder_paths.get_input_directory()).resolve()
        path = (root / folder).resolve()
        if os.path.commonpath([root, path]) != str(root):
            raise DatasetError(f"folder {folder!r} is outside ComfyUI's input directory")
        if folder == EXAMPLE_NAME and not path.exists():
            write_example(path)
            log.info("supercond: wrote the example dataset to %s", path)
        pairs = list_pairs(path)
        cache = Path(folder_paths.get_user_directory()) / "supercond_cache" / "dataset"
        vae_fp = encoder_identity(vae.patcher)
        clip_fp = encoder_identity(clip.patcher, f"layer {clip.layer_idx}")
        empty = _cached(cache / f"{content_key('empty', clip_fp, CACHE_VERSION)}.safetensors",
                        lambda: _encode_text(clip, ""))
        latents, conds = [], []
        for i, (img, caption) in enumerate(pairs):
            key = content_key(img.read_bytes(), caption, str(resolution), str(flip), str(random_crop), str(seed),
                              str(i), vae_fp, clip_fp, CACHE_VERSION)

            def make(img=img, caption=caption, i=i):
                pixels = augment(load_image(img), resolution, flip, random_crop, seed * 100003 + i)
                return {"latent": vae.encode(pixels.permute(0, 2, 3, 1)), **_encode_text(clip, caption)}

            entry = _cached(cache / f"{key}.safetensors", make)
            latents.append(entry["latent"])
            extra = {"supercond_empty": empty}
            if "pooled_output" in entry:
                extra["pooled_output"] = entry["pooled_output"]
            conds.append([entry["cross_attn"], extra])
        return io.NodeOutput({"samples": torch.cat(latents)}, conds)


NODES: list[type[io.ComfyNode]] = [SupercondLoadDataset]
