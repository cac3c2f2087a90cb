"""Tiny random-weight checkpoints that ComfyUI's real loaders read, cached between runs.

Two single-file checkpoints, both loadable by ``CheckpointLoaderSimple``
(``comfy.sd.load_checkpoint_guess_config``):

* ``supercond_sd15_tiny.safetensors``: SD1.x. A one-level UNet (model_channels 320 and
  context_dim 768 are what ComfyUI keys SD1.x on), full-size CLIP-L, full-size SD VAE.
* ``supercond_sd3_tiny.safetensors``: SD3 (flow matching). A depth-2 MMDiT, full-size CLIP-L
  as the only text encoder, full-size 16-channel SD3 VAE.

Weights are random but deterministic (fixed seed per model, byte-identical files) and stored
as fp16. ``--check`` loads each file with ComfyUI's loader, encodes two prompts, samples 4
steps at 64 px and decodes, and loads both through the CheckpointLoaderSimple node.

Usage::

    python tools/fixtures.py --comfyui ~/comfy/ComfyUI --out DIR [--force] [--check]

Plus one LoRA, ``OUT/loras/supercond/example_lora.safetensors`` (kohya format, seeded random
weights, byte-identical between runs), that the stock ``LoraLoader`` reads: the example workflow
``lora_load`` names the file ``lora_train`` writes, and tests and ``scripts/examples`` retarget it
to this one. It touches only the first transformer of the UNet's first level, whose layers have
the same shapes in the tiny SD1.x fixture and in a real SD1.x checkpoint, so it loads on both.

prints one JSON line ``{"checkpoints": {"sd15": "<abs path>", "sd3": "<abs path>"}, "loras":
{"example": "<abs path>"}}`` on stdout; logging goes to stderr. From Python:
``ensure_fixtures(comfyui, out)``.

Standalone on purpose (no imports from the pack): tests and benchmarks call it before ComfyUI
or the pack are set up.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# Bump whenever generation changes (architecture, init, dtype, keys): invalidates every cache.
FIXTURE_VERSION = 1
SEED = 20240601
# Std of the noise given to weights that would otherwise be entirely zero.
ZERO_WEIGHT_STD = 0.02
STAMP_NAME = ".supercond-fixtures.json"
FILES = {
    "sd15": "supercond_sd15_tiny.safetensors",
    "sd3": "supercond_sd3_tiny.safetensors",
}

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


log = logging.getLogger("supercond.fixtures")


class FixtureCheckError(RuntimeError):
    """A generated checkpoint does not behave as the tests need."""


# --------------------------------------------------------------------------- cache


def comfyui_version(comfyui: Path) -> str:
    """Read the version without importing ComfyUI (the cached path must stay cheap)."""
    text = (comfyui / "comfyui_version.py").read_text(encoding="utf-8")
    match = re.search(r"__version__\s*=\s*['\"]([^'\"]+)['\"]", text)
    if match is None:
        raise RuntimeError(f"no __version__ in {comfyui / 'comfyui_version.py'}")
    return match.group(1)


def expected_stamp(comfyui: Path) -> dict[str, Any]:
    return {
        "fixture_version": FIXTURE_VERSION,
        "comfyui_version": comfyui_version(comfyui),
        "files": dict(FILES),
    }


def is_fresh(ckpt_dir: Path, stamp: dict[str, Any]) -> bool:
    """True when the stamp matches and every file it lists is present with its recorded size."""
    try:
        found = json.loads((ckpt_dir / STAMP_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    sizes = found.pop("sizes", {})
    if found != stamp:
        return False
    for name in FILES.values():
        path = ckpt_dir / name
        if not path.is_file() or path.stat().st_size != sizes.get(name):
            return False
    return True


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) then rename: readers never see a half-written file, even if we crash."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        tmp.chmod(0o644)  # safetensors creates its files 0600
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_stamp(ckpt_dir: Path, stamp: dict[str, Any]) -> None:
    sizes = {name: (ckpt_dir / name).stat().st_size for name in FILES.values()}
    text = json.dumps({**stamp, "sizes": sizes}, indent=2, sort_keys=True) + "\n"
    write_atomically(ckpt_dir / STAMP_NAME, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def ensure_fixtures(comfyui: Path, out: Path, *, force: bool = False) -> dict[str, Path]:
    """Make sure ``out/checkpoints`` holds current fixtures; return {"sd15": path, "sd3": path}.

    Regenerates everything when forced, when the stamp (FIXTURE_VERSION, ComfyUI version)
    differs or when a file is missing; otherwise imports neither torch nor ComfyUI.
    """
    comfyui = Path(comfyui).expanduser().resolve()
    ckpt_dir = Path(out).expanduser().resolve() / "checkpoints"
    paths = {key: ckpt_dir / name for key, name in FILES.items()}
    stamp = expected_stamp(comfyui)
    if not force and is_fresh(ckpt_dir, stamp):
        log.info("fixtures up to date in %s", ckpt_dir)
        ensure_lora(comfyui, out, paths["sd15"])
        return paths

    ckpt_dir.mkdir(parents=True, exist_ok=True)
    # Drop the stamp first so an interrupted run is never mistaken for a complete one.
    (ckpt_dir / STAMP_NAME).unlink(missing_ok=True)
    setup_comfy(comfyui)
    for key, builder in BUILDERS.items():
        start = time.perf_counter()
        state_dict = builder()
        save_checkpoint(paths[key], state_dict, key)
        size_mb = paths[key].stat().st_size / 2**20
        log.info("generated %s (%.0f MiB) in %.1f s", paths[key].name, size_mb, time.perf_counter() - start)
    write_stamp(ckpt_dir, stamp)
    ensure_lora(comfyui, out, paths["sd15"], force=True)
    return paths


# --------------------------------------------------------------------------- example LoRA


def lora_path(out: Path) -> Path:
    return Path(out).expanduser().resolve() / "loras" / LORA_FILE


def lora_stamp() -> dict[str, Any]:
    return {"name": "example_lora", "fixture_version": FIXTURE_VERSION, "lora_version": LORA_VERSION}


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The header's __metadata__, read without torch (8-byte length, then JSON)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(size)).get("__metadata__", {})


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


# --------------------------------------------------------------------------- ComfyUI setup


def setup_comfy(comfyui: Path) -> None:
    """Put ComfyUI first on sys.path and force CPU before comfy.model_management is imported."""
    path = str(comfyui)
    if path in sys.path:
        sys.path.remove(path)
    sys.path.insert(0, path)
    import comfy.cli_args  # argparse defaults only; imports nothing heavy

    if "comfy.model_management" in sys.modules:
        # Someone set ComfyUI up already (e.g. a test session): keep its device choice.
        # Generation builds everything on the CPU explicitly, so that is harmless.
        log.debug("comfy.model_management already imported; not forcing --cpu")
    else:
        # Otherwise model_management probes CUDA on import.
        comfy.cli_args.args.cpu = True
    # comfy is a namespace package (no __file__): locate it through a module.
    loaded_from = Path(comfy.cli_args.__file__).resolve().parent.parent
    if loaded_from != comfyui:
        log.warning("comfy is imported from %s, not %s", loaded_from, comfyui)


# --------------------------------------------------------------------------- weights


def torch_reset(module: torch.nn.Module) -> bool:
    """Run torch's own reset_parameters on a layer.

    ComfyUI's ops (comfy.ops.disable_weight_init) override reset_parameters with a no-op, so
    we call the torch.nn base class's version instead.
    """
    for cls in type(module).__mro__:
        if cls.__module__.startswith("torch.nn.") and "reset_parameters" in vars(cls):
            cls.reset_parameters(module)
            return True
    return False


@contextmanager
def nan_filled_empty() -> Iterator[None]:
    """Make torch.empty() return NaN, so weights the constructor never set are recognisable.

    ComfyUI skips weight init (the loader overwrites everything), leaving torch.empty memory,
    which is neither random nor reproducible. NaN marks "never set" apart from values a
    constructor sets on purpose (constants, zero inits), which init_weights keeps.
    """
    import torch
    import torch.utils.deterministic

    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_filling = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = was_filling
        torch.use_deterministic_algorithms(was_deterministic)


def init_weights(model: torch.nn.Module) -> None:
    """Deterministic random init of every parameter the constructor left unset (NaN).

    Layers get torch's default init, bare parameters small noise. Any weight that is entirely
    zero gets N(0, ZERO_WEIGHT_STD): a zero output layer would make the output ignore the
    conditioning. (ComfyUI's copies of openaimodel and MMDiT dropped zero_module and the zero
    adaLN init, so today nothing is zero; the pass guards against constructors that change.)
    """
    import torch

    with torch.no_grad():
        for module in model.modules():
            if any(is_unset(p) for p in module.parameters(recurse=False)):
                torch_reset(module)
        for name, param in model.named_parameters():
            total = float(param.abs().sum())  # one pass: NaN if unset, 0 if all zero
            if math.isnan(total):
                log.debug("bare parameter %s: N(0, %s)", name, ZERO_WEIGHT_STD)
                param.normal_(0.0, ZERO_WEIGHT_STD)
            elif total == 0.0 and name.endswith("weight"):
                log.debug("all-zero weight %s: N(0, %s)", name, ZERO_WEIGHT_STD)
                param.normal_(0.0, ZERO_WEIGHT_STD)
    unset = [name for name, t in model.state_dict().items() if t.is_floating_point() and is_unset(t)]
    if unset:
        raise RuntimeError(f"tensors left uninitialised: {unset[:5]}")


def is_unset(tensor: torch.Tensor) -> bool:
    """Any NaN left from nan_filled_empty (a sum is one cheap pass; NaN propagates)."""
    return math.isnan(float(tensor.sum()))


def build(factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Construct and initialise one model under a fixed seed, so files are reproducible."""
    import torch

    torch.manual_seed(SEED)
    with nan_filled_empty():
        model = factory()
    init_weights(model)
    return model.eval()


