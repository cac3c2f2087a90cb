"""scripts/train: the trainer node of a saved workflow outside the server, on one process or several
(torchrun, gloo on this CPU). One process equals the node run by the server bit for bit; two processes
with batch b each equal one with batch 2b, also across a resume from 2 to 1 process and from 1 to 2."""

from __future__ import annotations

import json
import os
import re
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from prompts import find, set_inputs
from safetensors.torch import load_file
from test_train_e2e import saved_image

from supercond.tools import workflows
from supercond.tools.paths import PACK_DIR

pytestmark = [pytest.mark.comfy, pytest.mark.server]
LR, STEPS = 1e-2, 3  # a LoRA file every step; the .state.pt of the last only
# The two-process run sums the same gradients in another order (float32). AdamW divides each gradient by
# its running RMS, so an element whose gradient is near 0 turns that rounding into up to a few % of the
# learning rate per step; the weights as a whole agree far closer (RELATIVE, on their norm).
ATOL, RELATIVE = 0.05 * LR * STEPS, 1e-3


@pytest.fixture(scope="module")
def base_prompt(server) -> dict:
    from supercond.tools.server import ComfyClient

    info = ComfyClient(server.url).object_info()
    wf = workflows.load(workflows.WORKFLOW_DIR / "lora_train.json")
    p = workflows.shrink(workflows.retarget(workflows.to_api(wf, info)), size=64, max_steps=4)
    p = set_inputs(p, "SupercondLoadDataset", resolution=64)
    # two micro-batches a step: with two processes the gradients are averaged on the second only (no_sync)
    return set_inputs(p, "SupercondTrainLoRA", steps=STEPS, save_every=1, batch_size=2, learning_rate=LR,
                      grad_accumulation=2)


@pytest.fixture(scope="module")
def straight(server, base_prompt, tmp_path_factory) -> str:
    """The stem of the reference run: scripts/train with one process, batch 2 (no torchrun)."""
    stem = f"one_{uuid.uuid4().hex[:6]}"
    run_ok(server, tmp_path_factory.mktemp("straight"),
           set_inputs(base_prompt, "SupercondTrainLoRA", filename_prefix=f"supercond_test/{stem}"))
    return stem


def comfy_options(server) -> list[str]:
    w = server.workdir
    return ["--extra-model-paths-config", str(w / "extra_model_paths.yaml"), "--input-directory", str(w / "input"),
            "--output-directory", str(w / "output"), "--temp-directory", str(w / "temp"),
            "--user-directory", str(w / "user")]


def train(server, tmp_path: Path, prompt: dict, *options: str) -> subprocess.CompletedProcess:
    path = tmp_path / f"{uuid.uuid4().hex[:8]}.json"
    path.write_text(json.dumps(prompt))
    return subprocess.run([str(PACK_DIR / "scripts" / "train"), str(path), *options, "--", *comfy_options(server)],
                          capture_output=True, text=True, timeout=600)


def run_ok(server, tmp_path, prompt, *options) -> None:
    r = train(server, tmp_path, prompt, *options)
    assert r.returncode == 0, r.stderr[-3000:]


def weights(folder: Path, stem: str, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(folder / f"{stem}_{step:06d}.safetensors"))


def state_params(folder: Path, stem: str, step: int) -> list[torch.Tensor]:
    return torch.load(folder / f"{stem}_{step:06d}.state.pt", weights_only=True)["params"]


def assert_close(a: list[torch.Tensor], b: list[torch.Tensor], atol: float = ATOL, relative: float = RELATIVE) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=atol, rtol=0)
        assert float((x - y).norm()) <= relative * float(y.norm()) + 1e-12


