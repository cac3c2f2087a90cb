"""The second (unconditional) output head and its file format, in plain torch.

A head is a copy of a model's tail that predicts the *unconditional* model output from the
features of the conditional forward pass (madebyollin's single-pass superconditioning, seed 003):

- ``projection``: a copy of the final projection (UNet ``out``, DiT ``final_layer``);
- ``last_block``: a copy of the last block plus the final projection (stronger, costlier).

Copied from the base weights, a fresh head predicts exactly what the model predicts for the
prompt, i.e. cond - uncond = 0: guidance off, the same image as cfg 1 until it is trained.

How the copied modules are fed is architecture glue and lives in ``nodes/``; here is only the
module container, the metadata that says what a head fits, and safetensors load/validate/save.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn

from .files import save_atomic

FORMAT = "supercond.head"
FORMAT_VERSION = 1
HEAD_TYPES: tuple[str, ...] = ("projection", "last_block")
_MAX_HEADER = 100 * 1024 * 1024


class HeadFileError(ValueError):
    """A head file that cannot be read, or a head that does not fit; the message says why."""


@dataclass(frozen=True)
class HeadSpec:
    """What a head fits. Stored as the safetensors metadata of a head file."""

    family: str       # the base model family, ComfyUI's model config name: "SD15", "SDXL", "SD3", "Flux"
    prediction: str   # what the model predicts: "eps", "v", "flow", ...
    features: str     # where the head reads its features, e.g. "unet.out", "final_layer"
    head_type: str    # one of HEAD_TYPES
    width: int        # feature width (channels or hidden size) at that point
    # The head's copied block reads the negative prompt's tokens (trained with negative_prompts); files
    # without the field are heads for the empty prompt.
    reads_negative: bool = False

    def to_metadata(self) -> dict[str, str]:
        md = {f.name: str(getattr(self, f.name)) for f in fields(self)}
        md["reads_negative"] = "true" if self.reads_negative else "false"
        return {"format": FORMAT, "format_version": str(FORMAT_VERSION), **md}

    @classmethod
    def from_metadata(cls, md: dict[str, str] | None, where: str = "head file") -> HeadSpec:
        md = md or {}
        if md.get("format") != FORMAT:
            raise HeadFileError(f"{where} is a safetensors file but not a Supercond head (its metadata has no "
                                f"'format: {FORMAT}'; found format {md.get('format')!r})")
        version = md.get("format_version", "")
        if not version.isdigit() or int(version) > FORMAT_VERSION:
            raise HeadFileError(f"{where} has head format version {version!r}; this Supercond reads up to "
                                f"version {FORMAT_VERSION}: update Supercond")
        missing = [f.name for f in fields(cls) if f.name not in md and f.name != "reads_negative"]
        if missing:
            raise HeadFileError(f"{where} lacks the metadata fields {missing}")
        if md["head_type"] not in HEAD_TYPES:
            raise HeadFileError(f"{where} has head type {md['head_type']!r}; expected one of {list(HEAD_TYPES)}")
        try:
            width = int(md["width"])
        except ValueError:
            raise HeadFileError(f"{where} has a non-integer feature width {md['width']!r}") from None
        reads = md.get("reads_negative", "false")
        if reads not in ("true", "false"):
            raise HeadFileError(f"{where} has reads_negative {reads!r}; expected 'true' or 'false'")
        return cls(md["family"], md["prediction"], md["features"], md["head_type"], width, reads == "true")

    def misfit(self, model: HeadSpec) -> str | None:
        """None if this head fits ``model`` (a spec built from the model), else what differs."""
        diffs = [f"{name}: the model needs {getattr(model, name)!r}, the head has {getattr(self, name)!r}"
                 for name in ("family", "prediction", "features", "width")
                 if getattr(self, name) != getattr(model, name)]
        return "; ".join(diffs) or None


class Chain(nn.ModuleList):
    """Modules applied in sequence, the first with the captured arguments (Qwen-Image's final projection
    is ``proj_out(norm_out(x, temb))``)."""

    def forward(self, *args, **kwargs):
        out = self[0](*args, **kwargs)
        for mod in self[1:]:
            out = mod(out)
        return out


class SecondHead(nn.Module):
    """``final``: a copy of the final projection; ``block``: a copy of the last block (last_block heads)."""

    def __init__(self, spec: HeadSpec, final: nn.Module, block: nn.Module | None = None) -> None:
        super().__init__()
        if (spec.head_type == "last_block") != (block is not None):
            raise ValueError(f"a {spec.head_type} head {'needs' if block is None else 'takes no'} block")
        self.spec = spec
        self.final = final
        self.block = block


def head_state(head: SecondHead) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in head.state_dict().items()}


def save_head(head: SecondHead, path: str | Path) -> Path:
    return save_atomic(path, head_state(head), head.spec.to_metadata())


def _check_container(path: Path) -> None:
    """Tell a non-safetensors, truncated or corrupt file apart before safetensors' terse errors."""
    if not path.is_file():
        raise HeadFileError(f"head file {path} does not exist")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise HeadFileError(f"{path.name} is {size} bytes: not a safetensors file (truncated or empty)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER:
            raise HeadFileError(f"{path.name} is not a safetensors file (no safetensors header; a .pt/.ckpt "
                                "pickle? Heads are saved as .safetensors)")
        if 8 + n > size:
            raise HeadFileError(f"{path.name} is truncated: its header says {n} bytes, the file has {size - 8}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise HeadFileError(f"{path.name} is not a safetensors file or its header is corrupt") from None
    if not isinstance(header, dict):
        raise HeadFileError(f"{path.name} has a corrupt safetensors header")
    end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        problem = _bad_entry(entry)
        if problem:
            raise HeadFileError(f"{path.name} has a corrupt safetensors header: tensor {key!r} {problem}")
        end = max(end, entry["data_offsets"][1])
    if 8 + n + end > size:
        raise HeadFileError(f"{path.name} is truncated: {size} bytes, its tensors need {8 + n + end}")


def _bad_entry(entry: object) -> str | None:
    """What is wrong with one tensor's header entry, or None."""
    if not isinstance(entry, dict):
        return "is not described by a JSON object"
    offsets, shape = entry.get("data_offsets"), entry.get("shape")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)
            and offsets[0] <= offsets[1]):
        return f"has data_offsets {offsets!r}, not [begin, end] with 0 <= begin <= end"
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        return f"has shape {shape!r}, not a list of sizes"
    if not isinstance(entry.get("dtype"), str):
        return f"has dtype {entry.get('dtype')!r}, not a type name"
    return None