def prefixed(model: torch.nn.Module, prefix: str, drop: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in model.state_dict().items() if k not in drop}


def comfy_ops() -> Any:
    import comfy.ops

    return comfy.ops.disable_weight_init


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
    """As comfy.sd.VAE builds it for 16 latent channels without post_quant_conv (SD3)."""
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


BUILDERS: dict[str, Callable[[], dict[str, torch.Tensor]]] = {
    "sd15": sd15_state_dict,
    "sd3": sd3_state_dict,
}


def save_checkpoint(path: Path, state_dict: dict[str, torch.Tensor], key: str) -> None:
    """fp16 safetensors: half the size and write time; ComfyUI upcasts on load where needed."""
    import torch
    from safetensors.torch import save_file

    def fits_fp16(tensor: torch.Tensor) -> bool:
        # In fp32 (fp16 math is slow on CPU); NaN fails both comparisons, inf the bound.
        low, high = torch.aminmax(tensor)
        return bool(low >= -fp16_max) and bool(high <= fp16_max)

    fp16_max = torch.finfo(torch.float16).max
    bad = [k for k, v in state_dict.items() if not fits_fp16(v)]
    if bad:
        raise RuntimeError(f"weights not representable in fp16 in {key}: {bad[:5]}")
    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in state_dict.items()}
    # One metadata entry only: safetensors writes its metadata map in random (hash) order,
    # so two entries would make otherwise identical files differ byte-wise.
    metadata = {"supercond_fixture": json.dumps({"name": key, "version": FIXTURE_VERSION})}
    write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