def test_one_process_is_the_node_and_the_node_on_two_processes_is_twice_the_batch(server, base_prompt, straight):
    """scripts/train on one process writes the node's files bit for bit. The node with processes 2 (which
    starts scripts/train) with batch 1 writes the LoRA of one process with batch 2 within ATOL / RELATIVE,
    its progress bar, live chart and sample previews get every step's, and its MODEL samples as the stock
    LoraLoader's on the saved file, pixel for pixel."""
    from supercond.tools.server import ComfyClient

    folder = server.loras_dir / "supercond_test"
    tag = uuid.uuid4().hex[:6]
    node = set_inputs(base_prompt, "SupercondTrainLoRA", filename_prefix=f"supercond_test/node_{tag}")
    r = ComfyClient(server.url).run(node)
    assert r.status == "success", _said(r.error)
    a, b = weights(folder, f"node_{tag}", STEPS), weights(folder, straight, STEPS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(x, y) for x, y in zip(state_params(folder, f"node_{tag}", STEPS),
                                                  state_params(folder, straight, STEPS), strict=True))

    # two processes from the node (processes 2: it starts scripts/train, which starts torchrun)
    client = ComfyClient(server.url)
    two = set_inputs(base_prompt, "SupercondTrainLoRA", filename_prefix=f"supercond_test/two_{tag}", batch_size=1,
                     processes=2, sample_every=2)
    trainer = find(two, "SupercondTrainLoRA")
    r = client.run(two)
    assert r.status == "success", _said(r.error)
    assert not _ranks_alive()
    moved = max((b[k].float() - weights(folder, straight, 1)[k].float()).abs().max() for k in a)
    assert moved > 1e-3  # the steps changed the weights: the comparison below means something
    assert_close(state_params(folder, f"two_{tag}", STEPS), state_params(folder, straight, STEPS))
    losses = [torch.load(folder / f"{s}_{STEPS:06d}.state.pt", weights_only=True)["losses"] for s in (straight, f"two_{tag}")]
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), atol=1e-5, rtol=0)
    for k, v in weights(folder, f"two_{tag}", STEPS).items():  # the saved float16 files: within rounding
        torch.testing.assert_close(v.float(), b[k].float(), atol=ATOL, rtol=1e-3)
    # the node's progress bar and live chart got every step; its MODEL samples as the stock LoraLoader's
    bar = [e["data"]["value"] for e in r.events if e.get("type") == "progress" and e["data"].get("node") == trainer]
    assert bar and bar[-1] == STEPS and bar == sorted(bar)
    assert [s for d in r.of_type("supercond.loss") if d["node"] == trainer for s in d["steps"]] == list(
        range(1, STEPS + 1))
    assert r.outputs[trainer]["images"]  # the loss plot, shown in the node
    shown = [m for node, m in r.previews if node == trainer]  # rank 0's samples at steps 2 and 3, live
    assert len(shown) == 2 and all(m[8:12] == b"\x89PNG" for m in shown)
    assert (folder / f"two_{tag}_000002_sample_00.png").is_file()
    stock = {k: v for k, v in two.items() if v["class_type"] not in ("SupercondTrainLoRA", "PreviewImage",
                                                                      "SupercondLoadDataset")}
    ck = find(stock, "CheckpointLoaderSimple")
    stock["900"] = {"class_type": "LoraLoader", "inputs": {"model": [ck, 0], "clip": [ck, 1], "strength_model": 1.0,
                                                           "lora_name": f"supercond_test/two_{tag}_{STEPS:06d}"
                                                                        ".safetensors", "strength_clip": 0.0}}
    stock[find(stock, "KSampler")]["inputs"]["model"] = ["900", 0]
    r2 = client.run(stock)
    assert r2.status == "success", _said(r2.error)
    assert np.array_equal(saved_image(client, r, two), saved_image(client, r2, stock))


def test_a_run_resumes_on_another_number_of_processes(server, base_prompt, tmp_path, straight):
    """Step 1 on 2 processes with the base sharded (--shard-base, a sample preview rendered by both), resumed
    on 1 to step 2 (2 -> 1), resumed on 2 to step 3 (1 -> 2): each step's LoRA file, and the last state, equal
    the straight one-process run's; each sharded rank held half the base's weights."""
    folder = server.loras_dir / "supercond_test"
    stem = f"resumed_{uuid.uuid4().hex[:6]}"
    for processes, steps, options in ((2, 1, ("--shard-base",)), (1, 2, ()), (2, STEPS, ())):
        p = set_inputs(base_prompt, "SupercondTrainLoRA", filename_prefix=f"supercond_test/{stem}", steps=steps,
                       batch_size=2 // processes, resume=steps > 1, sample_every=1 if options else 0,
                       gradient_checkpointing=bool(options))
        r = train(server, tmp_path, p, "--processes", str(processes), *options)
        assert r.returncode == 0, r.stderr[-3000:]
        if options:
            held, whole = (float(x) for x in re.search(r"this rank holds ([\d.]+) of its ([\d.]+) MiB",
                                                       r.stderr).groups())
            assert whole > 1 and 0.45 < held / whole < 0.55, (held, whole)
            assert (folder / f"{stem}_000001_sample_00.png").is_file()
    for step in range(1, STEPS + 1):
        got, want = weights(folder, stem, step), weights(folder, straight, step)
        for k, v in got.items():
            torch.testing.assert_close(v.float(), want[k].float(), atol=ATOL, rtol=1e-3)
    assert_close(state_params(folder, stem, STEPS), state_params(folder, straight, STEPS))


