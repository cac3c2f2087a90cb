"""scripts/evidence build [--force] [--miniature] | report [--quick]: see bench/evidence/build.py
and report.py. Run from anywhere; finds ComfyUI as the other tools do."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BENCH))

import _common  # noqa: E402

log = logging.getLogger("supercond.evidence")


def setup() -> Path:
    _common.import_pack()
    from supercond.tools import paths
    from supercond.tools.inprocess import setup_comfy_imports

    comfyui = paths.find_comfyui()
    if comfyui is None:
        raise SystemExit("ComfyUI not found: set COMFYUI_PATH (see the README)")
    setup_comfy_imports(comfyui)
    return comfyui


def main(argv: list[str] | None = None) -> None:
    _common.setup_logging()
    ap = argparse.ArgumentParser(prog="scripts/evidence", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="train the evidence checkpoint (cached); prints its path last")
    b.add_argument("--models", type=Path, help="ComfyUI models folder to write into (default: ComfyUI's own)")
    b.add_argument("--force", action="store_true", help="train again even if a current file is there")
    b.add_argument("--miniature", action="store_true", help="a few steps on 16 images (what CI runs)")
    b.add_argument("--steps", type=int, help="train this many steps instead (a trial; report refuses it)")
    r = sub.add_parser("report", help="print the tables and write their plots to bench/results/")
    r.add_argument("--models", type=Path)
    r.add_argument("--quick", action="store_true", help="fewer samples and rounds: wider intervals")
    args = ap.parse_args(argv)

    comfyui = setup()
    from evidence import build, data, metrics, report

    models = args.models or comfyui / "models"
    if args.command == "build":
        cfg = build.miniature() if args.miniature else build.trial(args.steps) if args.steps else build.BuildConfig()
        path = build.build(models, cfg, force=args.force)
        print(path)  # noqa: T201  (the contract: the last line is the checkpoint's path)
        return
    path = build.checkpoint_path(models)
    if not build.cached(path, build.BuildConfig()):
        raise SystemExit(f"no current evidence checkpoint at {path}: run scripts/evidence build first")
    per_digit, rounds = (8, 100) if args.quick else (32, 200)
    log.info(_common.header(f"evidence model: {per_digit} images per digit, {rounds} bootstrap rounds, "
                            "95% intervals"))
    train, test = data.load()
    judge = metrics.Judge(train, test)
    log.info("classifier accuracy on the held-out digits: %.3f", metrics.accuracy(judge.net, test))
    ev = report.Evidence.load(path)
    for line in report.base_table(ev, judge, per_digit, seed=0, rounds=rounds):
        log.info(line)


if __name__ == "__main__":
    main()
