"""What every fixture shares: ComfyUI set-up, seeded init, fp16 save, cache stamps, check helpers."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

SEED = 20240601
# Std of the noise given to weights that would otherwise be entirely zero.
ZERO_WEIGHT_STD = 0.02

log = logging.getLogger("supercond.fixtures")


class FixtureCheckError(RuntimeError):
    """A generated checkpoint does not behave as the tests need."""


# --------------------------------------------------------------------------- ComfyUI setup


def comfyui_version(comfyui: Path) -> str:
    """Read the version without importing ComfyUI (the cached path must stay cheap)."""
    text = (comfyui / "comfyui_version.py").read_text(encoding="utf-8")
    match = re.search(r"__version__\s*=\s*['\"]([^'\"]+)['\"]", text)
    if match is None:
        raise RuntimeError(f"no __version__ in {comfyui / 'comfyui_version.py'}")
    return match.group(1)


def setup_comfy(comfyui: Path) -> None:
    """Put ComfyUI first on sys.path and force CPU before comfy.model_management is imported."""
    path = str(comfyui)
    if path in sys.path:
        sys.path.remove(path)
    sys.path.insert(0, path)
    import comfy.cli_args  # argparse defaults only; imports nothing heavy

    if "comfy.model_management" in sys.modules:
        # Someone set ComfyUI up already (e.g. a test session): keep its device choice.
        # Generation builds everything on the CPU explicitly, so that is harmless.
        log.debug("comfy.model_management already imported; not forcing --cpu")
    else:
        # Otherwise model_management probes CUDA on import.
        comfy.cli_args.args.cpu = True
    # comfy is a namespace package (no __file__): locate it through a module.
    loaded_from = Path(comfy.cli_args.__file__).resolve().parent.parent
    if loaded_from != comfyui:
        log.warning("comfy is imported from %s, not %s", loaded_from, comfyui)


# --------------------------------------------------------------------------- weights


def torch_reset(module: torch.nn.Module) -> bool:
    """Run torch's own reset_parameters on a layer.

    ComfyUI's ops (comfy.ops.disable_weight_init) override reset_parameters with a no-op, so
    we call the torch.nn base class's version instead.
    """
    for cls in type(module).__mro__:
        if cls.__module__.startswith("torch.nn.") and "reset_parameters" in vars(cls):
            cls.reset_parameters(module)
            return True
    return False


@contextmanager
def nan_filled_empty() -> Iterator[None]:
    """Make torch.empty() return NaN, so weights the constructor never set are recognisable.

    ComfyUI skips weight init (the loader overwrites everything), leaving torch.empty memory,
    which is neither random nor reproducible. NaN marks "never set" apart from values a
    constructor sets on purpose (constants, zero inits), which init_weights keeps.
    """
    import torch
    import torch.utils.deterministic

    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_filling = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = was_filling
        torch.use_deterministic_algorithms(was_deterministic)


def init_weights(model: torch.nn.Module, norm_ones: bool = False) -> None:
    """Deterministic random init of every parameter the constructor left unset (NaN).

    Layers get torch's default init, bare parameters small noise. Any weight that is entirely
    zero gets N(0, ZERO_WEIGHT_STD): a zero output layer would make the output ignore the
    conditioning. (ComfyUI's copies of openaimodel and MMDiT dropped zero_module and the zero
    adaLN init, so today nothing is zero; the pass guards against constructors that change.)

    norm_ones: bare scales of norm modules (Flux's and T5's RMSNorm keep their own Parameter)
    start at 1 as in the real models; N(0, 0.02) there shrinks q and k in QK-norm attention
    until every token attends uniformly. Off for the SD1.x/SD3 files, which must not change.
    """
    import torch

    with torch.no_grad():
        for module in model.modules():
            if any(is_unset(p) for p in module.parameters(recurse=False)):
                torch_reset(module)
            if norm_ones and "norm" in type(module).__name__.lower():
                for name, param in module.named_parameters(recurse=False):
                    if name in ("weight", "scale") and param.ndim == 1 and is_unset(param):
                        param.fill_(1.0)
        for name, param in model.named_parameters():
            total = float(param.abs().sum())  # one pass: NaN if unset, 0 if all zero
            if math.isnan(total):
                log.debug("bare parameter %s: N(0, %s)", name, ZERO_WEIGHT_STD)
                param.normal_(0.0, ZERO_WEIGHT_STD)
            elif total == 0.0 and name.endswith("weight"):
                log.debug("all-zero weight %s: N(0, %s)", name, ZERO_WEIGHT_STD)
                param.normal_(0.0, ZERO_WEIGHT_STD)
    unset = [name for name, t in model.state_dict().items() if t.is_floating_point() and is_unset(t)]
    if unset:
        raise RuntimeError(f"tensors left uninitialised: {unset[:5]}")


def is_unset(tensor: torch.Tensor) -> bool:
    """Any NaN left from nan_filled_empty (a sum is one cheap pass; NaN propagates)."""
    return math.isnan(float(tensor.sum()))


def build(factory: Callable[[], torch.nn.Module], norm_ones: bool = False) -> torch.nn.Module:
    """Construct and initialise one model under a fixed seed, so files are reproducible."""
    import torch

    torch.manual_seed(SEED)
    with nan_filled_empty():
        model = factory()
    init_weights(model, norm_ones=norm_ones)
    return model.eval()


def prefixed(model: torch.nn.Module, prefix: str, drop: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in model.state_dict().items() if k not in drop}


def comfy_ops() -> Any:
    import comfy.ops

    return comfy.ops.disable_weight_init


# --------------------------------------------------------------------------- files


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) then rename: readers never see a half-written file, even if we crash."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        tmp.chmod(0o644)  # safetensors creates its files 0600
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(path: Path, state_dict: dict[str, torch.Tensor], key: str, version: int) -> None:
    """fp16 safetensors: half the size and write time; ComfyUI upcasts on load where needed."""
    import torch
    from safetensors.torch import save_file

    def fits_fp16(tensor: torch.Tensor) -> bool:
        # In fp32 (fp16 math is slow on CPU); NaN fails both comparisons, inf the bound.
        low, high = torch.aminmax(tensor)
        return bool(low >= -fp16_max) and bool(high <= fp16_max)

    fp16_max = torch.finfo(torch.float16).max
    bad = [k for k, v in state_dict.items() if not fits_fp16(v)]
    if bad:
        raise RuntimeError(f"weights not representable in fp16 in {key}: {bad[:5]}")
    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in state_dict.items()}
    # One metadata entry only: safetensors writes its metadata map in random (hash) order,
    # so two entries would make otherwise identical files differ byte-wise.
    metadata = {"supercond_fixture": json.dumps({"name": key, "version": version})}
    write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The header's __metadata__, read without torch (8-byte length, then JSON)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(size)).get("__metadata__", {})


# --------------------------------------------------------------------------- cache stamps


def is_fresh(stamp_path: Path, stamp: dict[str, Any]) -> bool:
    """True when the stamp matches and every file it lists (beside it) has its recorded size."""
    try:
        found = json.loads(stamp_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    sizes = found.pop("sizes", {})
    if found != stamp:
        return False
    for name in stamp["files"].values():
        path = stamp_path.parent / name
        if not path.is_file() or path.stat().st_size != sizes.get(name):
            return False
    return True


def write_stamp(stamp_path: Path, stamp: dict[str, Any]) -> None:
    sizes = {name: (stamp_path.parent / name).stat().st_size for name in stamp["files"].values()}
    text = json.dumps({**stamp, "sizes": sizes}, indent=2, sort_keys=True) + "\n"
    write_atomically(stamp_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# --------------------------------------------------------------------------- checks


def require(condition: bool, message: str) -> None:
    if not condition:
        raise FixtureCheckError(message)


@contextmanager
def timed(label: str, timings: dict[str, float]) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[label] = round(time.perf_counter() - start, 2)


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().mean() / a.abs().mean().clamp_min(1e-12))