def test_the_workflow_is_checked_before_anything_runs(server, base_prompt, tmp_path):
    """--dry-run prints the API prompt of a UI-format workflow as the editor would queue it; a bad value, a
    workflow without a trainer and --shard-base on one process are refused with a sentence, before any
    training."""
    from supercond.tools.server import ComfyClient

    wf = workflows.load(workflows.WORKFLOW_DIR / "lora_train.json")
    path = tmp_path / "ui.json"
    path.write_text(json.dumps(wf))

    def dry_run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(PACK_DIR / "scripts" / "train"), str(path), "--dry-run", "--",
                               *comfy_options(server), *extra], capture_output=True, text=True, timeout=300)

    r = dry_run()  # the example names SD1.5's usual file, which this machine does not have
    assert r.returncode == 2 and "CheckpointLoaderSimple" in r.stderr and "v1-5-pruned-emaonly-fp16" in r.stderr
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "v1-5-pruned-emaonly-fp16.safetensors").symlink_to(server.models_dir / "checkpoints" /
                                                                          "supercond_sd15_tiny.safetensors")
    (tmp_path / "more.yaml").write_text(f"more:\n    base_path: {tmp_path}\n    checkpoints: ckpt\n")
    r = dry_run("--extra-model-paths-config", str(tmp_path / "more.yaml"))
    assert r.returncode == 0, r.stderr[-3000:]
    printed = json.loads(r.stdout.strip().splitlines()[-1])
    assert printed["prompt"] == workflows.to_api(wf, ComfyClient(server.url).object_info())
    assert printed["prompt"][printed["node"]]["class_type"] == "SupercondTrainLoRA"

    bad = set_inputs(base_prompt, "SupercondTrainLoRA", cep_gamma=-1.0)
    r = train(server, tmp_path, bad)
    assert r.returncode != 0 and "cep_gamma is -1.0: it must be between 0.0 and 100.0" in r.stderr
    none = {k: v for k, v in base_prompt.items() if v["class_type"] != "SupercondTrainLoRA"}
    r = train(server, tmp_path, none)
    assert r.returncode == 2 and "the workflow has no trainer nodes" in r.stderr
    r = train(server, tmp_path, base_prompt, "--shard-base")  # one process: nothing to shard across
    assert r.returncode == 2 and "use it with --processes 2 or more" in r.stderr


