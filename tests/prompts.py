"""API prompts for the server tests, derived from the example workflows (never hand-copied)."""

from __future__ import annotations

import copy
import io

import numpy as np


def find(prompt: dict, class_type: str) -> str:
    ids = [k for k, v in prompt.items() if v["class_type"] == class_type]
    assert ids, f"no {class_type} in the prompt"
    return ids[0]


def drop_node(prompt: dict, node_id: str, passthrough: str) -> dict:
    """Remove a node, wiring its consumers to what fed its ``passthrough`` input."""
    out = copy.deepcopy(prompt)
    source = out[node_id]["inputs"][passthrough]
    del out[node_id]
    for node in out.values():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and value[:1] == [node_id]:
                node["inputs"][name] = list(source)
    return out


def set_inputs(prompt: dict, class_type: str, **values) -> dict:
    out = copy.deepcopy(prompt)
    out[find(out, class_type)]["inputs"].update(values)
    return out


def insert_v_prediction(prompt: dict) -> dict:
    """Sample the SD1.x fixture as v-prediction: ModelSamplingDiscrete after the loader."""
    out = copy.deepcopy(prompt)
    ck = find(out, "CheckpointLoaderSimple")
    new_id = str(max(int(k) for k in out) + 1)
    for node in out.values():
        for name, value in node["inputs"].items():
            if value == [ck, 0]:
                node["inputs"][name] = [new_id, 0]
    out[new_id] = {"class_type": "ModelSamplingDiscrete",
                   "inputs": {"model": [ck, 0], "sampling": "v_prediction", "zsnr": False}}
    return out


def pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
