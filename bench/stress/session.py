"""One real ComfyUI server for a stress part: started fresh in its own folder with this pack and the
test stand-ins, driven through the API queue, with what every part checks: that an error is a
readable sentence, that a prompt ends (or stops when interrupted), that the server is up, and which
files appeared where."""

from __future__ import annotations

import copy
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

log = logging.getLogger("supercond.stress")

# Folders a prompt may write into (relative to the server's workdir): images, trained files, caches, and
# the bundled example datasets, which SupercondLoadDataset writes into the input folder on first use.
WRITABLE = ("output", "temp", "user", "loras", "supercond_heads", "supercond_schedules", "input/supercond_example",
            "input/supercond_example_buckets")
MARKER = "zzstress"  # in every hostile path-like string: a file with it anywhere is a finding

_BARE = re.compile(r"^\s*([\w.]*(Error|Exception)\b:?)?\s*['\"]?[\w.\-/]*['\"]?\s*$")


def readable(message: object) -> bool:
    """A sentence a user can act on: not empty, not a bare ``KeyError: 'x'`` or one word, no traceback."""
    if not isinstance(message, str):
        return False
    text = message.strip()
    return (len(text) >= 12 and " " in text and "Traceback (most recent call last)" not in text
            and not _BARE.match(text))


def rejection_messages(body: dict) -> list[str]:
    """Every message of a 400 from POST /prompt: the prompt's error and each node's."""
    out = []
    err = body.get("error")
    if isinstance(err, dict):
        out.append(" ".join(str(err.get(k, "")) for k in ("message", "details")).strip())
    for node in (body.get("node_errors") or {}).values():
        for e in node.get("errors", []):
            out.append(" ".join(str(e.get(k, "")) for k in ("message", "details")).strip())
    return out


@dataclass
class Outcome:
    status: str  # rejected | success | error | interrupted | stuck | crashed
    messages: list[str] = field(default_factory=list)
    node_type: str = ""
    seconds: float = 0.0
    outputs: dict = field(default_factory=dict)

    @property
    def unreadable(self) -> list[str]:
        return [m for m in self.messages if not readable(m)]


