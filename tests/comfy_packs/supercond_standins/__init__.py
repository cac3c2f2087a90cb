"""Test-only ComfyUI pack: text encoders for the fixture families whose real ones (T5-XXL, UMT5-XXL,
Qwen2.5-VL) are too large to build here.

``SupercondStandInCLIPLoader`` returns ``tools/fixture_models.standins.standin_clip(family)``: ComfyUI's
own text-encoder class and tokenizer for the family with a one-layer transformer of the real width, so
CONDITIONING has that encoder's exact layout (token count, width, pooled output, masks). Only test
servers load this pack (tools/server.py, ``standins=True``); the tests and the browser swap each
example's CLIPLoader / DualCLIPLoader for it (tools/workflows.py). Users never see it.
"""

from __future__ import annotations

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


NODE_CLASS_MAPPINGS = {"SupercondStandInCLIPLoader": SupercondStandInCLIPLoader}
