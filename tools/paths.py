"""Where things are: the pack, ComfyUI, the venv, the cache of generated models."""

from __future__ import annotations

import os
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent.parent


def find_comfyui() -> Path | None:
    """COMFYUI_PATH, else the ComfyUI this pack sits in (custom_nodes/<pack>), else ~/comfy/ComfyUI."""
    env = os.environ.get("COMFYUI_PATH")
    candidates = [Path(env).expanduser()] if env else []
    if PACK_DIR.parent.name == "custom_nodes":
        candidates.append(PACK_DIR.parent.parent)
    candidates.append(Path.home() / "comfy" / "ComfyUI")
    for c in candidates:
        if (c / "main.py").is_file() and (c / "comfy").is_dir():
            return c.resolve()
    return None


def cache_dir() -> Path:
    """Generated fixture models live here, outside the repository, reused between runs."""
    base = os.environ.get("SUPERCOND_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache")), "supercond"
    )
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def chromium_path() -> str | None:
    for p in (os.environ.get("SUPERCOND_CHROMIUM"), "/usr/bin/chromium", "/usr/bin/chromium-browser"):
        if p and Path(p).is_file():
            return p
    return None
