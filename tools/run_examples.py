"""Run every example workflow through the API queue of a headless ComfyUI with this pack.

Called by ``scripts/examples`` (which installs what is missing first). Writes the images and
``summary.txt`` (one line per workflow) into --out.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

from _pack import import_pack

REPO = Path(__file__).resolve().parent.parent
log = logging.getLogger("supercond.examples")



def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="your SD1.x checkpoint (a file in ComfyUI's models/checkpoints) "
                                         "for the SD1.x examples")
    ap.add_argument("--sd3-checkpoint", help="your SD3 checkpoint (with text encoders) for the SD3 example")
    ap.add_argument("--out", type=Path, default=REPO / "out" / "examples", help="where images and summary go")
    ap.add_argument("--quick", action="store_true", help="64 px and 4 steps even on your checkpoint")
    ap.add_argument("--only", nargs="*", help="workflow names (file stems) to run")
    args = ap.parse_args()

    import_pack()
    from supercond.tools import paths, workflows
    from supercond.tools.inprocess import ensure_fixtures
    from supercond.tools.server import ComfyClient, ComfyServer

    comfyui = paths.find_comfyui()
    if comfyui is None:
        log.error("ComfyUI not found: set COMFYUI_PATH")
        return 1
    models = ensure_fixtures(comfyui)
    user = {"v1-5-pruned-emaonly-fp16.safetensors": args.checkpoint,
            "sd3_medium_incl_clips.safetensors": args.sd3_checkpoint}
    args.out.mkdir(parents=True, exist_ok=True)
    lines = []
    with tempfile.TemporaryDirectory() as tmp, ComfyServer(comfyui, Path(tmp), models_dir=models, standins=True) as srv:
        client = ComfyClient(srv.url)
        info = client.object_info()
        for path in workflows.example_paths():
            if args.only and path.stem not in args.only:
                continue
            lines.append(run_one(client, info, path, user, args, workflows))
            log.info(lines[-1])
    (args.out / "summary.txt").write_text("\n".join(lines) + "\n")
    log.info("images and summary.txt in %s", args.out)
    return 0 if all(": ok" in line for line in lines) else 1


def run_one(client, info: dict, path: Path, user: dict, args, workflows) -> str:
    start = time.monotonic()
    try:
        prompt = workflows.to_api(workflows.load(path), info)
        mine = [user[n] for n in workflows.checkpoints_used(prompt) if user.get(n)]
        on_fixture = len(mine) < len(workflows.checkpoints_used(prompt))
        mapping = {n: user.get(n) or fixture for n, fixture in workflows.FIXTURE_FOR_CHECKPOINT.items()}
        prompt = workflows.retarget(prompt, mapping)
        if on_fixture or args.quick:
            prompt = workflows.shrink(prompt)
        result = client.run(prompt)
        if result.status != "success":
            msg = (result.error or {}).get("exception_message", result.status).strip().splitlines()
            return f"{path.stem}: FAILED ({msg[0] if msg else result.status})"
        images = client.images(result)
        for i, (node, png) in enumerate(images):
            (args.out / f"{path.stem}_{node}_{i}.png").write_bytes(png)
        model = "the generated fixture" if on_fixture else ", ".join(mine)
        return f"{path.stem}: ok, {len(images)} images in {time.monotonic() - start:.1f}s on {model}"
    except Exception as exc:  # one bad workflow must not hide the others' results
        return f"{path.stem}: FAILED ({type(exc).__name__}: {str(exc)[:300]})"


if __name__ == "__main__":
    sys.exit(main())
