"""The registry's checks: ``comfy node validate`` (comfy-cli, as the registry runs it before publishing)
passes on the pack as committed, with no warning (a malformed requires-comfyui is only a warning there)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from supercond.tools.paths import PACK_DIR


def test_comfy_node_validate_passes_without_a_warning(tmp_path):
    tree = tmp_path / "supercond"
    files = subprocess.run(["git", "-C", str(PACK_DIR), "ls-files", "-co", "--exclude-standard"],
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:  # what a clone has (the tests' artifacts and caches stay out)
        if (PACK_DIR / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(PACK_DIR / name, tree / name)
    comfy = Path(sys.executable).with_name("comfy")
    r = subprocess.run([str(comfy), "--skip-prompt", "--no-enable-telemetry", "node", "validate"], cwd=tree,
                       capture_output=True, text=True, timeout=300)
    said = r.stdout + r.stderr
    assert r.returncode == 0 and "All validation checks passed" in said and "Warning" not in said, said
