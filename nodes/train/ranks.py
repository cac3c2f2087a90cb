"""A trainer node with ``processes`` above 1: it starts scripts/train (tools/train_cli.py) on the prompt
being run, as one subprocess that torchrun splits into ranks, relays rank 0's progress and losses to this
node's progress bar and live chart, stops every rank on Cancel (the newest checkpoint on disk is kept:
each file is written through a temporary file), and returns what rank 0's trainer reported.

The ranks import ComfyUI headless with this server's command-line options and its folders as they are
now (extra model paths included), so they load the same files; they never run main.py or other packs."""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import uuid
from collections import deque
from pathlib import Path

from comfy_api.v0_0_2 import io

from ...core.files import sweep_stale_temps
from ..errors import InputError
from ..events import LOSS_EVENT, SAMPLES_EVENT, TRAINED_EVENT, relay
from .previews import grid

log = logging.getLogger("supercond")
IN_RANK = "SUPERCOND_TRAIN_RANK"  # set by tools/train_cli.py in every rank: the trainer there runs in-process
EVENT_LINE = "@supercond-event "  # how a rank's event lines start (tools/train_cli.py writes them)
CLI = Path(__file__).resolve().parents[2] / "tools" / "train_cli.py"


def in_rank() -> bool:
    """Whether this process is a rank of scripts/train (where ``processes`` is already taken care of)."""
    return os.environ.get(IN_RANK) == "1"


def folder_map() -> dict:
    """This server's folders as folder_paths holds them now, for the ranks to use as they are."""
    import folder_paths

    return {"folders": {name: [list(paths), sorted(exts)]
                        for name, (paths, exts) in folder_paths.folder_names_and_paths.items()},
            "output": folder_paths.get_output_directory(), "input": folder_paths.get_input_directory(),
            "temp": folder_paths.get_temp_directory(), "user": folder_paths.get_user_directory()}


def server_options() -> list[str]:
    """The options this ComfyUI was started with (precision, device and folder flags), for the ranks."""
    return sys.argv[1:] if Path(sys.argv[0]).name == "main.py" else []


def run(prompt: dict, node_id: str, processes: int, node: str, writes_to: Path) -> dict:
    """Train node ``node_id`` of ``prompt`` on ``processes`` ranks; returns rank 0's TRAINED_EVENT data
    (path, losses, val_losses). Cancel (ComfyUI's interrupt) stops the ranks and is raised here; the
    temporary files of a save it cut short are then removed from ``writes_to``."""
    import comfy.model_management as mm
    import folder_paths

    work = Path(folder_paths.get_temp_directory()) / f"supercond_train_{uuid.uuid4().hex[:12]}"
    work.mkdir(parents=True)
    try:
        (work / "prompt.json").write_text(json.dumps(prompt))
        (work / "folders.json").write_text(json.dumps(folder_map()))
        cmd = [sys.executable, str(CLI), str(work / "prompt.json"), "--processes", str(processes),
               "--node", str(node_id), "--events", "--folders", str(work / "folders.json"), "--",
               *server_options()]
        env = {**os.environ, "COMFYUI_PATH": str(Path(folder_paths.__file__).resolve().parent),
               "PYTHONUNBUFFERED": "1"}
        log.info("supercond: %s: training on %d processes: %s", node, processes, " ".join(cmd))
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                text=True, errors="replace", env=env, start_new_session=True)
        try:
            result, tail = _follow(proc, node_id, mm)
        finally:
            if proc.poll() is None:
                _stop(proc)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        sweep_stale_temps(writes_to)
    if proc.returncode != 0 or result is None:
        said = [line for line in tail if "scripts/train:" in line or "Error" in line]
        raise InputError(f"{node}: training on {processes} processes failed (exit code {proc.returncode}): "
                         + ("; ".join(said[-3:]) if said else "\n".join(list(tail)[-8:])))
    return result


def _follow(proc: subprocess.Popen, node_id: str, mm) -> tuple[dict | None, deque]:
    """Read the ranks' output until they exit: events go to the progress bar and chart, log lines to this
    server's log (the last ones kept for an error message)."""
    import comfy.utils

    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: ([lines.put(x) for x in proc.stdout], lines.put(None)), daemon=True).start()
    tail: deque = deque(maxlen=40)
    pbar, result = None, None
    while True:
        if mm.processing_interrupted():
            _stop(proc)
            mm.throw_exception_if_processing_interrupted()
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            continue
        if line is None:
            proc.wait()
            return result, tail
        if not line.startswith(EVENT_LINE):
            tail.append(line.rstrip())
            log.info("supercond ranks: %s", line.rstrip())
            continue
        message = json.loads(line[len(EVENT_LINE):])
        event, data = message["event"], message["data"]
        if event == TRAINED_EVENT:
            result = data
        elif event == LOSS_EVENT and data.get("steps"):
            pbar = pbar or comfy.utils.ProgressBar(data["total"], node_id=node_id)
            relay(event, data, node_id)
            pbar.update_absolute(data["steps"][-1])  # Cancel may be raised here too (the server's hook)
        elif event == SAMPLES_EVENT:  # rank 0's sample previews, shown in the node as in-process
            pbar = pbar or comfy.utils.ProgressBar(data["total"], node_id=node_id)
            pbar.update_absolute(data["step"], preview=("PNG", grid([Path(f) for f in data["files"]]), 1024))
        else:
            relay(event, data, node_id)


def _stop(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM to the launcher (torchrun passes it on to every rank), SIGKILL to whatever is left after
    ``grace`` seconds. Ranks run in sessions of their own, so they are found before the launcher goes."""
    import psutil

    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    _, alive = psutil.wait_procs(family, timeout=grace)
    for p in alive:
        p.kill()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log.info("supercond: the training processes were stopped")


def processes_input() -> io.Int.Input:
    """The trainers' last input (SupercondTrainLoRA, SupercondTrainHead)."""
    return io.Int.Input("processes", default=1, min=1, max=64, optional=True,
                        tooltip="1: train here, in the server. More: start scripts/train on this prompt with that "
                                "many processes (torchrun: one per GPU, or CPU processes with gloo) and follow it "
                                "here (progress, chart, Cancel). batch_size is then per process. The nodes "
                                "before the trainer run again in each process; they must be ComfyUI's or "
                                "Supercond's.")
