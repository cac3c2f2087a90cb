"""Atomic file writes: every file the pack writes (LoRAs, heads, optimizer states, caches) goes
through a temporary file in the target folder and a rename, so a reader, a crash or a Cancel never
leaves half a file under the real name. A failed write (a full disk) removes its temporary file and
says what was kept; temporary files of a process that was killed are swept by the next run."""

from __future__ import annotations

import errno
import logging
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

log = logging.getLogger("supercond.files")

_TEMP = re.compile(r"^\.tmp_(\d+)_")


class WriteError(OSError):
    """A file could not be written; the message says which, why, and that nothing was replaced."""


def save_atomic(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> Path:
    """Write a safetensors file through a temporary file in the same folder, then rename it into place."""
    from safetensors.torch import save_file

    return write_atomic(path, ".safetensors", lambda tmp: save_file(
        dict(tensors), tmp, metadata={k: str(v) for k, v in metadata.items()}))


def torch_save_atomic(path: str | Path, obj: object) -> Path:
    return write_atomic(path, ".pt", lambda tmp: torch.save(obj, tmp))


def write_atomic(path: str | Path, suffix: str, write: Callable[[str], object]) -> Path:
    """Write to a temporary file in the target folder, then rename: a reader never sees half a file.
    An OSError (disk full, no permission) becomes a WriteError naming the file; the temporary file is
    removed and a file already under that name is left as it was."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".tmp_{os.getpid()}_", suffix=suffix, dir=path.parent)
    except OSError as e:
        raise _write_error(path, e) from e
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the file should be readable as any other
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) or _is_os_error_text(e):
            raise _write_error(path, e) from e
        raise
    return path


def sweep_stale_temps(folder: str | Path) -> int:
    """Remove the temporary files that processes no longer running left in ``folder`` (a server killed
    while saving); files of live processes are kept. Returns how many were removed."""
    folder = Path(folder)
    removed = 0
    if not folder.is_dir():
        return 0
    for p in folder.iterdir():
        m = _TEMP.match(p.name)
        if m and p.is_file() and not _alive(int(m.group(1))):
            try:
                p.unlink()
                removed += 1
            except OSError as e:  # another sweeper got there first, or no permission: not ours to fail on
                log.debug("supercond: could not remove %s: %s", p, e)
    if removed:
        log.info("supercond: removed %d temporary file(s) a stopped run left in %s", removed, folder)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _is_os_error_text(e: BaseException) -> bool:
    """safetensors' and torch's writers raise their own types for an OS failure; their text says so."""
    return bool(_OS_CODE.search(str(e))) or _SHORT_WRITE in str(e)


_OS_CODE = re.compile(r"os error (\d+)")  # safetensors: "I/O error: No space left on device (os error 28)"
_SHORT_WRITE = "unexpected pos"  # torch.save's zip writer when a write stops short (a full disk)


def _write_error(path: Path, e: BaseException) -> WriteError:
    found = _OS_CODE.search(str(e))
    code = getattr(e, "errno", None) or (int(found.group(1)) if found else None)
    if code == errno.ENOSPC:
        why = "the disk is full"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "the folder is not writable"
    elif _SHORT_WRITE in str(e):
        why = "the write stopped short (is the disk full?)"
    else:
        why = str(e) or type(e).__name__
    kept = "the file already there was kept unchanged" if path.exists() else "nothing was written under that name"
    err = WriteError(f"could not write {path.name} in {path.parent}: {why}; {kept}. Free space (or pick a "
                     "writable folder) and run again")
    err.errno = code
    return err


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
