"""For the scripts in tools/, run as ``python tools/<name>.py``: register the repository as the
package ``supercond`` so ``supercond.tools``, ``supercond.nodes``, ... import (the folder itself may
have any name; it must never go on sys.path, its ``nodes`` would shadow ComfyUI's)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def import_pack(name: str = "supercond"):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
