"""Tier C: the stress miniature (``scripts/stress --quick``) against fresh real servers: hostile prompts
from every node's schema, hostile files, a full disk, SIGKILL + resume, interrupt storms and a mixed
queue. Every loss column of its table must read 0, and each part must have tried something."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.comfy, pytest.mark.server]

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def stress():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    from stress import __main__ as stress_main

    return stress_main


def test_the_stress_miniature_loses_nothing(stress, tmp_path, artifacts):
    from dataclasses import replace

    rows = stress.run(stress.PARTS, replace(stress.QUICK), tmp_path)
    text = stress.table(rows, stress.QUICK)
    (artifacts / "stress_quick.md").write_text(text + "\n")
    by_part = {r.part.split(" (")[0]: r.counts for r in rows}
    assert by_part["fuzz"]["inputs tried"] >= stress.QUICK.prompts
    assert by_part["hostile files"]["inputs tried"] >= 15
    assert by_part["disk full, SIGKILL + resume"]["faults injected"] >= 4, text  # 3 disk-full cases + 1 kill
    assert by_part["interrupt storms"]["faults injected"] >= 8
    assert by_part["load"]["concurrent prompts"] >= 16
    assert stress.losses(rows) == 0, text