# --------------------------------------------------------------------------- check

# model.model.model_type and the model_sampling class ComfyUI must pick for each file.
EXPECTED = {"sd15": ("EPS", "ModelSamplingDiscrete"), "sd3": ("FLOW", "ModelSamplingDiscreteFlow")}
CHECK_STEPS = 4
CHECK_PX = 64
MAX_MODEL_SPACE_ABS = 100.0


def require(condition: bool, message: str) -> None:
    if not condition:
        raise FixtureCheckError(message)


@contextmanager
def timed(label: str, timings: dict[str, float]) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[label] = round(time.perf_counter() - start, 2)


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().mean() / a.abs().mean().clamp_min(1e-12))


def sample_latent(model: Any, positive: Any, negative: Any, seed: int) -> torch.Tensor:
    """One KSampler run: euler / normal, 4 steps, cfg 4, from an empty latent."""
    import comfy.sample
    import torch

    channels = model.get_model_object("latent_format").latent_channels
    size = CHECK_PX // 8
    latent = torch.zeros(1, channels, size, size)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(
        model, noise, CHECK_STEPS, 4.0, "euler", "normal", positive, negative, latent,
        seed=seed, disable_pbar=True,
    )


def load_and_check_type(key: str, path: Path) -> tuple[Any, Any, Any]:
    """comfy.sd.load_checkpoint_guess_config, plus the model type and sampling ComfyUI detected."""
    import comfy.model_sampling
    import comfy.sd

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)
    require(clip is not None and vae is not None, f"{key}: loader returned no CLIP or VAE")
    want_type, want_sampling = EXPECTED[key]
    model_type = model.model.model_type.name
    require(model_type == want_type, f"{key}: model type {model_type}, want {want_type}")
    sampling = model.get_model_object("model_sampling")
    require(
        isinstance(sampling, getattr(comfy.model_sampling, want_sampling)),
        f"{key}: model sampling {type(sampling).__mro__[1].__name__}, want {want_sampling}",
    )
    return model, clip, vae


