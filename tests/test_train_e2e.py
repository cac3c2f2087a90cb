"""Tier C for the trainer: through the real server, Cancel stops training and leaves a loadable
checkpoint, and the saved file loaded by the stock LoraLoader gives the trained MODEL's image."""

from __future__ import annotations

import threading
import time
import uuid

import numpy as np
import pytest
from prompts import find, pixels, set_inputs

from supercond.tools import workflows

pytestmark = [pytest.mark.comfy, pytest.mark.server]


@pytest.fixture(scope="module")
def object_info(server):
    from supercond.tools.server import ComfyClient

    return ComfyClient(server.url).object_info()


def train_prompt(object_info, prefix: str, **train) -> dict:
    wf = workflows.load(workflows.WORKFLOW_DIR / "lora_train.json")
    p = workflows.shrink(workflows.retarget(workflows.to_api(wf, object_info)), size=64, max_steps=4)
    ds = find(p, "SupercondLoadDataset")
    p[ds]["inputs"]["resolution"] = 64
    return set_inputs(p, "SupercondTrainLoRA", **({"filename_prefix": prefix, "save_every": 0} | train))


def saved_image(client, result, prompt) -> np.ndarray:
    return [pixels(png) for node, png in client.images(result) if prompt[node]["class_type"] == "SaveImage"][0]


def test_cancel_stops_and_keeps_a_loadable_checkpoint(server, client, object_info, comfyui):
    import safetensors.torch

    prefix = f"supercond_test/cancel_{uuid.uuid4().hex[:8]}"
    prompt = train_prompt(object_info, prefix, steps=2000, save_every=1)
    client.free()
    folder = comfyui / "models" / "loras" / "supercond_test"  # the first loras folder: where it saves
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("r", client.run(prompt, timeout=600)))
    t.start()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not list(folder.glob(prefix.split("/")[1] + "_*.safetensors")):
        time.sleep(0.5)
    client.interrupt()
    t.join(timeout=120)
    assert box["r"].status == "interrupted", box["r"].error
    files = sorted(folder.glob(prefix.split("/")[1] + "_*.safetensors"))
    assert files and len(files) < 2000
    sd = safetensors.torch.load_file(str(files[-1]))
    assert any(k.endswith("lora_down.weight") for k in sd)
    assert not list(folder.glob(".tmp_*"))
    for f in folder.glob(prefix.split("/")[1] + "_*"):
        f.unlink()


def test_loraloader_reproduces_the_trained_model(client, object_info, comfyui):
    prefix = f"supercond_test/eq_{uuid.uuid4().hex[:8]}"
    prompt = train_prompt(object_info, prefix, steps=2, learning_rate=1e-2)
    client.free()
    r = client.run(prompt)
    assert r.status == "success", r.error
    trained = saved_image(client, r, prompt)
    name = f"{prefix}_000002.safetensors"
    assert (comfyui / "models" / "loras" / name).exists()
    # the same graph, the trainer replaced by the stock LoraLoader on the saved file
    p2 = {k: v for k, v in prompt.items() if v["class_type"] not in ("SupercondTrainLoRA", "PreviewImage",
                                                                       "SupercondLoadDataset")}
    ck = find(p2, "CheckpointLoaderSimple")
    p2["900"] = {"class_type": "LoraLoader", "inputs": {"model": [ck, 0], "clip": [ck, 1], "lora_name": name,
                                                        "strength_model": 1.0, "strength_clip": 0.0}}
    ks = find(p2, "KSampler")
    p2[ks]["inputs"]["model"] = ["900", 0]
    r2 = client.run(p2)
    assert r2.status == "success", r2.error
    loaded = saved_image(client, r2, p2)
    assert np.abs(trained.astype(int) - loaded.astype(int)).max() <= 1
    for f in (comfyui / "models" / "loras" / "supercond_test").glob(prefix.split("/")[1] + "_*"):
        f.unlink()
