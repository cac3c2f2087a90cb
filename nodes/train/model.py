"""ComfyUI glue for the trainers: the loss target a model allows, weights autograd can use, gradient
checkpointing, and the checkpoint files. Which layers get a LoRA, their kohya names and the model call
itself are the model adapter's (nodes/family.py)."""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import family as fm
from ..errors import InputError

log = logging.getLogger("supercond")

def auto_prediction(model: Any, choice: str, node: str) -> str:
    """The loss target: the model's own prediction type (eps, v or flow) or a compatible choice."""
    kind = fm.model_prediction(model)
    if kind not in ("eps", "v", "flow"):
        what = {"edm": "EDM preconditioning (e.g. Playground v2.5)", "x0": "x0 (the clean image)"}.get(kind, kind)
        raise InputError(f"{node}: this model predicts {what}; the trainers' losses are eps, v and flow, so it "
                         "cannot be trained here")
    if choice == "auto":
        return kind
    if (choice == "flow") != (kind == "flow"):
        raise InputError(f"{node}: prediction {choice!r} does not fit this {kind} model: flow needs a flow model "
                         "and eps/v need a discrete (eps or v) model; use auto")
    return choice


def materialize_weights(module: nn.Module) -> None:
    """For a module the trainer owns (a head's copy): weights loaded under ComfyUI's inference_mode are
    inference tensors, which autograd refuses to save for backward; replace each by a normal frozen copy."""
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and (p.is_inference() or p.requires_grad):
                mod._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=False)


@contextmanager
def autograd_weights(*roots: nn.Module):
    """For modules every clone of a MODEL shares (the diffusion model, the text encoder): while inside,
    each inference or trainable parameter is swapped for a frozen normal tensor on the same storage (no
    copy, same values) that autograd can save; on exit the original Parameter objects are put back, so
    other clones, another pack's references and requires_grad are as before."""
    swapped: list[tuple[nn.Module, str, nn.Parameter, nn.Parameter]] = []
    try:
        for root in roots:
            for mod in root.modules():
                for name, p in list(mod._parameters.items()):
                    if p is not None and (p.is_inference() or p.requires_grad):
                        view = nn.Parameter(_same_storage(p), requires_grad=False)
                        mod._parameters[name] = view
                        swapped.append((mod, name, p, view))
        yield
    finally:
        for mod, name, p, view in reversed(swapped):
            if mod._parameters.get(name) is view:  # ComfyUI may have patched it meanwhile: then leave theirs
                mod._parameters[name] = p


def _same_storage(p: torch.Tensor) -> torch.Tensor:
    """A normal (not inference) tensor viewing ``p``'s memory: ``detach()`` of an inference tensor is one too."""
    with torch.inference_mode(False):
        t = torch.empty(0, dtype=p.dtype, device=p.device)
        return t.set_(p.untyped_storage(), p.storage_offset(), p.size(), p.stride())


@contextmanager
def norm_inputs_copied(*roots: nn.Module):
    """Backward through blocks that update the residual stream in place (``x += f(norm(x))``: Flux,
    Chroma, ComfyUI's CLIP layers): while grad is on, each LayerNorm under ``roots`` gets a copy of its
    input, so the tensor autograd saved is not the one the block then changes. Forward values are
    unchanged; the hooks live only inside."""
    def copy_input(_module, args):
        if torch.is_grad_enabled() and args and isinstance(args[0], torch.Tensor):
            return (args[0].clone(), *args[1:])
        return None

    handles = []
    try:
        for root in roots:
            handles += [m.register_forward_pre_hook(copy_input) for m in root.modules() if isinstance(m, nn.LayerNorm)]
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def trainable(model: Any, *modules: nn.Module):
    """The diffusion model (and ``modules``, e.g. a head's copied block) ready for backward: norm inputs
    copied for the families with an in-place residual stream."""
    if fm.family_of(model, "the trainer").inplace_residual:
        with norm_inputs_copied(model.model.diffusion_model, *modules):
            yield
    else:
        yield


def blocks(module: nn.Module) -> list[nn.Module]:
    """The outermost modules under ``module`` that hold weights and that its forward calls (through
    ``__call__``, so hooks run): containers (ModuleList, Sequential, ModuleDict) are looked into, since
    ComfyUI iterates some Sequentials (the UNet's TimestepEmbedSequential) instead of calling them."""
    out: list[nn.Module] = []
    for child in module.children():
        if isinstance(child, (nn.ModuleList, nn.Sequential, nn.ModuleDict)):
            out += blocks(child)
        elif any(True for _ in child.parameters()):
            out.append(child)
    return out


@contextmanager
def checkpointing(diffusion_model: nn.Module, enabled: bool):
    """Gradient checkpointing per top-level block (ResBlock / SpatialTransformer / DiT block):
    an instance-level ``forward`` override, restored on exit. The blocks are shared by every clone of
    the MODEL: an override someone else set on a block (another pack's) is wrapped, and put back."""
    patched: list[tuple[nn.Module, Any]] = []  # (block, its own instance forward or None)
    try:
        if enabled:
            for m in blocks(diffusion_model):
                orig = m.forward

                def fwd(*args, _orig=orig, **kwargs):
                    return torch.utils.checkpoint.checkpoint(_orig, *args, use_reentrant=False, **kwargs)

                patched.append((m, m.__dict__.get("forward")))
                m.forward = fwd
        yield
    finally:
        for m, before in patched:
            if before is None:
                del m.forward  # drops the instance attribute: the class forward is back
            else:
                m.forward = before


# -- files -----------------------------------------------------------------------------------------
def checkpoint_file(stem: Path, step: int) -> Path:
    return stem.with_name(f"{stem.name}_{step:06d}.safetensors")


def ema_file(lora_file: Path) -> Path:
    """``<prefix>_<step>_ema.safetensors``: the EMA of the weights in ``lora_file``."""
    return lora_file.with_name(f"{lora_file.stem}_ema.safetensors")


def state_file(lora_file: Path) -> Path:
    return lora_file.with_suffix(".state.pt")


def read_state(path: Path) -> dict:
    """A ``.state.pt`` for resume, or a message saying it cannot be used (never a raw unpickling error)."""
    import pickle

    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:  # weights_only refused a Python object: nothing in it was run
        raise InputError(f"cannot resume: {path.name} holds Python objects a trainer state never has, so it "
                         "was refused unread (nothing in it ran). Delete it if you did not put it there; switch "
                         "resume off to start over, or use another filename_prefix") from None
    except Exception as e:  # truncated, damaged, or not written by torch.save at all
        raise InputError(f"cannot resume: {path.name} is damaged or not a trainer state "
                         f"({type(e).__name__}: {str(e)[:160]}). Switch resume off to start over, or use "
                         "another filename_prefix") from None


def last_checkpoint(stem: Path) -> tuple[Path, int] | None:
    """The highest-step ``<stem>_<step>.safetensors`` that has its optimizer-state file."""
    pattern = re.compile(re.escape(stem.name) + r"_(\d{6})\.safetensors$")
    best = None
    if stem.parent.is_dir():
        for p in stem.parent.iterdir():
            m = pattern.match(p.name)
            if m and state_file(p).exists() and (best is None or int(m.group(1)) > best[1]):
                best = (p, int(m.group(1)))
    return best


def base_model_name(model: Any) -> str:
    return type(model.model).__name__