def read_head_file(path: str | Path) -> tuple[HeadSpec, dict[str, torch.Tensor]]:
    """The spec and tensors of a head file, or a HeadFileError that says what is wrong."""
    from safetensors import safe_open

    path = Path(path)
    _check_container(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            md = f.metadata()
            spec = HeadSpec.from_metadata(md, where=path.name)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except HeadFileError:
        raise
    except Exception as e:  # safetensors raises its own error types for corrupt payloads
        raise HeadFileError(f"{path.name} could not be read as safetensors: {e}") from None
    return spec, tensors


def load_state(head: SecondHead, tensors: dict[str, torch.Tensor], where: str = "head file") -> SecondHead:
    """Load a file's tensors into a head built for the model, refusing any misfit by name and shape."""
    own = head.state_dict()
    missing = sorted(set(own) - set(tensors))
    extra = sorted(set(tensors) - set(own))
    if missing or extra:
        raise HeadFileError(f"{where} does not match the model's {head.spec.head_type} head: "
                            f"missing {missing[:5]}, unexpected {extra[:5]}")
    for k, v in own.items():
        if tuple(tensors[k].shape) != tuple(v.shape):
            raise HeadFileError(f"{where}: tensor {k} has shape {list(tensors[k].shape)}, the model's head "
                                f"needs {list(v.shape)}")
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(tensors[k])
    return head
