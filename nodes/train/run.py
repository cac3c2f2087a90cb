"""What every in-graph trainer does around its optimizer steps: ComfyUI's progress bar, Cancel, the
live loss chart, periodic and final atomic checkpoints, NaN handling; and where its files may go.
Shared by SupercondTrainLoRA and SupercondTrainHead so both behave the same."""

from __future__ import annotations

import glob
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch

from ...core.files import sweep_stale_temps
from ...core.train import NaNLoss, TrainError
from ..errors import InputError
from ..events import LossEvents, progress_text

log = logging.getLogger("supercond")
Saved = TypeVar("Saved", bound=tuple)  # (path of the saved file, anything else the caller wants back)


def prefix_path(root: str | Path, prefix: str, folder: str) -> Path:
    """The file stem for ``prefix`` under the model folder ``root`` (named ``folder`` in messages);
    a prefix that would leave that folder is refused."""
    root = Path(root).resolve()
    if not prefix or prefix.strip() != prefix or Path(prefix).is_absolute():
        raise InputError(f"filename_prefix {prefix!r} must be a relative path like 'supercond/my_file'")
    stem = (root / prefix).resolve()
    if os.path.commonpath([root, stem]) != str(root) or stem == root:
        raise InputError(f"filename_prefix {prefix!r} would write outside the {folder} folder {root}")
    return stem


