"""Example workflows: load the UI-format files, convert them to API prompts, point them at a model.

Conversion uses comfy-cli's port of the frontend's graphToPrompt (``convert_ui_to_api``) against
the running server's /object_info, so no API copy of an example is maintained by hand.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from .paths import PACK_DIR

WORKFLOW_DIR = PACK_DIR / "workflows"

# The checkpoint names our examples use (ComfyUI's usual file names), and the generated fixture
# that stands in for each when the user names no checkpoint.
FIXTURE_FOR_CHECKPOINT = {
    "v1-5-pruned-emaonly-fp16.safetensors": "supercond_sd15_tiny.safetensors",
    "sd3_medium_incl_clips.safetensors": "supercond_sd3_tiny.safetensors",
    "sd_xl_base_1.0.safetensors": "supercond_sdxl_tiny.safetensors",
}
# Diffusion models and VAEs of the families loaded with UNETLoader + VAELoader (ComfyUI's usual names).
FIXTURE_FOR_UNET = {
    "Chroma1-HD.safetensors": "supercond_chroma_tiny.safetensors",
    "flux1-dev.safetensors": "supercond_flux_tiny.safetensors",
    "qwen_image_fp8_e4m3fn.safetensors": "supercond_qwen_image_tiny.safetensors",
    "wan2.1_t2v_1.3B_fp16.safetensors": "supercond_wan21_t2v_tiny.safetensors",
}
FIXTURE_FOR_VAE = {"ae.safetensors": "supercond_flux_vae.safetensors",
                   "wan_2.1_vae.safetensors": "supercond_wan21_vae.safetensors",
                   "qwen_image_vae.safetensors": "supercond_wan21_vae.safetensors"}
# Text encoders too large to generate: a test server swaps the loader node for the family's stand-in
# (tests/comfy_packs/supercond_standins), chosen by the loader's ``type``.
STANDIN = "SupercondStandInCLIPLoader"
STANDIN_FOR_CLIP_TYPE = {"chroma": "chroma", "flux": "flux", "qwen_image": "qwen_image", "wan": "wan"}
CLIP_LOADERS = ("CLIPLoader", "DualCLIPLoader")
LOADER_INPUT = {"CheckpointLoaderSimple": "ckpt_name"}
FILE_INPUTS = {"UNETLoader": ("unet_name", FIXTURE_FOR_UNET), "VAELoader": ("vae_name", FIXTURE_FOR_VAE)}
# The LoRA lora_train writes with its defaults (prefix supercond/example_lora, 200 steps), which
# lora_load names, and the generated LoRA (tools/fixtures.py) that stands in for it.
FIXTURE_FOR_LORA = {"supercond/example_lora_000200.safetensors": "supercond/example_lora.safetensors"}
LORA_INPUT = {"LoraLoader": "lora_name", "LoraLoaderModelOnly": "lora_name"}
# Widget name -> {example file: fixture}, for retargeting in the graph editor.
FIXTURE_FOR_WIDGET = {"ckpt_name": FIXTURE_FOR_CHECKPOINT, "lora_name": FIXTURE_FOR_LORA,
                      "unet_name": FIXTURE_FOR_UNET, "vae_name": FIXTURE_FOR_VAE}


def example_paths() -> list[Path]:
    return sorted(WORKFLOW_DIR.glob("*.json"))


def load(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def to_api(workflow: dict, object_info: dict) -> dict:
    from comfy_cli.workflow_to_api import convert_ui_to_api

    return convert_ui_to_api(workflow, object_info)


def checkpoints_used(prompt: dict) -> list[str]:
    return [n["inputs"][LOADER_INPUT[n["class_type"]]] for n in prompt.values()
            if n.get("class_type") in LOADER_INPUT]


def retarget(prompt: dict, mapping: dict[str, str] | None = None, loras: dict[str, str] | None = None) -> dict:
    """Swap checkpoint file names (by default: each example checkpoint for its generated fixture) and
    LoRA file names (by default: the trained example LoRA for the generated one); diffusion models and
    VAEs for theirs, and the text-encoder loaders of those families for the stand-in encoder."""
    mapping = FIXTURE_FOR_CHECKPOINT if mapping is None else mapping
    loras = FIXTURE_FOR_LORA if loras is None else loras
    out = copy.deepcopy(prompt)
    for node in out.values():
        kind = node.get("class_type")
        if kind in FILE_INPUTS:
            key, names = FILE_INPUTS[kind]
            node["inputs"][key] = names.get(node["inputs"][key], node["inputs"][key])
        if kind in CLIP_LOADERS and node["inputs"].get("type") in STANDIN_FOR_CLIP_TYPE:
            node["class_type"] = STANDIN
            node["inputs"] = {"family": STANDIN_FOR_CLIP_TYPE[node["inputs"]["type"]]}
        for table, names in ((LOADER_INPUT, mapping), (LORA_INPUT, loras)):
            key = table.get(node.get("class_type"))
            if key and isinstance(node["inputs"].get(key), str):
                name = node["inputs"][key]
                node["inputs"][key] = names.get(name, name)
    return out


def shrink(prompt: dict, size: int = 64, max_steps: int = 4) -> dict:
    """Smaller images and fewer steps, for the tiny random-weight fixtures on a CPU."""
    out = copy.deepcopy(prompt)
    for node in out.values():
        inputs = node.get("inputs", {})
        if node.get("class_type", "").startswith("Empty") and "width" in inputs:
            inputs["width"], inputs["height"] = size, size
            if isinstance(inputs.get("length"), int):  # video: 5 frames (2 latent frames)
                inputs["length"] = min(inputs["length"], 5)
        if "resolution" in inputs and isinstance(inputs["resolution"], int):  # training datasets
            inputs["resolution"] = min(inputs["resolution"], size)
        if "steps" in inputs and isinstance(inputs["steps"], int):
            inputs["steps"] = min(inputs["steps"], max_steps)
        if isinstance(inputs.get("teacher_steps"), int):  # the schedule fit's reference
            inputs["teacher_steps"] = min(inputs["teacher_steps"], 4 * max_steps)
        if isinstance(inputs.get("sample_prompts"), str):  # the trainer's previews: later options win
            inputs["sample_prompts"] = "\n".join(
                f"{line} --s {max_steps} --w {size} --h {size}" if line.strip() and not line.strip().startswith("#")
                else line for line in inputs["sample_prompts"].split("\n"))
    return out