def check_checkpoint(key: str, path: Path) -> dict[str, Any]:
    """Load with the real loader, encode, sample, decode; raise FixtureCheckError on any problem."""
    import torch

    timings: dict[str, float] = {}
    # ComfyUI runs nodes under inference_mode; without it the VAE output would track grads.
    with torch.inference_mode():
        with timed("load_s", timings):
            model, clip, vae = load_and_check_type(key, path)

        def encode(text: str) -> Any:
            return clip.encode_from_tokens_scheduled(clip.tokenize(text))

        with timed("encode_3_prompts_s", timings):
            cat, dog, empty = encode("a cat"), encode("a photo of a dog on the beach"), encode("")
        require(not torch.equal(cat[0][0], dog[0][0]), f"{key}: CLIP gives the same embedding for two prompts")

        # The first run also moves the model to its load device; the second one is warm.
        with timed("sample_4_steps_64px_first_s", timings):
            latent = sample_latent(model, cat, empty, seed=1)
        with timed("sample_4_steps_64px_warm_s", timings):
            other_prompt = sample_latent(model, dog, empty, seed=1)
        other_seed = sample_latent(model, cat, empty, seed=2)
        with timed("decode_s", timings):
            image = vae.decode(latent)

    for name, tensor in {"latent": latent, "image": image}.items():
        require(bool(torch.isfinite(tensor).all()), f"{key}: non-finite {name}")
    require(tuple(image.shape[1:3]) == (CHECK_PX, CHECK_PX), f"{key}: image shape {tuple(image.shape)}")
    prompt_diff = relative_difference(latent, other_prompt)
    seed_diff = relative_difference(latent, other_seed)
    require(prompt_diff > 1e-3, f"{key}: latent barely depends on the prompt ({prompt_diff:.2e})")
    require(seed_diff > 1e-3, f"{key}: latent barely depends on the seed ({seed_diff:.2e})")
    # What the diffusion model sees (scaled latent space). A random EPS model never removes the
    # initial sigma_max-sized noise, so sd15 ends near std 14.6 (sigma_max); more means blow-up.
    model_space = model.get_model_object("latent_format").process_in(latent)
    require(float(model_space.abs().max()) < MAX_MODEL_SPACE_ABS, f"{key}: latent blew up")
    return {
        "model_type": model.model.model_type.name,
        "model_sampling": EXPECTED[key][1],
        "latent_std": round(float(latent.std()), 3),
        "latent_std_model_space": round(float(model_space.std()), 3),
        "latent_absmax": round(float(latent.abs().max()), 3),
        "image_mean": round(float(image.mean()), 3),
        "prompt_rel_diff": round(prompt_diff, 4),
        "seed_rel_diff": round(seed_diff, 4),
        **timings,
    }


