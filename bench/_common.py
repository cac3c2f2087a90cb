"""Shared bits of the benchmarks: importing the pack, the table header, where results go.

Run a benchmark as ``python bench/<name>.py`` from the repository root (or anywhere).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
log = logging.getLogger("supercond.bench")


def import_pack(name: str = "supercond"):
    """Register the repository root as package ``name`` (its folder name may be anything).

    The root itself must never go on sys.path: its ``nodes`` package would shadow ComfyUI's.
    """
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, REPO / "__init__.py", submodule_search_locations=[str(REPO)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def header(title: str) -> str:
    """First lines of every printed table: what, which commit, which machine."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=False,
        ).stdout.strip() or "uncommitted"
    except OSError:
        commit = "unknown"
    import torch

    machine = f"{platform.machine()} {os.cpu_count()} cpu, torch {torch.__version__}, threads {torch.get_num_threads()}"
    return f"# {title}\n# commit {commit} | {machine} | {platform.python_version()}"


def results_dir() -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    return RESULTS


def save_figure(fig, name: str, dpi: int = 100) -> Path:
    """Lay out, write ``bench/results/<name>`` and close a matplotlib figure; returns its path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = results_dir() / name
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)


class PeakRSS:
    """Peak resident memory above the starting level while the block runs, in MiB.

    ru_maxrss only ever grows, so after the model is loaded it says nothing about a variant's
    transient allocations; this samples the process RSS from a thread instead (on CUDA use
    torch.cuda.max_memory_allocated).
    """

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak_mb = 0.0

    def _reader(self):
        """A function giving the current level in bytes."""
        import psutil

        proc = psutil.Process()
        return lambda: proc.memory_info().rss

    def __enter__(self):
        import threading

        self._read = self._reader()
        self._base = self._peak = self._read()
        self._stop = threading.Event()

        def poll() -> None:
            while not self._stop.is_set():
                self._peak = max(self._peak, self._read())
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._read())
        self.peak_mb = (self._peak - self._base) / 2**20


class PeakHeap(PeakRSS):
    """Peak bytes the C allocator has handed out (glibc ``mallinfo2``: in-use heap plus mmapped blocks)
    above the starting level, in MiB, sampled from a thread. Unlike RSS it does not depend on what the
    allocator kept from earlier frees (after a model load, RSS growth mostly reuses freed pages)."""

    def _reader(self):
        import ctypes

        class Info(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                       "fsmblks", "uordblks", "fordblks", "keepcost")]

        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = Info

        def in_use() -> int:
            info = libc.mallinfo2()
            return info.uordblks + info.hblkhd

        return in_use
