"""``--check``: load each family with ComfyUI's loader nodes, encode, sample, decode, and verify.

Per family: the detected supported_models / model_base class, model type and model_sampling
(class and shift); every weight in the file lands in the model (same keys and shapes, nothing
left at its uninitialised value); the conditioning layout; a 4-step 64 px KSampler run (Wan: a
5-frame clip) that is finite, depends on the prompt and on the seed, and decodes to images of
the right shape. Plus the example LoRA on the SD1.x file.
"""

from __future__ import annotations

import gc
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .common import relative_difference, require, setup_comfy, timed
from .registry import FAMILIES, GROUP_OF, Family, file_path
from .sd import LORA_FILE

if TYPE_CHECKING:
    import torch

log = logging.getLogger("supercond.fixtures")

CHECK_STEPS = 4
CHECK_PX = 64
MAX_MODEL_SPACE_ABS = 100.0
PROMPTS = ("a cat", "a photo of a dog on the beach")


def import_comfy_nodes(comfyui: Path | None = None) -> Any:
    """ComfyUI's nodes.py; refuse another ``nodes`` (the pack has one) that got there first."""
    import nodes

    if comfyui is not None:
        where = Path(nodes.__file__).resolve()
        require(where == Path(comfyui).resolve() / "nodes.py", f"'nodes' resolves to {where}, not ComfyUI's")
    return nodes


def register_folders(out: Path) -> None:
    """Make the fixture folders visible to the loader nodes (folder_paths keeps each path once)."""
    import folder_paths

    for group in {g.folder for g in GROUP_OF.values()}:
        folder_paths.add_model_folder_path(group, str(Path(out).expanduser().resolve() / group))


def load(name: str, out: Path, comfyui: Path | None = None) -> tuple[Any, Any, Any]:
    """(MODEL, CLIP, VAE) of a family through CheckpointLoaderSimple, or UNETLoader + VAELoader + stand-in CLIP."""
    fam = FAMILIES[name]
    nodes = import_comfy_nodes(comfyui)
    register_folders(out)
    if "checkpoint" in fam.files:
        return nodes.CheckpointLoaderSimple().load_checkpoint(file_path(out, fam.files["checkpoint"]).name)
    from .standins import standin_clip

    (model,) = nodes.UNETLoader().load_unet(file_path(out, fam.files["unet"]).name, "default")
    (vae,) = nodes.VAELoader().load_vae(file_path(out, fam.files["vae"]).name)
    return model, standin_clip(fam.standin), vae


def detected(model: Any) -> dict[str, Any]:
    """What ComfyUI made of the file: classes, model type, model_sampling and its shift."""
    sampling = model.get_model_object("model_sampling")
    return {
        "supported_model": type(model.model.model_config).__name__,
        "model_base": type(model.model).__name__,
        "model_type": model.model.model_type.name,
        "model_sampling": [c.__name__ for c in type(sampling).__mro__[1:3]],  # (sampling, prediction)
        "shift": getattr(sampling, "shift", None),
    }


def check_detection(fam: Family, model: Any) -> dict[str, Any]:
    import comfy.model_sampling

    got = detected(model)
    for what in ("supported_model", "model_base", "model_type"):
        require(got[what] == getattr(fam, what), f"{fam.name}: {what} {got[what]}, want {getattr(fam, what)}")
    sampling = model.get_model_object("model_sampling")
    require(isinstance(sampling, getattr(comfy.model_sampling, fam.model_sampling)),
            f"{fam.name}: model sampling {got['model_sampling']}, want {fam.model_sampling}")
    if fam.shift is not None:
        require(abs(got["shift"] - fam.shift) < 1e-6, f"{fam.name}: shift {got['shift']}, want {fam.shift}")
    return got


def file_shapes(path: Path, prefix: str = "") -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k[len(prefix):]: tuple(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith(prefix)}


def module_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def check_weights(fam: Family, out: Path, model: Any, vae: Any) -> None:
    """The loaders read every tensor of the file into the model they built: same keys and shapes.
    A missing key would stay torch.empty garbage, so this is what makes the loaded model seeded."""
    if "checkpoint" in fam.files:
        path = file_path(out, fam.files["checkpoint"])
        unet, first_stage = file_shapes(path, "model.diffusion_model."), file_shapes(path, "first_stage_model.")
    else:
        unet, first_stage = file_shapes(file_path(out, fam.files["unet"])), file_shapes(file_path(out, fam.files["vae"]))
    for what, want, module in (("diffusion model", unet, model.model.diffusion_model),
                               ("VAE", first_stage, vae.first_stage_model)):
        got = module_shapes(module)
        diff = sorted(set(want).symmetric_difference(got)) or sorted(k for k in want if want[k] != got[k])
        require(not diff, f"{fam.name}: {what} keys or shapes differ between file and model: {diff[:5]}")


def encode(clip: Any, text: str) -> list:
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def check_conditioning(fam: Family, cond: list, text: str) -> dict[str, Any]:
    tokens, extra = cond[0]
    require(tokens.ndim == 3 and tokens.shape[0] == 1 and tokens.shape[2] == fam.context_width,
            f"{fam.name}: tokens {tuple(tokens.shape)} for {text!r}, want [1, n, {fam.context_width}]")
    if fam.pad_to is not None:
        require(tokens.shape[1] == fam.pad_to, f"{fam.name}: {tokens.shape[1]} tokens, want {fam.pad_to}")
    pooled = extra.get("pooled_output")
    if fam.pooled_width is None:
        require(pooled is None, f"{fam.name}: a pooled_output, want none")
    else:
        require(pooled is not None and tuple(pooled.shape) == (1, fam.pooled_width),
                f"{fam.name}: pooled_output {None if pooled is None else tuple(pooled.shape)}")
    return {"tokens": list(tokens.shape), "pooled": None if pooled is None else list(pooled.shape),
            "extras": sorted(k for k in extra if k != "pooled_output")}


