"""Start a real ComfyUI server with only this pack loaded, and talk to it over HTTP and /ws."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from .paths import PACK_DIR

log = logging.getLogger("supercond.tools.server")

# Model folders the test and example servers see under the generated-models directory.
STANDINS_DIR = PACK_DIR / "tests" / "comfy_packs" / "supercond_standins"
MODEL_FOLDERS = ("checkpoints", "loras", "vae", "clip", "text_encoders", "diffusion_models", "supercond_heads")


class PromptRejected(RuntimeError):
    """POST /prompt answered 400: the prompt failed validation."""

    def __init__(self, body: dict) -> None:
        self.body = body
        super().__init__(json.dumps(body)[:2000])


@dataclass
class RunResult:
    prompt_id: str
    status: str  # success | error | interrupted | timeout
    events: list[dict] = field(default_factory=list)
    arrived: list[float] = field(default_factory=list)  # time.monotonic() at which each event arrived
    history: dict = field(default_factory=dict)
    error: dict | None = None
    previews: list[tuple[str | None, bytes]] = field(default_factory=list)  # (node executing, binary message)

    @property
    def outputs(self) -> dict:
        return self.history.get("outputs", {})

    def of_type(self, kind: str) -> list[dict]:
        return [e["data"] for e in self.events if e.get("type") == kind]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pack_import_failed(log_text: str) -> bool:
    """ComfyUI only logs a failed pack import (the server keeps running), so read the log."""
    failed = f"(IMPORT FAILED): {PACK_DIR}" in log_text
    return failed or f"Error while calling comfy_entrypoint in {PACK_DIR}" in log_text


class ComfyServer:
    """``python main.py --cpu`` in a subprocess, the pack loaded through extra_model_paths."""

    def __init__(self, comfyui: Path, workdir: Path, models_dir: Path | None = None,
                 python: str = sys.executable, port: int | None = None, standins: bool = False,
                 front_end_root: Path | None = None) -> None:
        self.comfyui = Path(comfyui)
        self.front_end_root = front_end_root  # another frontend's static folder (tools/frontends.py)
        self.standins = standins  # also load the test-only stand-in text encoders (tests/comfy_packs)
        self.workdir = Path(workdir)
        self.models_dir = models_dir
        self.python = python
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.workdir / "comfyui.log"
        self.proc: subprocess.Popen | None = None

    @property
    def loras_dir(self) -> Path:
        """The first loras folder: where the trainer writes during tests (never ComfyUI's own)."""
        return self.workdir / "loras"

    @property
    def heads_dir(self) -> Path:
        """The first supercond_heads folder: where SupercondTrainHead writes during tests."""
        return self.workdir / "supercond_heads"

    @property
    def schedules_dir(self) -> Path:
        """The first supercond_schedules folder: where SupercondFitSchedule writes during tests."""
        return self.workdir / "supercond_schedules"

    def _write_paths_config(self) -> Path:
        lines = ["supercond_pack:", f"    custom_nodes: {PACK_DIR.parent}"]
        if self.standins:
            lines += ["supercond_standins:", f"    custom_nodes: {STANDINS_DIR.parent}"]
        if self.models_dir is not None:
            lines += ["supercond_models:", f"    base_path: {self.models_dir}"]
            lines += [f"    {name}: {name}" for name in MODEL_FOLDERS]
        # is_default puts this folder first in folder_paths' list, ahead of ComfyUI's models/loras, so
        # files written by the server (folder_paths.get_folder_paths("loras")[0]) stay in the workdir.
        lines += ["supercond_workdir:", f"    base_path: {self.workdir}", "    is_default: true",
                  f"    loras: {self.loras_dir.name}", f"    supercond_heads: {self.heads_dir.name}",
                  f"    supercond_schedules: {self.schedules_dir.name}"]
        cfg = self.workdir / "extra_model_paths.yaml"
        cfg.write_text("\n".join(lines) + "\n")
        return cfg

    def start(self, timeout: float = 180.0) -> ComfyServer:
        for sub in ("input", "output", "temp", "user", self.loras_dir.name, self.heads_dir.name,
                    self.schedules_dir.name):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        if self.models_dir is not None:
            for name in MODEL_FOLDERS:
                (Path(self.models_dir) / name).mkdir(parents=True, exist_ok=True)
        cmd = [
            self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--extra-model-paths-config", str(self._write_paths_config()),
            "--disable-all-custom-nodes", "--whitelist-custom-nodes", PACK_DIR.name,
            *([STANDINS_DIR.name] if self.standins else []),
            "--disable-api-nodes", "--database-url", "sqlite:///:memory:",
            "--input-directory", str(self.workdir / "input"),
            "--output-directory", str(self.workdir / "output"),
            "--temp-directory", str(self.workdir / "temp"),
            "--user-directory", str(self.workdir / "user"),
            *(["--front-end-root", str(self.front_end_root)] if self.front_end_root else []),
        ]
        log.info("starting ComfyUI: %s", " ".join(cmd))
        self._log_file = open(self.log_path, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(cmd, cwd=self.comfyui, stdout=self._log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(self.url + "/system_stats", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.5)
        else:
            self.stop()
            raise RuntimeError(f"ComfyUI did not answer within {timeout:.0f}s:\n{self.log_tail()}")
        if pack_import_failed(self.log_text()):
            self.stop()
            raise RuntimeError(f"the pack failed to import:\n{self.log_tail(80)}")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log_file", None):
            self._log_file.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def __enter__(self) -> ComfyServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class ComfyClient:
    """The API-queue side: POST /prompt, follow /ws until the prompt ends, read /history and /view."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.client_id = uuid.uuid4().hex

    def get(self, path: str, **params: Any) -> requests.Response:
        r = requests.get(self.url + path, params=params, timeout=30)
        r.raise_for_status()
        return r

    def object_info(self, node: str | None = None) -> dict:
        return self.get("/object_info" + (f"/{node}" if node else "")).json()

    def queue(self, prompt: dict) -> str:
        r = requests.post(self.url + "/prompt", json={"prompt": prompt, "client_id": self.client_id}, timeout=30)
        if r.status_code == 400:
            raise PromptRejected(r.json())
        r.raise_for_status()
        return r.json()["prompt_id"]

    def run(self, prompt: dict, timeout: float = 600.0) -> RunResult:
        """Queue a prompt and wait for it to finish; never raises for an execution error."""
        import websocket

        ws = websocket.create_connection(f"{self.url.replace('http', 'ws', 1)}/ws?clientId={self.client_id}",
                                         timeout=timeout)
        try:
            pid = self.queue(prompt)
            result = RunResult(prompt_id=pid, status="timeout")
            executing = None
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                ws.settimeout(max(deadline - time.monotonic(), 0.1))
                try:
                    raw = ws.recv()
                    got = time.monotonic()
                except websocket.WebSocketTimeoutException:
                    break
                if not isinstance(raw, str):  # a preview image (this client asks for no metadata)
                    result.previews.append((executing, bytes(raw)))
                    continue
                msg = json.loads(raw)
                data = msg.get("data", {})
                if data.get("prompt_id") not in (None, pid):
                    continue
                result.events.append(msg)
                result.arrived.append(got)
                kind = msg.get("type")
                if kind == "executing":
                    executing = data.get("node")
                if kind == "execution_error":
                    result.status, result.error = "error", data
                elif kind == "execution_interrupted":
                    result.status = "interrupted"
                elif kind == "executing" and data.get("node") is None and data.get("prompt_id") == pid:
                    if result.status == "timeout":
                        result.status = "success"
                    break
        finally:
            ws.close()
        result.history = self.history(pid)
        return result

    def history(self, prompt_id: str) -> dict:
        return self.get(f"/history/{prompt_id}").json().get(prompt_id, {})

    def images(self, result: RunResult) -> list[tuple[str, bytes]]:
        """(node id, PNG bytes) of every image in the prompt's UI outputs, in node order."""
        out = []
        for node_id, ui in sorted(result.outputs.items(), key=lambda kv: kv[0]):
            for img in ui.get("images", []):
                data = self.get("/view", filename=img["filename"], subfolder=img.get("subfolder", ""),
                                type=img.get("type", "output")).content
                out.append((node_id, data))
        return out

    def interrupt(self) -> None:
        requests.post(self.url + "/interrupt", json={}, timeout=10)

    def free(self) -> None:
        requests.post(self.url + "/free", json={"unload_models": True, "free_memory": True}, timeout=30)
