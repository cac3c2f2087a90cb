"""Test-only ComfyUI pack: text encoders for the fixture families whose real ones (T5-XXL, UMT5-XXL,
Qwen2.5-VL) are too large to build here, and a fingerprint of a MODEL's shared state for the stress
tests (bench/stress).

``SupercondStandInCLIPLoader`` returns ``tools/fixture_models.standins.standin_clip(family)``: ComfyUI's
own text-encoder class and tokenizer for the family with a one-layer transformer of the real width, so
CONDITIONING has that encoder's exact layout (token count, width, pooled output, masks). Only test
servers load this pack (tools/server.py, ``standins=True``); the tests and the browser swap each
example's CLIPLoader / DualCLIPLoader for it (tools/workflows.py). Users never see it.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

_TOOLS = Path(__file__).resolve().parents[3] / "tools"
if str(_TOOLS) not in sys.path:
    sys.path.insert(0, str(_TOOLS))

from fixture_models.standins import FAMILIES, standin_clip  # noqa: E402


class SupercondStandInCLIPLoader:
    """A CLIP output like CLIPLoader's, from the stand-in encoder of ``family``."""

    CATEGORY = "supercond/testing"
    DESCRIPTION = "Test servers only: the stand-in text encoder of a fixture family."
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"family": (list(FAMILIES), {"tooltip": "the fixture family whose encoder to mimic"})}}

    def load(self, family: str) -> tuple:
        return (standin_clip(family),)


class SupercondStandInInspect:
    """What a patch, a Cancel or a training run could leak into a MODEL that ComfyUI keeps between
    prompts: its wrappers, callbacks, attachments and options, and on the diffusion model every clone
    shares, instance forwards, module hooks, train mode and each parameter's type and values."""

    CATEGORY = "supercond/testing"
    DESCRIPTION = "Test servers only: a fingerprint of a MODEL's patcher and shared diffusion model."
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "inspect"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"model": ("MODEL",)}}

    @classmethod
    def IS_CHANGED(cls, **_kwargs) -> float:
        return float("nan")  # never cached: every call looks again

    def inspect(self, model) -> dict:
        import comfy.model_management as mm

        mm.load_models_gpu([model])  # as a sampler would: takes off patches a clone (a LoRA) put on
        return {"ui": {"text": [json.dumps(fingerprint(model), sort_keys=True)]}}


def _nested(d: dict) -> dict:
    return {str(k): (_nested(v) if isinstance(v, dict) else len(v) if isinstance(v, list) else type(v).__name__)
            for k, v in d.items()}


def fingerprint(model) -> dict:
    import torch

    dm = model.model.diffusion_model
    params = hashlib.sha256()
    values = 0.0
    with torch.no_grad():
        for name, p in dm.named_parameters():
            # Not the Parameter object, its memory or requires_grad: taking a LoRA off, stock ComfyUI puts back
            # equal values in a new frozen Parameter. The trainers keep the very objects and their flags
            # (tests/test_train_comfy.py); here: names, types, shapes and values.
            params.update(f"{name}:{p.dtype}:{tuple(p.shape)}".encode())
            values += float(p.double().sum()) + float(p.double().abs().sum())
    mods = list(dm.modules())
    options = dict(model.model_options)
    return {
        "wrappers": _nested(model.wrappers), "callbacks": _nested(model.callbacks),
        "attachments": sorted(map(str, model.attachments)), "object_patches": sorted(model.object_patches),
        "patches": len(model.patches), "model_options": _nested(options),
        "instance_forwards": sum("forward" in m.__dict__ for m in mods),
        "module_hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                            for m in mods),
        "training": sum(m.training for m in mods), "parameters": params.hexdigest(), "values": repr(values),
    }


NODE_CLASS_MAPPINGS = {"SupercondStandInCLIPLoader": SupercondStandInCLIPLoader,
                       "SupercondStandInInspect": SupercondStandInInspect}