def test_a_killed_rank_stops_the_others_and_the_last_checkpoint_loads(server, base_prompt, tmp_path):
    """SIGKILL to rank 1 mid-run (the base sharded, a validation loss every step, which both ranks compute):
    torchrun stops rank 0 within seconds and its report names rank 1; the newest checkpoint (written by rank 0
    through a temporary file) loads, and no temporary file remains."""
    import signal
    import time

    folder = server.loras_dir / "supercond_test"
    stem = f"kill_{uuid.uuid4().hex[:6]}"
    p = set_inputs(base_prompt, "SupercondTrainLoRA", filename_prefix=f"supercond_test/{stem}", steps=100_000,
                   batch_size=1, validation_split=0.25, validate_every=1)
    path = tmp_path / "kill.json"
    path.write_text(json.dumps(p))
    proc = subprocess.Popen([str(PACK_DIR / "scripts" / "train"), str(path), "--processes", "2", "--shard-base", "--",
                             *comfy_options(server)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while len(list(folder.glob(stem + "_*.safetensors"))) < 3 and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        rank1 = next(pid for pid in (int(d) for d in os.listdir("/proc") if d.isdigit()) if pid != proc.pid and _rank_of(pid) == "1")
        os.kill(rank1, signal.SIGKILL)
        killed = time.monotonic()
        _, err = proc.communicate(timeout=60)
        stopped = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0 and stopped < 30, stopped
    assert "rank      : 1" in err and "SIGKILL" in err and "set resume on to continue" in err
    assert "base sharded over 2 processes" in err and "step 2 validation loss" in err
    newest = sorted(folder.glob(stem + "_*.safetensors"))[-1]
    assert any(k.endswith("lora_up.weight") for k in load_file(str(newest)))
    states = sorted(folder.glob(stem + "_*.state.pt"))
    assert states and torch.load(states[-1], weights_only=True)["step"] >= 3
    assert not list(folder.glob(".tmp_*"))


def _rank_of(pid: int) -> str | None:
    """RANK in the environment of a scripts/train rank process, else None."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        if b"train_cli.py\0--rank" not in cmd or b"torch.distributed.run" in cmd:
            return None
        env = dict(v.split(b"=", 1) for v in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in v)
    except OSError:
        return None
    return env.get(b"RANK", b"").decode() or None


def _said(error) -> str:
    return error.get("exception_message", error) if isinstance(error, dict) else error


def _ranks_alive() -> list[int]:
    return [pid for pid in (int(d) for d in os.listdir("/proc") if d.isdigit()) if _rank_of(pid) is not None]


def test_cancel_stops_every_rank_and_keeps_the_last_checkpoint(server, base_prompt):
    """/interrupt while the node trains on two processes: the prompt ends interrupted within seconds, no rank
    is left running, no temporary file is left, and the newest checkpoint loads."""
    import threading
    import time

    from supercond.tools.server import ComfyClient

    client = ComfyClient(server.url)
    folder = server.loras_dir / "supercond_test"
    stem = f"cancel2_{uuid.uuid4().hex[:6]}"
    prompt = set_inputs(base_prompt, "SupercondTrainLoRA", filename_prefix=f"supercond_test/{stem}", batch_size=1,
                        processes=2, steps=100_000)
    box: dict = {}
    t = threading.Thread(target=lambda: box.setdefault("r", client.run(prompt, timeout=600)))
    t.start()
    deadline = time.monotonic() + 300
    while len(list(folder.glob(stem + "_*.safetensors"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _ranks_alive(), "the ranks should be training now"
    sent = time.monotonic()
    client.interrupt()
    t.join(timeout=120)
    assert box["r"].status == "interrupted", box["r"].error
    stopped = next(at for e, at in zip(box["r"].events, box["r"].arrived, strict=True)
                   if e["type"] == "execution_interrupted")
    assert stopped - sent < 30
    assert not _ranks_alive()
    assert not list(folder.glob(".tmp_*"))
    newest = sorted(folder.glob(stem + "_*.safetensors"))[-1]
    assert any(k.endswith("lora_up.weight") for k in load_file(str(newest)))


def test_the_head_trainer_on_two_processes_equals_one_with_twice_the_batch(server, tmp_path):
    """SupercondTrainHead (distill, a trajectory pool of 2 chains, last_block head with a LoRA) with processes 2
    (a chain each) through the server, against the node in the server (both chains): the saved heads and their losses agree
    within the LoRA test's tolerance, and the node shows progress and returns the saved head. scripts/train on 2
    processes with the base sharded trains the same head as the node on 2 processes, bit for bit."""
    from supercond.tools.server import ComfyClient

    client = ComfyClient(server.url)
    wf = workflows.load(workflows.WORKFLOW_DIR / "singlepass_distill.json")
    base = workflows.shrink(workflows.retarget(workflows.to_api(wf, client.object_info())), size=64, max_steps=4)
    base["901"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}}
    # an empty LATENT sets the trajectories' size and number (the whole run's, whatever the processes)
    base = set_inputs(base, "SupercondTrainHead", steps=STEPS, save_every=1, learning_rate=LR, latent=["901", 0])
    trainer = find(base, "SupercondTrainHead")
    tag = uuid.uuid4().hex[:6]
    runs = {}
    for name, processes in (("one", 1), ("two", 2)):
        p = set_inputs(base, "SupercondTrainHead", filename_prefix=f"supercond_test/head{name}_{tag}",
                       processes=processes)
        r = client.run(p)
        assert r.status == "success", _said(r.error)
        runs[name] = r
    assert not _ranks_alive()
    bar = [e["data"]["value"] for e in runs["two"].events
           if e.get("type") == "progress" and e["data"].get("node") == trainer]
    assert bar and bar[-1] == STEPS
    folder = server.heads_dir / "supercond_test"
    states = [torch.load(folder / f"head{n}_{tag}_{STEPS:06d}.state.pt", weights_only=True) for n in ("one", "two")]
    torch.testing.assert_close(torch.tensor(states[1]["losses"]), torch.tensor(states[0]["losses"]), atol=1e-5,
                               rtol=1e-4)
    start = load_file(str(folder / f"headone_{tag}_000001.safetensors"))
    heads = [load_file(str(folder / f"head{n}_{tag}_{STEPS:06d}.safetensors")) for n in ("one", "two")]
    assert max(float((heads[0][k] - start[k]).abs().max()) for k in start) > 1e-4  # it trained
    # The LoRA's bounds, 4x (per element) and 3x (on the norm) looser: here the teacher runs on one chain per
    # process instead of two in one call, a float difference that AdamW's near-zero gradients amplify as in
    # ATOL's note (measured: one of 10,240 elements 0.13 LR x STEPS apart, 1.2e-3 on the norm). The exact
    # split, pool and gradient averaging are tested without rounding noise in test_core_head_train.
    for k, v in heads[1].items():
        torch.testing.assert_close(v, heads[0][k], atol=4 * ATOL, rtol=1e-3)
    assert_close(states[1]["params"], states[0]["params"], atol=4 * ATOL, relative=3 * RELATIVE)
    assert runs["two"].outputs[trainer]["images"]  # the loss plot

    r = train(server, tmp_path, set_inputs(base, "SupercondTrainHead", filename_prefix=f"supercond_test/headshard_{tag}"),
              "--processes", "2", "--shard-base")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "base sharded over 2 processes" in r.stderr
    sharded = torch.load(folder / f"headshard_{tag}_{STEPS:06d}.state.pt", weights_only=True)
    assert sharded["losses"] == states[1]["losses"]
    assert all(torch.equal(a, b) for a, b in zip(sharded["params"], states[1]["params"], strict=True))
