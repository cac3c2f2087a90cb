"""The one module that talks to ComfyUI's server: progress text and custom events.

``server`` is imported inside the functions so node modules import without a running server
(tests, scripts); without one every call is a no-op.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("supercond")

LOSS_EVENT = "supercond.loss"


def _server():
    try:
        from server import PromptServer
    except ImportError:
        return None
    return getattr(PromptServer, "instance", None)


def progress_text(text: str, node_id: str | None) -> None:
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
        srv = _server()
        if srv is not None and self.node_id is not None:
            srv.send_sync(LOSS_EVENT, {"node": self.node_id, "steps": self._steps, "losses": self._losses,
                                       "total": self.total, "reset": reset}, srv.client_id)
        self._steps, self._losses = [], []