class Session:
    """A fresh server in ``workdir`` (kept, for a restart after SIGKILL) on the fixture models."""

    def __init__(self, workdir: Path, models: Path) -> None:
        from supercond.tools import paths
        from supercond.tools.server import ComfyClient, ComfyServer

        self.workdir = Path(workdir)
        self.models = models
        self.server = ComfyServer(paths.find_comfyui(), self.workdir, models_dir=models, standins=True)
        self.server.start()
        self.client = ComfyClient(self.server.url)
        self.info = self.client.object_info()
        self.crashes = 0
        self.refused_parts: dict[str, list[str]] = {}

    def stop(self) -> None:
        self.server.stop()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- prompts ---------------------------------------------------------------------------------
    def example(self, name: str, size: int = 64, max_steps: int = 2) -> dict:
        """An example workflow as an API prompt on the fixtures, small."""
        from supercond.tools import workflows

        wf = workflows.load(workflows.WORKFLOW_DIR / f"{name}.json")
        return workflows.shrink(workflows.retarget(workflows.to_api(wf, self.info)), size=size, max_steps=max_steps)

    def queue(self, prompt: dict) -> tuple[str | None, Outcome | None]:
        """(prompt id, None) when queued; (None, outcome) when refused (HTTP 400) or the server is down."""
        try:
            # json.dumps, not requests' json=: NaN and Infinity go out as the JSON numbers Python's parser accepts
            body = json.dumps({"prompt": prompt, "client_id": self.client.client_id})
            r = requests.post(self.server.url + "/prompt", data=body, headers={"Content-Type": "application/json"},
                              timeout=60)
        except requests.RequestException as e:
            return None, self._down(f"POST /prompt failed: {e}")
        if r.status_code == 400:
            try:
                body = r.json()
            except ValueError:
                return None, Outcome("rejected", [r.text[:300]])
            return None, Outcome("rejected", rejection_messages(body))
        if not r.ok:
            return None, Outcome("error", [f"HTTP {r.status_code}: {r.text[:300]}"])
        body = r.json()
        # Queued with some outputs refused (ComfyUI runs the valid ones): their messages count too.
        self.refused_parts[body["prompt_id"]] = rejection_messages({"node_errors": body.get("node_errors") or {}})
        return body["prompt_id"], None

    def wait(self, pid: str, deadline: float, grace: float = 120.0) -> Outcome:
        """Wait for a queued prompt; past ``deadline`` seconds, interrupt it and wait ``grace`` more."""
        start = time.monotonic()
        interrupted = False
        while True:
            entry = self._history(pid)
            if entry is None:
                return self._down("the server stopped answering")
            if entry:
                out = self._outcome(entry, time.monotonic() - start)
                out.messages += self.refused_parts.pop(pid, [])
                return out
            waited = time.monotonic() - start
            if not interrupted and waited > deadline:
                self.interrupt()
                interrupted = True
            if waited > deadline + grace:
                return Outcome("stuck", [f"still running {grace:.0f}s after an interrupt"], seconds=waited)
            time.sleep(0.05)

    def run(self, prompt: dict, deadline: float = 600.0) -> Outcome:
        pid, refused = self.queue(prompt)
        return refused if pid is None else self.wait(pid, deadline)

    def interrupt(self) -> None:
        try:
            requests.post(self.server.url + "/interrupt", json={}, timeout=10)
        except requests.RequestException:
            pass

    def pixels(self, outcome: Outcome) -> list[bytes]:
        """The decoded RGB pixels of every image output (saved or previewed) of a finished prompt, in node
        order; what "the same image" means (PNG bytes also hold the file's metadata)."""
        import io

        import numpy as np
        from PIL import Image

        out = []
        for _node, ui in sorted(outcome.outputs.items()):
            for img in ui.get("images", []):
                data = self.client.get("/view", filename=img["filename"], subfolder=img.get("subfolder", ""),
                                       type=img.get("type", "output")).content
                out.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).tobytes())
        return out

    def images_of(self, prompt: dict) -> list[bytes]:
        """Run a prompt; its pixels, or one entry saying why there are none."""
        out = self.run(prompt)
        return self.pixels(out) if out.status == "success" else [f"{out.status}: {out.messages}".encode()]

    def fingerprint(self, ckpt: str) -> dict:
        """The stand-in inspector's view of a checkpoint loader's MODEL (the object ComfyUI keeps)."""
        prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
                  "2": {"class_type": "SupercondStandInInspect", "inputs": {"model": ["1", 0]}}}
        out = self.run(prompt, deadline=120)
        if out.status != "success":
            raise RuntimeError(f"inspecting {ckpt} failed: {out.status} {out.messages}")
        return json.loads(out.outputs["2"]["text"][0])

    def alive(self) -> bool:
        if not self.server.alive():
            return False
        try:
            return requests.get(self.server.url + "/system_stats", timeout=10).ok
        except requests.RequestException:
            return False

    # -- files -----------------------------------------------------------------------------------
    def files(self) -> set[Path]:
        """Every file under the server's workdir, the models folder and ComfyUI's own tree."""
        from supercond.tools import paths

        found: set[Path] = set()
        for root in (self.workdir, self.models, paths.find_comfyui()):
            found |= {p for p in Path(root).rglob("*") if p.is_file() and "__pycache__" not in p.parts}
        return found

    def misplaced(self, before: set[Path], after: set[Path]) -> list[Path]:
        """New files outside the folders prompts may write to, and any file named with the marker."""
        allowed = tuple(self.workdir / d for d in WRITABLE)
        new = [p for p in after - before if not any(p.is_relative_to(a) for a in allowed)]
        marked = [p for p in after if MARKER in str(p)]
        # Hostile paths aim at /tmp, the home folder and the root too: look there (one level) for the marker.
        for root in (Path("/tmp"), Path.home(), Path("/")):
            marked += [p for p in root.iterdir() if MARKER in p.name and not p.is_relative_to(self.workdir)]
        return sorted(set(new) | set(marked))

    # -- internals -------------------------------------------------------------------------------
    def _history(self, pid: str) -> dict | None:
        try:
            r = requests.get(f"{self.server.url}/history/{pid}", timeout=30)
            return r.json().get(pid, {})
        except (requests.RequestException, ValueError):
            return None if not self.server.alive() else {}

    def _down(self, why: str) -> Outcome:
        if not self.server.alive():
            self.crashes += 1
            log.error("stress: the server died (%s); restarting it\n%s", why, self.server.log_tail())
            self.server.start()
        return Outcome("crashed", [why])

    @staticmethod
    def _outcome(entry: dict, seconds: float) -> Outcome:
        status = entry.get("status", {})
        messages = status.get("messages", [])
        for kind, data in messages:
            if kind == "execution_error":
                return Outcome("error", [data.get("exception_message", "")], data.get("node_type", ""), seconds)
            if kind == "execution_interrupted":
                return Outcome("interrupted", [], data.get("node_type", ""), seconds)
        return Outcome("success" if status.get("completed", True) else "error", [], "", seconds,
                       entry.get("outputs", {}))


def link_inputs(prompt: dict) -> list[tuple[str, str]]:
    return [(nid, k) for nid, n in prompt.items() for k, v in n["inputs"].items() if isinstance(v, list)]


def nodes_of(prompt: dict, class_type: str) -> list[str]:
    return [k for k, v in prompt.items() if v["class_type"] == class_type]


def with_inputs(prompt: dict, node: str, **values) -> dict:
    out = copy.deepcopy(prompt)
    out[node]["inputs"].update(values)
    return out
