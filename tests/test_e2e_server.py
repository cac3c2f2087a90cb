"""Tier C: the real ComfyUI server with only this pack, driven through its API queue.

The example workflows, converted (comfy-cli's port of the frontend's graphToPrompt), run on the
generated fixtures; the perturbation guarantees are checked on the images that come back from /view.
That every example runs to success, with its images, files and plots, is checked once, in the browser
tier, on the prompt the real editor queues (tests/test_browser.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from prompts import drop_node, find, insert_v_prediction, pixels, set_inputs

from supercond.tools import workflows
from supercond.tools.server import PromptRejected, pack_import_failed

pytestmark = [pytest.mark.comfy, pytest.mark.server]

# Every node whose public surface is frozen must be served by the running server.
NODE_IDS = sorted(json.loads((Path(__file__).parent / "snapshots" / "node_info.json").read_text()))
EXAMPLES = workflows.example_paths()


@pytest.fixture(scope="module")
def object_info(server):
    from supercond.tools.server import ComfyClient

    return ComfyClient(server.url).object_info()


def example(name: str, object_info: dict) -> dict:
    wf = workflows.load(workflows.WORKFLOW_DIR / f"{name}.json")
    return workflows.shrink(workflows.retarget(workflows.to_api(wf, object_info)), size=64, max_steps=4)


def run_images(client, prompt: dict) -> list[np.ndarray]:
    client.free()  # drop cached outputs so the whole graph executes again
    result = client.run(prompt)
    assert result.status == "success", (result.error or {}).get("exception_message", result.error)
    return [pixels(png) for node, png in client.images(result) if prompt[node]["class_type"] == "SaveImage"]


def test_the_pack_loads_alone_with_all_its_nodes(server, object_info):
    assert not pack_import_failed(server.log_text())
    for node_id in NODE_IDS:
        assert node_id in object_info, f"{node_id} missing from /object_info"
    assert all(k.startswith("Supercond") or object_info[k]["python_module"].startswith(("nodes", "comfy_extras",
               "comfy_api_nodes")) for k in object_info), "another custom pack was loaded"


def test_examples_are_listed_as_templates(client):
    templates = client.get("/workflow_templates").json()
    listed = {stem for stems in templates.values() for stem in stems}
    assert {p.stem for p in EXAMPLES} <= listed


@pytest.mark.parametrize("family", ["eps", "v", "flow"])
def test_gamma_zero_matches_no_node_and_seeds_reproduce(client, object_info, family):
    if family == "flow":
        base = example("cads_flow_sd3", object_info)
        node = find(base, "SupercondCADS")
        base[node] = {"class_type": "SupercondCEP", "inputs": {
            "model": base[node]["inputs"]["model"], "gamma": 1.0, "distribution": "uniform", "scale": "paper",
            "apply_to": "tokens", "branch": "positive", "resample": "every_step", "seed_offset": 0}}
    else:
        base = example("cep_sampling", object_info)
        base = insert_v_prediction(base) if family == "v" else base
    base = set_inputs(base, "KSampler", seed=11)
    without = drop_node(base, find(base, "SupercondCEP"), "model")
    without = {k: v for k, v in without.items() if v["class_type"] != "SupercondPlotPerturbation"}
    plain = run_images(client, without)
    zero = run_images(client, set_inputs(base, "SupercondCEP", gamma=0.0))
    assert all(np.array_equal(a, b) for a, b in zip(zero, plain, strict=True)), "gamma 0 changed the image"
    once = run_images(client, base)
    twice = run_images(client, base)
    assert all(np.array_equal(a, b) for a, b in zip(once, twice, strict=True)), "same seed, different image"
    assert not all(np.array_equal(a, b) for a, b in zip(once, plain, strict=True)), "gamma 1 changed nothing"


def test_bad_values_are_refused_at_validation(client, object_info):
    base = example("cads_sampling", object_info)
    with pytest.raises(PromptRejected) as err:
        client.queue(set_inputs(base, "SupercondCADS", tau1=0.95, tau2=0.6))
    assert "tau1 (0.95) must be smaller than tau2 (0.6)" in str(err.value)
    cep = example("cep_static", object_info)
    with pytest.raises(PromptRejected) as err:
        client.queue(set_inputs(cep, "SupercondPerturbConditioning", gamma=-1.0))
    assert "gamma is -1.0: it must be between 0.0 and 100.0" in str(err.value)
    with pytest.raises(PromptRejected) as err:  # ComfyUI 0.3.64 checks no V3 combo: the node does
        client.queue(set_inputs(base, "SupercondCADS", branch="sideways"))
    assert "branch 'sideways' is not one of the choices: positive, negative, both" in str(err.value)


def test_a_model_the_hook_cannot_serve_errors_clearly_and_the_server_stays_up(server, client, object_info):
    base = example("cep_sampling", object_info)
    result = client.run(set_inputs(base, "SupercondCEP", apply_to="pooled", seed_offset=1))
    assert result.status == "error"
    assert "SD1.x models take no pooled text embedding" in result.error["exception_message"]
    assert server.alive()
    assert client.run(set_inputs(base, "SupercondCEP", seed_offset=2)).status == "success"


def test_conditioning_of_another_family_errors_clearly_and_the_server_stays_up(server, client, object_info):
    """SD1.x text conditioning (768 wide) fed to the SDXL fixture: refused by name, then the SD1.x graph runs."""
    base = example("cep_sampling", object_info)
    mixed = json.loads(json.dumps(base))
    sdxl = str(max(int(k) for k in mixed) + 1)
    mixed[sdxl] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "supercond_sdxl_tiny.safetensors"}}
    mixed[find(mixed, "SupercondCEP")]["inputs"]["model"] = [sdxl, 0]
    result = client.run(mixed)
    assert result.status == "error"
    assert "conditioning is 768 wide but SDXL models take 2048-wide" in result.error["exception_message"]
    assert server.alive()
    assert client.run(set_inputs(base, "SupercondCEP", seed_offset=3)).status == "success"
