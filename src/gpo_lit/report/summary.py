"""``summary.csv``: one row per configuration, the mean and std of every metric."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

from gpo_lit.report.aggregate import Row, table_metrics


def write_csv(rows: Sequence[Row], path: str | Path) -> None:
    """``summary.csv``: configuration columns, n, missing, seeds, then ``<metric>_mean`` and
    ``<metric>_std`` for every metric (empty where undefined)."""
    metrics = list(table_metrics(rows))
    for r in rows:
        metrics += [m for m in r.mean if m not in metrics]
    head = ["experiment", "visual_pooling", "text_pooling", "other", "overrides", "n", "missing"]
    head += ["seeds", *(f"{m}_{s}" for m in metrics for s in ("mean", "std"))]

    def num(x: float | None) -> str:
        return "" if x is None or math.isnan(x) else repr(float(x))

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(head)
        for r in rows:
            c = r.config
            w.writerow(
                [c.group, c.visual, c.text, c.other, " ".join(c.key), r.n, len(r.missing)]
                + [" ".join(str(s) for s in r.seeds)]
                + [num(d.get(m)) for m in metrics for d in (r.mean, r.std)]
            )
