"""The one module that talks to ComfyUI's server: progress text and custom events.

``server`` is imported inside the functions so node modules import without a running server
(tests, scripts); without one the calls reach only the listeners (``listen``: scripts/train's progress).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger("supercond")

LOSS_EVENT = "supercond.loss"
PROGRESS_TEXT = "supercond.progress_text"
TRAINED_EVENT = "supercond.trained"  # a trainer's result, for scripts/train's caller only (never the frontend)
SAMPLES_EVENT = "supercond.samples"  # sample previews a rank saved, for scripts/train's caller only
_listeners: list[Callable[[str, dict], None]] = []


def listen(listener: Callable[[str, dict], None]) -> None:
    """Also hand every event, as (name, data), to ``listener`` (a run without the server shows them)."""
    _listeners.append(listener)


def unlisten(listener: Callable[[str, dict], None]) -> None:
    _listeners.remove(listener)


def _tell(event: str, data: dict) -> None:
    for listener in _listeners:
        listener(event, data)


def _server():
    try:
        from server import PromptServer
    except ImportError:
        return None
    return getattr(PromptServer, "instance", None)


def trained(data: dict) -> None:
    """A trainer finished: its file and losses, handed to the listeners only (the node that started
    scripts/train reads them from the rank's output)."""
    _tell(TRAINED_EVENT, data)


def samples(step: int, total: int, files: list) -> None:
    """A trainer saved sample previews at ``step`` of ``total``: handed to the listeners only (the node
    that started scripts/train shows them)."""
    _tell(SAMPLES_EVENT, {"step": step, "total": total, "files": [str(f) for f in files]})


def relay(event: str, data: dict, node_id: str | None) -> None:
    """Send an event that a training subprocess reported as if this process had raised it, for ``node_id``."""
    if event == PROGRESS_TEXT:
        progress_text(data.get("text", ""), node_id)
        return
    srv = _server()
    if event == LOSS_EVENT and srv is not None and node_id is not None:
        srv.send_sync(LOSS_EVENT, {**data, "node": node_id}, srv.client_id)


def progress_text(text: str, node_id: str | None) -> None:
    _tell(PROGRESS_TEXT, {"node": node_id, "text": text})
    srv = _server()
    if srv is not None and node_id is not None:
        srv.send_progress_text(text, node_id)


class LossEvents:
    """Sends ``supercond.loss`` {node, steps, losses, total} at most every ``interval`` seconds
    (one websocket message per client per send), batching the points in between."""

    def __init__(self, node_id: str | None, total: int, interval: float = 0.25) -> None:
        self.node_id, self.total, self.interval = node_id, total, interval
        self._steps: list[int] = []
        self._losses: list[float] = []
        self._last = 0.0

    def add(self, step: int, loss: float, force: bool = False, reset: bool = False) -> None:
        self._steps.append(step)
        self._losses.append(loss)
        now = time.monotonic()
        if force or now - self._last >= self.interval:
            self._last = now
            self._send(reset)

    def flush(self) -> None:
        if self._steps:
            self._send(False)

    def _send(self, reset: bool) -> None:
        data = {"node": self.node_id, "steps": self._steps, "losses": self._losses, "total": self.total,
                "reset": reset}
        _tell(LOSS_EVENT, data)
        srv = _server()
        if srv is not None and self.node_id is not None:
            srv.send_sync(LOSS_EVENT, data, srv.client_id)
        self._steps, self._losses = [], []
