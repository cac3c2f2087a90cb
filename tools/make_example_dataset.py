"""Write the example training set (synthetic images + .txt captions) into a folder.

    python tools/make_example_dataset.py [OUT_DIR]   (default: ~/comfy/ComfyUI/input/supercond_example)

The dataset node writes the same set itself when asked for folder ``supercond_example`` and it is
missing from ComfyUI's input directory, so example workflows run anywhere; this script is for
looking at it or copying it elsewhere.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _pack import import_pack

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    import_pack()
    from supercond.tools import paths
    from supercond.tools.inprocess import setup_comfy_imports

    comfyui = paths.find_comfyui()
    if comfyui is None:
        raise SystemExit("ComfyUI not found: check it out to ~/comfy/ComfyUI or set COMFYUI_PATH (see README)")
    setup_comfy_imports(comfyui)  # supercond.nodes imports comfy_api
    from supercond.core.dataset import EXAMPLE_NAME
    from supercond.nodes.train.dataset_files import write_example

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", type=Path, default=Path.home() / "comfy/ComfyUI/input" / EXAMPLE_NAME)
    write_example(ap.parse_args().out)


if __name__ == "__main__":
    main()
