"""scripts/evidence build [--force] [--miniature] [--steps N] | train [--force] | report [--quick] [--seed N]
[--tables 0,1,...] | compare A.md B.md (build, train and report take --models DIR): see
bench/evidence/build.py and report.py. Run from anywhere; finds ComfyUI as the other tools do."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import replace
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
    t = sub.add_parser("train", help="train what the tables compare (heads, gist, LoRAs; cached); report does it "
                                     "too when they are missing")
    t.add_argument("--models", type=Path)
    t.add_argument("--force", action="store_true", help="train again (e.g. after changing a trainer)")
    r = sub.add_parser("report", help="print the tables and write their plots to bench/results/")
    r.add_argument("--models", type=Path)
    r.add_argument("--quick", action="store_true", help="fewer samples, rounds, scales and step counts")
    r.add_argument("--seed", type=int, default=0, help="sampling seed: another seed draws new images")
    r.add_argument("--tables", default="0,1,2,3,4,5,6", help="which tables, comma-separated (default: all)")
    c = sub.add_parser("compare", help="does report B reproduce report A? (their .md files in bench/results/)")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    args = ap.parse_args(argv)
    if args.command == "compare":
        from evidence import compare

        for line in compare.compare(args.a, args.b):
            log.info(line)
        return

    comfyui = setup()
    import comfy.utils

    comfy.utils.set_progress_bar_enabled(False)  # a line per table row instead of a bar per sampler run
    logging.getLogger().setLevel(logging.WARNING)  # ComfyUI's own loading chatter
    logging.getLogger("supercond").setLevel(logging.INFO)
    from evidence import artifacts, build, data, metrics, report
    from evidence.sampling import Evidence

    models = args.models or comfyui / "models"
    if args.command == "build":
        cfg = build.miniature() if args.miniature else build.trial(args.steps) if args.steps else build.BuildConfig()
        path = build.build(models, cfg, force=args.force)
        print(path)  # noqa: T201  (the contract: the last line is the checkpoint's path)
        return
    path = build.checkpoint_path(models)
    if not build.cached(path, build.BuildConfig()):
        raise SystemExit(f"no current evidence checkpoint at {path}: run scripts/evidence build first")
    if args.command == "train":
        artifacts.RETRAIN = args.force
        artifacts.register_folders(models)
        report.train(Evidence.load(path), report.Settings())
        return
    settings = replace(report.QUICK if args.quick else report.Settings(), seed=args.seed)
    start = time.perf_counter()
    title = _common.header(f"evidence report{' --quick' if args.quick else ''}: {settings.per_digit} images per "
                           f"digit, seed {settings.seed}, {settings.rounds} bootstrap rounds, 95% intervals")
    out = _common.results_dir() / f"evidence_report{'_quick' if args.quick else ''}_seed{settings.seed}.md"
    out.write_text(title + "\n\n")
    log.info(title)
    artifacts.register_folders(models)
    train, test = data.load()
    judge = metrics.Judge(train, test)
    log.info("classifier accuracy on the held-out digits: %.3f", metrics.accuracy(judge.net, test))
    ev = Evidence.load(path)
    report.train(ev, settings)
    report.run(ev, judge, settings, {int(t) for t in args.tables.split(",")}, out)
    log.info("report done in %.1f min; tables in %s, plots beside it", (time.perf_counter() - start) / 60, out)


if __name__ == "__main__":
    main()
