"""Use the real ComfyUI inside this Python process (tests and benchmarks)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .paths import PACK_DIR, cache_dir


def setup_comfy_imports(root: Path) -> None:
    """Make ComfyUI importable the way main.py does it."""
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import comfy.cli_args

    if not _has_cuda():
        comfy.cli_args.args.cpu = True  # before model_management probes for CUDA
    # main.py imports these first; without it comfy/utils.py shadows the utils package.
    import utils.extra_config  # noqa: F401
    import utils.install_util  # noqa: F401
    import utils.json_util  # noqa: F401


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


class FixtureError(RuntimeError):
    """Generating the fixture checkpoints failed; the message ends with the generator's log."""


def ensure_fixtures(comfyui: Path, python: str = sys.executable) -> Path:
    """Generate (or reuse) the fixture checkpoints in a subprocess; returns the models directory."""
    out = cache_dir() / "models"
    proc = subprocess.run([python, str(PACK_DIR / "tools" / "fixtures.py"), "--comfyui", str(comfyui),
                           "--out", str(out)], capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise FixtureError(f"generating fixture models failed:\n{proc.stderr[-4000:]}")
    return out
