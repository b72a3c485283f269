"""The one printed form of retrieval results ``{protocol: {metric: value}}``: Markdown tables.

The first table has the R@K columns (R@1/5/10, MdR, MnR per direction, RSUM) and one row per
protocol that has any of them (``–`` where a protocol lacks one: CxC has no MdR, ECCV Caption only
R@1). Metrics outside those columns (ECCV's mAP@R and R-Precision, or any other) follow in a
second table, one row per protocol that has them. i2t = image/video → text. ``gpo-train``,
``gpo-eval`` and ``python -m gpo_lit.metrics`` all print :func:`results_block`.

:func:`markdown_table`, :func:`title` and :func:`cell` are the pieces every results table of
gpo_lit is made of (the sweep report's table of configurations too).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

DIRECTIONS = ("i2t", "t2i")
MAIN = ("r1", "r5", "r10", "medr", "meanr")
TITLES = {
    "r1": "R@1",
    "r5": "R@5",
    "r10": "R@10",
    "medr": "MdR",
    "meanr": "MnR",
    "map_at_r": "mAP@R",
    "rprecision": "R-P",
}


def title(key: str) -> str:
    """A metric's column title: ``i2t_r1`` -> ``I2T R@1``, ``rsum`` -> ``RSUM``."""
    if key == "rsum":
        return "RSUM"
    d, _, metric = key.partition("_")
    if d in DIRECTIONS and metric:
        return f"{d.upper()} {TITLES.get(metric, metric)}"
    return key


def cell(value: float | None, digits: int = 2) -> str:
    """A number as a table shows it: ``12.34``; ``–`` where there is none (None or NaN)."""
    if value is None or math.isnan(value):
        return "–"
    return f"{value:.{digits}f}"


def markdown_table(head: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """The lines of a Markdown table: header, rule, one line per row (a ``|`` in a cell escaped)."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return [line(head), "|---" * len(head) + "|", *(line(r) for r in rows)]


def _table(results: dict[str, dict[str, float]], cols: list[str]) -> list[str]:
    rows = [
        [p, *(cell(m[c]) if c in m else "–" for c in cols)]
        for p, m in results.items()
        if any(c in m for c in cols)
    ]
    return markdown_table(["protocol", *(title(c) for c in cols)], rows)


def format_table(results: dict[str, dict[str, float]]) -> str:
    """Markdown table(s) of retrieval metrics, one row per protocol (see the module doc)."""
    main = [f"{d}_{m}" for d in DIRECTIONS for m in MAIN] + ["rsum"]
    extra: list[str] = []
    for metrics in results.values():
        extra += [k for k in metrics if k not in main and k not in extra]
    extra.sort(key=lambda k: (k.partition("_")[0] not in DIRECTIONS, k.partition("_")[0]))
    lines = _table(results, main)
    if extra:
        lines += ["", *_table(results, extra)]
    return "\n".join(lines)


def results_block(title: str, results: dict[str, dict[str, float]]) -> str:
    """What the entry points print: a blank line, ``<title>:``, the table(s), a blank line."""
    return f"\n{title}:\n{format_table(results)}\n"
