"""``scripts/evidence compare A.md B.md``: does one report reproduce another? For every figure of every
row both reports have, whether each value lies inside the other report's 95% interval."""

from __future__ import annotations

import re
from pathlib import Path

NUMBER = r"(-?(?:[\d.]+(?:e[+-]?\d+)?|nan|inf))"
FIGURE = re.compile(rf"^\s*{NUMBER} \[{NUMBER}, {NUMBER}\]\s*$")


def tables(path: Path) -> dict[tuple[str, str, str], tuple[float, float, float]]:
    """(table number, row, column) -> (value, low, high) of every figure in a report's markdown (the
    number, e.g. "3." or "4b.", so a quick and a full report's tables match)."""
    out, title, head = {}, "", []
    for line in Path(path).read_text().splitlines():
        if line.startswith("## "):
            title, head = line[3:].split(" ")[0], []
        elif line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not head:
                head = cells
                continue
            for col, cell in zip(head[2:], cells[2:], strict=False):
                m = FIGURE.match(cell)
                if m:
                    out[(title, cells[0], col)] = tuple(float(v) for v in m.groups())
    return out


def compare(a: Path, b: Path) -> list[str]:
    ta, tb = tables(a), tables(b)
    shared = [k for k in ta if k in tb]
    both = [k for k in shared if ta[k][1] <= tb[k][0] <= ta[k][2] and tb[k][1] <= ta[k][0] <= tb[k][2]]
    overlap = [k for k in shared if ta[k][1] <= tb[k][2] and tb[k][1] <= ta[k][2]]
    lines = [f"{len(shared)} figures in both reports; each value inside the other's interval: {len(both)}; "
             f"intervals overlapping: {len(overlap)}"]
    lines += [f"  apart: {t} / {r} / {c}: {ta[(t, r, c)]} vs {tb[(t, r, c)]}" for (t, r, c) in shared
              if (t, r, c) not in overlap]
    return lines
