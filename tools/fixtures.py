"""Tiny random-weight models that ComfyUI's real loaders read, cached between runs.

Seven families, built with ComfyUI's own model classes (tools/fixture_models/, one module per
family), each the smallest model ComfyUI's detection still takes for that family:

* ``checkpoints/``: single files for ``CheckpointLoaderSimple``: SD1.x (``sd15``), SD3 (``sd3``,
  CLIP-L only) and SDXL (``sdxl``, full-size CLIP-L and CLIP-G).
* ``diffusion_models/``: for ``UNETLoader``: Flux dev-style (``flux``), ``chroma``,
  ``qwen_image``, Wan 2.1 T2V (``wan21``).
* ``vae/``: for ``VAELoader``: the Flux VAE (Flux, Chroma) and the Wan 2.1 VAE (Wan, Qwen-Image).
* ``loras/supercond/example_lora.safetensors``: a kohya LoRA for the SD1.x file that the stock
  ``LoraLoader`` reads (the example workflow ``lora_load`` is retargeted to it).

Text encoders too large to build here (T5-XXL, UMT5-XXL, Qwen2.5-VL) are not files: the tests use
``fixture_models.standins.standin_clip(family)``, a real ``comfy.sd.CLIP`` with the real layout.

Weights are random but deterministic (fixed seed per model, byte-identical files) and stored as
fp16. Each family's files have their own version stamp, so a new family regenerates only its
own. ``--check`` loads each family with ComfyUI's loader nodes, encodes two prompts, samples 4
steps at 64 px (Wan: 5 frames), decodes, and checks detection, prompt and seed dependence.

Usage::

    python tools/fixtures.py --comfyui ~/comfy/ComfyUI --out DIR [--families sd15,sd3,...] [--force] [--check]

prints one JSON line ``{"checkpoints": {"sd15": "<abs path>", ...}, "diffusion_models": {...},
"vae": {...}, "loras": {"example": "<abs path>"}}`` (the generated folders only) on stdout;
logging goes to stderr. From Python: ``ensure_fixtures(comfyui, out)``.

Standalone on purpose (no imports from the pack): tests and benchmarks call it before ComfyUI
or the pack are set up.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Iterable
from pathlib import Path

if __package__:
    from .fixture_models.registry import FAMILIES, GROUP_OF, ensure_groups
    from .fixture_models.sd import lora_path
else:  # run as a script: tools/ is sys.path[0]
    from fixture_models.registry import FAMILIES, GROUP_OF, ensure_groups
    from fixture_models.sd import lora_path

log = logging.getLogger("supercond.fixtures")


def ensure_fixtures(comfyui: Path, out: Path, force: bool = False,
                    families: Iterable[str] | None = None) -> dict[str, Path]:
    """Make sure ``out`` holds current fixtures of ``families`` (default: all); return {file key: path}.

    Regenerates a family's files when forced, when its stamp (version, ComfyUI version) differs
    or when a file is missing; otherwise imports neither torch nor ComfyUI.
    """
    return ensure_groups(comfyui, out, list(FAMILIES) if families is None else families, force=force)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", type=Path, required=True, help="ComfyUI checkout")
    parser.add_argument("--out", type=Path, required=True, help="models directory (checkpoints/, vae/, ...)")
    parser.add_argument("--families", default=",".join(FAMILIES),
                        help=f"comma-separated, of {','.join(FAMILIES)} (default: all)")
    parser.add_argument("--force", action="store_true", help="regenerate even if the cache is fresh")
    parser.add_argument("--check", action="store_true", help="load, sample and decode each family")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    comfyui = args.comfyui.expanduser().resolve()
    families = [f for f in args.families.split(",") if f]
    start = time.perf_counter()
    paths = ensure_fixtures(comfyui, args.out, force=args.force, families=families)
    log.info("fixtures ready in %.1f s", time.perf_counter() - start)
    if args.check:
        if __package__:
            from .fixture_models.check import check_fixtures
        else:
            from fixture_models.check import check_fixtures
        check_fixtures(comfyui, args.out, families)
        log.info("check passed")
    listing: dict[str, dict[str, str]] = {}
    for key, path in paths.items():
        listing.setdefault(GROUP_OF[key].folder, {})[key] = str(path)
    if "sd15" in paths:
        listing["loras"] = {"example": str(lora_path(args.out))}
    sys.stdout.write(json.dumps(listing) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
