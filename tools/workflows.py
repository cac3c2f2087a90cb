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
}
LOADER_INPUT = {"CheckpointLoaderSimple": "ckpt_name"}
# The LoRA lora_train writes with its defaults (prefix supercond/example_lora, 200 steps), which
# lora_load names, and the generated LoRA (tools/fixtures.py) that stands in for it.
FIXTURE_FOR_LORA = {"supercond/example_lora_000200.safetensors": "supercond/example_lora.safetensors"}
LORA_INPUT = {"LoraLoader": "lora_name", "LoraLoaderModelOnly": "lora_name"}
# Widget name -> {example file: fixture}, for retargeting in the graph editor.
FIXTURE_FOR_WIDGET = {"ckpt_name": FIXTURE_FOR_CHECKPOINT, "lora_name": FIXTURE_FOR_LORA}


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
    LoRA file names (by default: the trained example LoRA for the generated one)."""
    mapping = FIXTURE_FOR_CHECKPOINT if mapping is None else mapping
    loras = FIXTURE_FOR_LORA if loras is None else loras
    out = copy.deepcopy(prompt)
    for node in out.values():
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
        if "resolution" in inputs and isinstance(inputs["resolution"], int):  # training datasets
            inputs["resolution"] = min(inputs["resolution"], size)
        if "steps" in inputs and isinstance(inputs["steps"], int):
            inputs["steps"] = min(inputs["steps"], max_steps)
    return out
