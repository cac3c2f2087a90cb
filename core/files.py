"""Atomic file writes: every file the pack writes (LoRAs, heads, optimizer states, caches) goes
through a temporary file in the target folder and a rename, so a reader, a crash or a Cancel never
leaves half a file under the real name."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch


def save_atomic(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> Path:
    """Write a safetensors file through a temporary file in the same folder, then rename it into place."""
    from safetensors.torch import save_file

    return write_atomic(path, ".safetensors", lambda tmp: save_file(
        dict(tensors), tmp, metadata={k: str(v) for k, v in metadata.items()}))


def torch_save_atomic(path: str | Path, obj: object) -> Path:
    return write_atomic(path, ".pt", lambda tmp: torch.save(obj, tmp))


def write_atomic(path: str | Path, suffix: str, write: Callable[[str], object]) -> Path:
    """Write to a temporary file in the target folder, then rename: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the file should be readable as any other
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