def check_writable(folder: Path, what: str) -> None:
    """Refuse an unwritable folder before any work; sweep the temporary files a killed run left there."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".supercond_write_test_{os.getpid()}"  # own name: ranks of one run probe at once
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise InputError(f"cannot write {what} to {folder}: {e}") from e
    from .distributed import writes

    if writes():  # other ranks may run on other machines: process ids there say nothing about rank 0's
        sweep_stale_temps(folder)


_CHECKPOINT = re.compile(r"^(?P<stem>.+)_(?P<step>\d{6})(?:_ema)?\.safetensors$")  # a checkpoint or its EMA


def drop_older_states(saved: Path) -> None:
    """Delete the optimizer states of earlier checkpoints of the same prefix: resume only needs the
    newest, and at ~1 MB per rank per save they pile up. The checkpoints themselves are kept."""
    m = _CHECKPOINT.match(saved.name)
    if m is None:
        return
    for p in saved.parent.glob(f"{glob.escape(m['stem'])}_*.state.pt"):
        step = p.name[len(m["stem"]) + 1:-len(".state.pt")]
        if step.isdigit() and len(step) == 6 and int(step) < int(m["step"]):
            p.unlink(missing_ok=True)


def keep_newest(saved: Path, keep_last: int) -> list[Path]:
    """``keep_last`` > 0: delete the checkpoints of this prefix older than the newest ``keep_last``, with
    their EMA files and optimizer states (sample images stay). Returns what was deleted."""
    m = _CHECKPOINT.match(saved.name)
    if keep_last <= 0 or m is None:
        return []
    steps: dict[int, list[Path]] = {}
    for p in saved.parent.glob(f"{glob.escape(m['stem'])}_*"):
        found = re.fullmatch(re.escape(m["stem"]) + r"_(\d{6})(?:_ema\.safetensors|\.safetensors|\.state\.pt)", p.name)
        if found:
            steps.setdefault(int(found[1]), []).append(p)
    gone = []
    for s in sorted(steps)[:-keep_last]:
        for p in steps[s]:
            p.unlink(missing_ok=True)
            gone.append(p)
    return gone


def _tidy(saved: Path, keep_last: int, writer: bool = True) -> None:
    if not writer:
        return
    drop_older_states(saved)
    for p in keep_newest(saved, keep_last):
        log.info("supercond: keep_last %d: removed %s", keep_last, p.name)


def run_steps(step: Callable[[], float], done: Callable[[], int], total: int, save: Callable[[], Saved],
              save_every: int, node_id: str | None, last: Saved | None = None, what: str = "training",
              after_step: Callable[[int], Any] | None = None, keep_last: int = 0, writer: bool = True) -> Saved:
    """Call ``step`` (one optimizer step, returns its loss) until ``done()`` reaches ``total``, then save.

    - ComfyUI's progress bar and a throttled ``supercond.loss`` chart event after every step.
    - Cancel: ComfyUI raises InterruptProcessingException from the progress-bar update (or from a
      check inside ``step``); the weights after the last completed step are saved, then it re-raises.
    - NaN loss (``NaNLoss`` from ``step``, raised before the bad update): nothing more is saved; a
      TrainError names the last good checkpoint.
    - ``after_step(n)`` (sample previews, validation) may return an image, shown live in the node.
    - ``keep_last``: older checkpoints are pruned after each save (keep_newest).
    - ``writer`` False (ranks after the first of a data-parallel run): ``save`` writes nothing and nothing
      is pruned or reported here.
    Returns what the last ``save()`` returned.
    """
    import comfy.model_management as mm
    import comfy.utils

    device = mm.get_torch_device()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    node_id = node_id if writer else None  # one progress bar and chart: rank 0's
    pbar = comfy.utils.ProgressBar(total, node_id=node_id)
    pbar.update_absolute(done())
    events = LossEvents(node_id, total)
    stamps: list[float] = []  # when each step of this run ended
    try:
        while done() < total:
            loss = step()
            stamps.append(time.perf_counter())
            n = done()
            events.add(n, loss, reset=n == 1)
            if save_every and n % save_every == 0 and n < total:
                last = save()
                _tidy(Path(last[0]), keep_last, writer)
            preview = after_step(n) if after_step is not None else None
            pbar.update_absolute(n, preview=("PNG", preview, 1024) if preview is not None else None)  # Cancel
            if n % 10 == 0:
                progress_text(f"step {n}/{total}  loss {loss:.4f}", node_id)
        last = save()
        _tidy(Path(last[0]), keep_last, writer)
    except NaNLoss as e:
        kept = f"; the last good checkpoint is {last[0]}" if last else "; no checkpoint was saved"
        raise TrainError(f"{e}: {what} stopped{kept}. Lower learning_rate or check the inputs.") from e
    except mm.InterruptProcessingException:
        saved: Any = save()
        _tidy(Path(saved[0]), keep_last, writer)
        log.info("supercond: %s cancelled at step %d; saved %s", what, done(), saved[0])
        raise
    finally:
        events.flush()
        if len(stamps) > 1:  # the first step warms up allocators and thread pools: timed apart
            log.info("supercond: %s: %d steps, %.4f s a step after the first", what, len(stamps),
                     (stamps[-1] - stamps[0]) / (len(stamps) - 1))
        log.info("supercond: %s peak memory: %s", what, peak_memory(device))
    return last


@contextmanager
def memory_guard(what: str, lower: str) -> Iterator[None]:
    """Out of memory becomes an error that names what to lower, and the server stays up.

    On the CPU an allocation past the machine's memory gets the whole server killed by the kernel's OOM
    killer (no exception to catch; the stress fuzzer's batch_size 3543 did that). While inside, the
    process's address space is capped at what it maps now plus 90 % of the memory available, so such an
    allocation fails here instead; the cap is put back on the way out. On a GPU, CUDA's own OOM error is
    translated the same way."""
    import resource

    import comfy.model_management as mm
    import psutil

    saved = None
    if mm.get_torch_device().type == "cpu" and hasattr(resource, "RLIMIT_AS"):
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = psutil.Process().memory_info().vms + int(0.9 * psutil.virtual_memory().available)
        cap = cap if hard == resource.RLIM_INFINITY else min(cap, hard)
        if soft == resource.RLIM_INFINITY or cap < soft:
            resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
            saved = (soft, hard)
    try:
        yield
    except (MemoryError, RuntimeError) as e:
        text = str(e)
        if not (isinstance(e, MemoryError) or "can't allocate memory" in text or "out of memory" in text.lower()):
            raise
        raise InputError(f"{what} ran out of memory ({text.splitlines()[0][:160] if text else 'MemoryError'}): "
                         f"{lower}") from None
    finally:
        if saved is not None:
            resource.setrlimit(resource.RLIMIT_AS, saved)


def peak_memory(device) -> str:
    """The run's peak: CUDA's allocator peak on a GPU, else the process's peak resident memory."""
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB allocated on {device}"
    import resource

    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB resident (whole process, CPU)"
