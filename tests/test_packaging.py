"""The registry's tools on the pack as committed: ``comfy node validate`` passes with no warning (a malformed
requires-comfyui is only a warning there), and the archive ``comfy node pack`` makes, unpacked into a clean
custom_nodes/, loads in the real ComfyUI and passes tier B."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from supercond.tools.paths import PACK_DIR

COMFY_CLI = [str(Path(sys.executable).with_name("comfy")), "--skip-prompt", "--no-enable-telemetry", "node"]


def committed_tree(into: Path) -> Path:
    """What a clone holds (the tests' artifacts and caches stay out)."""
    files = subprocess.run(["git", "-C", str(PACK_DIR), "ls-files", "-co", "--exclude-standard"],
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (PACK_DIR / name).is_file():
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(PACK_DIR / name, into / name)
    return into


def test_comfy_node_validate_passes_without_a_warning(tmp_path):
    tree = committed_tree(tmp_path / "supercond")
    r = subprocess.run([*COMFY_CLI, "validate"], cwd=tree, capture_output=True, text=True, timeout=300)
    said = r.stdout + r.stderr
    assert r.returncode == 0 and "All validation checks passed" in said and "Warning" not in said, said


@pytest.mark.comfy
@pytest.mark.server
def test_the_packed_archive_loads_and_passes_tier_b(tmp_path, comfyui):
    tree = committed_tree(tmp_path / "src")
    r = subprocess.run([*COMFY_CLI, "pack"], cwd=tree, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and (tree / "node.zip").is_file(), r.stdout + r.stderr
    installed = tmp_path / "custom_nodes" / "supercond"
    with zipfile.ZipFile(tree / "node.zip") as z:
        z.extractall(installed)
    assert (installed / "js" / "docs" / "SupercondCEP.md").is_file()  # the help pages travel with it
    tests = ["tests/test_node_contract.py", "tests/test_compat.py",
             "tests/test_e2e_server.py::test_the_pack_loads_alone_with_all_its_nodes"]
    env = {**os.environ, "COMFYUI_PATH": str(comfyui), "CI": "true"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-c", "tests/pytest.ini", *tests, "-q"],
                         cwd=installed, capture_output=True, text=True, timeout=900, env=env)
    tail = run.stdout[-3000:] + run.stderr[-2000:]
    assert run.returncode == 0 and " passed" in run.stdout and "skipped" not in run.stdout, tail
