"""The ComfyUI frontends the browser tier runs against: the one bundled with this ComfyUI, and the newest
``comfyui-frontend-package`` on PyPI (pinned here; installed into the cache, outside the venv, and served
with ComfyUI's ``--front-end-root``)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .paths import cache_dir

NEWEST = "1.58.1"  # the newest comfyui-frontend-package on PyPI when checked (2026-12-07)


def newest_static(version: str = NEWEST, python: str = sys.executable) -> Path:
    """The built frontend of ``version`` (its ``static`` folder), installed once into the cache."""
    target = cache_dir() / "frontends" / version
    static = target / "comfyui_frontend_package" / "static"
    if not (static / "index.html").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, ignore_cleanup_errors=True) as tmp:  # never half-done
            subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--target", tmp,
                            f"comfyui-frontend-package=={version}"], check=True, timeout=600)
            shutil.rmtree(target, ignore_errors=True)
            Path(tmp).rename(target)
    return static
