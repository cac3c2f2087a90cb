"""scripts/stress [--quick] [--parts fuzz,files,faults,storms,load] [--prompts N] [--seed N]: every part
against fresh real ComfyUI servers on the generated fixtures, then one table. Every loss column must
read 0. --quick is the miniature CI runs (tests/test_stress.py)."""

from __future__ import annotations

import argparse
import logging
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import _common  # noqa: E402

log = logging.getLogger("supercond.stress")

PARTS = ("fuzz", "files", "faults", "storms", "load")
COLUMNS = ("inputs tried", "faults injected", "concurrent prompts", "server crashes", "unreadable errors",
           "files outside their folder", "lost or corrupt checkpoints", "leaked hooks or state",
           "images unlike a serial run")
LOSSES = COLUMNS[3:]


@dataclass
class Row:
    part: str
    counts: dict
    findings: list[str]
    seconds: float


@dataclass
class Settings:
    prompts: int = 2000
    storm_interrupts: int = 6
    quick: bool = False
    seed: int = 0


QUICK = Settings(prompts=36, storm_interrupts=2, quick=True)


def run(parts: tuple[str, ...], settings: Settings, workdir: Path) -> list[Row]:
    _common.import_pack()
    from stress import faults, files, fuzz, load
    from stress.session import Session

    from supercond.tools import paths
    from supercond.tools.inprocess import ensure_fixtures

    models = ensure_fixtures(paths.find_comfyui())
    rng = random.Random(settings.seed)
    rows = []

    shared: dict[str, Session] = {}

    @contextmanager
    def fresh(name: str) -> Iterator[Session]:
        """A fresh server per part; quick: one server for all parts and one for references (saves starts)."""
        key = ("reference" if "reference" in name else "main") if settings.quick else name
        if key not in shared:
            shutil.rmtree(workdir / key, ignore_errors=True)
            shared[key] = Session(workdir / key, models)
        try:
            yield shared[key]
        finally:
            if not settings.quick:
                shared.pop(key).stop()

    def zero() -> dict:
        return dict.fromkeys(COLUMNS, 0)

    if "fuzz" in parts:
        t0 = time.monotonic()
        with fresh("fuzz") as s:
            t = fuzz.fuzz(s, settings.prompts, settings.seed)
        c = zero() | {"inputs tried": t.prompts, "server crashes": t.crashes,
                      "unreadable errors": len(t.unreadable) + len(t.stuck) + len(t.canary_failures),
                      "files outside their folder": len(t.misplaced)}
        rows.append(Row(f"fuzz ({dict(t.statuses)})", c, t.unreadable + t.stuck + t.canary_failures + t.misplaced,
                        time.monotonic() - t0))
    if "files" in parts:
        t0 = time.monotonic()
        with fresh("files") as s:
            t = files.hostile_files(s, quick=settings.quick)
            crashes = s.crashes
        c = zero() | {"inputs tried": t.tried, "server crashes": crashes,
                      "unreadable errors": len(t.unreadable) + len(t.canary_failures) + len(t.executed),
                      "files outside their folder": len(t.written)}
        rows.append(Row(f"hostile files ({t.refused} refused; accepted by design: {', '.join(t.accepted) or '-'})",
                        c, t.unreadable + t.canary_failures + [f"RAN: {x}" for x in t.executed] + t.written,
                        time.monotonic() - t0))
    if "faults" in parts:
        t0 = time.monotonic()
        t = faults.FaultTally()
        with fresh("faults") as s:
            faults.disk_full(s, t, settings.quick)
            faults.killed_and_resumed(s, t, rng)
            crashes = s.crashes
        c = zero() | {"faults injected": t.injected, "server crashes": crashes, "unreadable errors": len(t.unreadable),
                      "lost or corrupt checkpoints": len(t.lost) + len(t.temps_left)}
        rows.append(Row("disk full, SIGKILL + resume" + (f" (not run: {'; '.join(t.not_run)})" if t.not_run else ""),
                        c, t.unreadable + t.lost + [f"temporary file left: {x}" for x in t.temps_left],
                        time.monotonic() - t0))
    if "storms" in parts:
        t0 = time.monotonic()
        t = faults.FaultTally()
        with fresh("storms") as s, fresh("storms_reference") as ref:
            sent = faults.interrupt_storms(s, ref, t, rng, settings.storm_interrupts)
            crashes = s.crashes
        c = zero() | {"faults injected": sent, "server crashes": crashes, "unreadable errors": len(t.unreadable),
                      "leaked hooks or state": len(t.leaked), "images unlike a serial run": len(t.differ)}
        rows.append(Row("interrupt storms", c, t.unreadable + t.leaked + t.differ, time.monotonic() - t0))
    if "load" in parts:
        t0 = time.monotonic()
        with fresh("load") as s:
            ref = shared.get("reference") if settings.quick else None
            t = load.load_test(s, workdir, models, settings.quick, rng, reference=ref)
            crashes = s.crashes
        c = zero() | {"concurrent prompts": t.prompts, "server crashes": crashes, "unreadable errors": len(t.failed),
                      "images unlike a serial run": len(t.differ)}
        alone = "each alone on one reference server" if settings.quick else "each alone on a fresh server"
        rows.append(Row(f"load ({t.unique} distinct prompts; {alone})", c, t.failed + t.differ, time.monotonic() - t0))
    for s in shared.values():
        s.stop()
    return rows


def table(rows: list[Row], settings: Settings) -> str:
    mode = "quick (the CI miniature)" if settings.quick else "full"
    lines = [_common.header(f"Stress: hostile input, faults and load through the real ComfyUI server, {mode}, "
                            f"seed {settings.seed}"), "",
             "| part | " + " | ".join(COLUMNS) + " | seconds |", "|---" * (len(COLUMNS) + 2) + "|"]
    for r in rows:
        lines.append(f"| {r.part} | " + " | ".join(str(r.counts[c]) for c in COLUMNS) + f" | {r.seconds:.0f} |")
    total = {c: sum(r.counts[c] for r in rows) for c in COLUMNS}
    lines.append("| **total** | " + " | ".join(f"**{total[c]}**" for c in COLUMNS)
                 + f" | {sum(r.seconds for r in rows):.0f} |")
    findings = [f"- {r.part.split(' (')[0]}: {f}" for r in rows for f in r.findings]
    lines += ["", "Every loss column (server crashes and to the right) must read 0.",
              "Findings:" if findings else "Findings: none.", *findings]
    return "\n".join(lines)


def losses(rows: list[Row]) -> int:
    return sum(r.counts[c] for r in rows for c in LOSSES)


def main(argv: list[str] | None = None) -> int:
    _common.setup_logging()
    for noisy in ("supercond.tools.server",):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    ap = argparse.ArgumentParser(prog="scripts/stress", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the CI miniature: fewer prompts, files and faults")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    ap.add_argument("--prompts", type=int, help="hostile prompts for the fuzzer (default 2000; quick 36)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, help="where the servers live (default: a temporary folder)")
    args = ap.parse_args(argv)
    settings = QUICK if args.quick else Settings()
    settings.seed = args.seed
    if args.prompts:
        settings.prompts = args.prompts
    parts = tuple(p for p in args.parts.split(",") if p)
    unknown = set(parts) - set(PARTS)
    if unknown:
        ap.error(f"unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="supercond_stress_"))
    rows = run(parts, settings, workdir)
    text = table(rows, settings)
    out = _common.results_dir() / f"stress{'_quick' if settings.quick else ''}_seed{settings.seed}.md"
    out.write_text(text + "\n")
    log.info("%s\n\nwritten to %s", text, out)
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if losses(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
