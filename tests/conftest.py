"""Test set-up shared by all tiers.

- The pack is imported as package ``supercond`` from the repository root (whatever its folder is
  called); the root itself never goes on sys.path, since its ``nodes`` package would shadow
  ComfyUI's ``nodes`` module.
- ComfyUI is found through COMFYUI_PATH, the pack's own parent, or ~/comfy/ComfyUI. Without it
  tiers B-D skip locally, but under CI (CI=true) a missing ComfyUI, Chromium or Playwright fails.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _import_pack():
    if "supercond" in sys.modules:
        return sys.modules["supercond"]
    spec = importlib.util.spec_from_file_location(
        "supercond", REPO / "__init__.py", submodule_search_locations=[str(REPO)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["supercond"] = module
    spec.loader.exec_module(module)
    return module


_import_pack()
from supercond.tools import paths  # noqa: E402

COMFYUI = paths.find_comfyui()


def require(what: str, ok: bool, hint: str) -> None:
    """Skip locally, fail under CI: a missing prerequisite must never pass CI silently."""
    if ok:
        return
    message = f"{what} is not available: {hint}"
    if IN_CI:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def comfyui() -> Path:
    require("ComfyUI", COMFYUI is not None,
            "check it out to ~/comfy/ComfyUI or set COMFYUI_PATH (see README)")
    return COMFYUI


@pytest.fixture(scope="session")
def comfy(comfyui: Path):
    """ComfyUI imported in this process (tier B and in-process integration tests)."""
    from supercond.tools.inprocess import setup_comfy_imports

    setup_comfy_imports(comfyui)
    import folder_paths

    return folder_paths


@pytest.fixture(scope="session")
def models_dir(comfyui: Path) -> Path:
    """Generated fixture checkpoints, cached outside the repository between runs."""
    from supercond.tools.inprocess import FixtureError, ensure_fixtures

    try:
        return ensure_fixtures(comfyui)
    except FixtureError as err:
        pytest.fail(str(err), pytrace=False)


@pytest.fixture(scope="session")
def fixture_checkpoints(models_dir: Path) -> dict[str, Path]:
    found = {p.name: p for p in (models_dir / "checkpoints").glob("*.safetensors")}
    return {"sd15": found["supercond_sd15_tiny.safetensors"], "sd3": found["supercond_sd3_tiny.safetensors"]}


@pytest.fixture(scope="session")
def server(comfyui: Path, models_dir: Path, tmp_path_factory):
    """The real ComfyUI server with only this pack loaded (tier C)."""
    from supercond.tools.server import ComfyServer

    srv = ComfyServer(comfyui, tmp_path_factory.mktemp("comfy"), models_dir=models_dir, standins=True)
    srv.start()
    yield srv
    alive = srv.alive()
    srv.stop()
    assert alive, f"the server died during the tests:\n{srv.log_tail()}"


@pytest.fixture()
def client(server):
    from supercond.tools.server import ComfyClient

    return ComfyClient(server.url)


@pytest.fixture(params=["eps", "v", "flow"])
def fam(request, comfy, fixture_checkpoints):
    """Each SD1.x-family fixture (eps, v) and SD3 (flow); a module may define its own ``fam``."""
    from comfy_helpers import load_family

    return load_family(request.param, fixture_checkpoints)


@pytest.fixture()
def conds(fam):
    from comfy_helpers import encode

    return encode(fam, "a red cube on a table"), encode(fam, "")


@pytest.fixture()
def loras(comfy, tmp_path, monkeypatch):
    """A private loras folder for each test."""
    d = tmp_path / "loras"
    d.mkdir()
    monkeypatch.setitem(comfy.folder_names_and_paths, "loras", ([str(d)], comfy.supported_pt_extensions))
    return d


@pytest.fixture()
def input_dir(comfy, tmp_path, monkeypatch):
    """Private input and user folders (datasets and their cache) for each test."""
    d = tmp_path / "input"
    d.mkdir()
    monkeypatch.setattr(comfy, "get_input_directory", lambda: str(d))
    monkeypatch.setattr(comfy, "get_user_directory", lambda: str(tmp_path / "user"))
    return d


@pytest.fixture()
def one_thread():
    """Toy benches' small matmuls: one thread is faster and makes bit-identity checks independent of load."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def artifacts() -> Path:
    out = REPO / "tests" / "artifacts"
    out.mkdir(parents=True, exist_ok=True)
    return out


def load_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