def import_comfy_nodes(comfyui: Path) -> Any:
    """ComfyUI's nodes.py; refuse another ``nodes`` (the pack has one) that got there first."""
    import nodes

    where = Path(nodes.__file__).resolve()
    require(where == comfyui / "nodes.py", f"'nodes' resolves to {where}, not ComfyUI's")
    return nodes


def check_node_loader(comfyui: Path, paths: dict[str, Path]) -> None:
    """Load every fixture through ComfyUI's own CheckpointLoaderSimple node."""
    import folder_paths

    nodes = import_comfy_nodes(comfyui)
    for path in {p.parent for p in paths.values()}:
        folder_paths.add_model_folder_path("checkpoints", str(path))
    for key, path in paths.items():
        model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(path.name)
        require(None not in (model, clip, vae), f"{key}: CheckpointLoaderSimple returned None")
        log.info("CheckpointLoaderSimple loaded %s as %s", path.name, type(model.model).__name__)


def check_fixtures(comfyui: Path, paths: dict[str, Path]) -> dict[str, dict[str, Any]]:
    setup_comfy(comfyui)
    report = {}
    for key, path in paths.items():
        report[key] = {"size_mib": round(path.stat().st_size / 2**20, 1), **check_checkpoint(key, path)}
        log.info("check %s: %s", key, json.dumps(report[key]))
    check_node_loader(comfyui, paths)
    check_lora(paths["sd15"], paths["sd15"].parent.parent / "loras" / LORA_FILE)
    return report


def check_lora(sd15: Path, path: Path) -> None:
    """Every tensor of the example LoRA maps onto a layer of the SD1.x fixture, and changes its output."""
    import comfy.lora
    import comfy.sd
    import comfy.utils
    import torch

    with torch.inference_mode():
        model, clip, vae = load_and_check_type("sd15", sd15)
        lora = comfy.utils.load_torch_file(str(path))
        patches = comfy.lora.load_lora(lora, comfy.lora.model_lora_keys_unet(model.model, {}), log_missing=False)
        require(3 * len(patches) == len(lora), f"example LoRA: {len(patches)} of {len(lora) // 3} layers map")
        cond = clip.encode_from_tokens_scheduled(clip.tokenize("a cat"))
        empty = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        patched, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
        a, b = sample_latent(model, cond, empty, seed=1), sample_latent(patched, cond, empty, seed=1)
    diff = relative_difference(a, b)
    require(1e-3 < diff < 1.0 and bool(torch.isfinite(b).all()), f"example LoRA: relative change {diff:.2e}")
    log.info("check example LoRA: %d layers, relative change of a 4-step sample %.3f", len(patches), diff)


# --------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", type=Path, required=True, help="ComfyUI checkout")
    parser.add_argument("--out", type=Path, required=True, help="fixtures go to OUT/checkpoints")
    parser.add_argument("--force", action="store_true", help="regenerate even if the cache is fresh")
    parser.add_argument("--check", action="store_true", help="load, sample and decode each checkpoint")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    comfyui = args.comfyui.expanduser().resolve()
    start = time.perf_counter()
    paths = ensure_fixtures(comfyui, args.out, force=args.force)
    log.info("fixtures ready in %.1f s", time.perf_counter() - start)
    if args.check:
        check_fixtures(comfyui, paths)
        log.info("check passed")
    sys.stdout.write(json.dumps({"checkpoints": {k: str(v) for k, v in paths.items()},
                                 "loras": {"example": str(lora_path(args.out))}}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