def sample_latent(fam: Family, model: Any, positive: list, negative: list, seed: int,
                  steps: int = CHECK_STEPS, size: int = CHECK_PX) -> torch.Tensor:
    """One KSampler run (euler, the family's scheduler and cfg) from an empty latent."""
    import comfy.sample
    import torch

    latent = torch.zeros(fam.latent_shape(1, size))
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, fam.cfg, "euler", fam.scheduler, positive, negative, latent,
                               seed=seed, disable_pbar=True)


def check_family(name: str, out: Path, comfyui: Path | None = None) -> dict[str, Any]:
    """Load with the real loaders, encode, sample, decode; raise FixtureCheckError on any problem."""
    import torch

    fam = FAMILIES[name]
    timings: dict[str, float] = {}
    # ComfyUI runs nodes under inference_mode; without it the VAE output would track grads.
    with torch.inference_mode():
        with timed("load_s", timings):
            model, clip, vae = load(name, out, comfyui)
        got = check_detection(fam, model)
        check_weights(fam, out, model, vae)
        with timed("encode_3_prompts_s", timings):
            cat, dog, empty = encode(clip, PROMPTS[0]), encode(clip, PROMPTS[1]), encode(clip, "")
        layout = check_conditioning(fam, cat, PROMPTS[0])
        check_conditioning(fam, empty, "")
        require(not torch.equal(cat[0][0], dog[0][0]), f"{name}: the text encoder gives the same embedding for two prompts")
        # The first run also moves the model to its load device; the second one is warm.
        with timed("sample_4_steps_64px_first_s", timings):
            latent = sample_latent(fam, model, cat, empty, seed=1)
        with timed("sample_4_steps_64px_warm_s", timings):
            other_prompt = sample_latent(fam, model, dog, empty, seed=1)
        other_seed = sample_latent(fam, model, cat, empty, seed=2)
        with timed("decode_s", timings):
            image = vae.decode(latent)
    for what, tensor in {"latent": latent, "image": image}.items():
        require(bool(torch.isfinite(tensor).all()), f"{name}: non-finite {what}")
    want_image = (1, fam.frames, CHECK_PX, CHECK_PX, 3) if fam.frames else \
        (1, 1, CHECK_PX, CHECK_PX, 3) if fam.five_d else (1, CHECK_PX, CHECK_PX, 3)
    require(tuple(image.shape) == want_image, f"{name}: image shape {tuple(image.shape)}, want {want_image}")
    prompt_diff = relative_difference(latent, other_prompt)
    seed_diff = relative_difference(latent, other_seed)
    require(prompt_diff > 1e-3, f"{name}: latent barely depends on the prompt ({prompt_diff:.2e})")
    require(seed_diff > 1e-3, f"{name}: latent barely depends on the seed ({seed_diff:.2e})")
    # What the diffusion model sees (scaled latent space). A random EPS model never removes the
    # initial sigma_max-sized noise, so sd15 ends near std 14.6 (sigma_max); more means blow-up.
    model_space = model.get_model_object("latent_format").process_in(latent)
    require(float(model_space.abs().max()) < MAX_MODEL_SPACE_ABS, f"{name}: latent blew up")
    return {
        **got,
        "conditioning": layout,
        "latent_shape": list(latent.shape),
        "image_shape": list(image.shape),
        "latent_std_model_space": round(float(model_space.std()), 3),
        "image_mean": round(float(image.mean()), 3),
        "prompt_rel_diff": round(prompt_diff, 4),
        "seed_rel_diff": round(seed_diff, 4),
        **timings,
    }


def check_lora(out: Path, comfyui: Path | None = None) -> None:
    """Every tensor of the example LoRA maps onto a layer of the SD1.x fixture, and changes its output."""
    import comfy.lora
    import comfy.sd
    import comfy.utils
    import torch

    fam = FAMILIES["sd15"]
    with torch.inference_mode():
        model, clip, _ = load("sd15", out, comfyui)
        lora = comfy.utils.load_torch_file(str(Path(out).expanduser().resolve() / "loras" / LORA_FILE))
        patches = comfy.lora.load_lora(lora, comfy.lora.model_lora_keys_unet(model.model, {}), log_missing=False)
        require(3 * len(patches) == len(lora), f"example LoRA: {len(patches)} of {len(lora) // 3} layers map")
        cond, empty = encode(clip, PROMPTS[0]), encode(clip, "")
        patched, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
        a, b = sample_latent(fam, model, cond, empty, seed=1), sample_latent(fam, patched, cond, empty, seed=1)
    diff = relative_difference(a, b)
    require(1e-3 < diff < 1.0 and bool(torch.isfinite(b).all()), f"example LoRA: relative change {diff:.2e}")
    log.info("check example LoRA: %d layers, relative change of a 4-step sample %.3f", len(patches), diff)


def free_models() -> None:
    """Drop what the loaders keep cached between families, so the check's peak is one family."""
    import comfy.model_management

    comfy.model_management.unload_all_models()
    gc.collect()
    comfy.model_management.soft_empty_cache()


def check_fixtures(comfyui: Path, out: Path, families: list[str]) -> dict[str, dict[str, Any]]:
    setup_comfy(comfyui)
    report = {}
    for name in families:
        fam = FAMILIES[name]
        size = sum(file_path(out, key).stat().st_size for key in fam.files.values()) / 2**20
        report[name] = {"size_mib": round(size, 1), **check_family(name, out, comfyui)}
        log.info("check %s: %s", name, json.dumps(report[name]))
        free_models()
    if "sd15" in families:
        check_lora(out, comfyui)
    return report
