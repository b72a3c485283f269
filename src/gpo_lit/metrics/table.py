"""The one printed form of retrieval results ``{protocol: {metric: value}}``: Markdown tables.

The first table has the R@K columns (R@1/5/10, MdR, MnR per direction, RSUM) and one row per
protocol that has any of them (``–`` where a protocol lacks one: CxC has no MdR, ECCV Caption only
R@1). Metrics outside those columns (ECCV's mAP@R and R-Precision, or any other) follow in a
second table, one row per protocol that has them. i2t = image/video → text. ``gpo-train``,
``gpo-eval`` and ``python -m gpo_lit.metrics`` all print :func:`results_block`.
"""

from __future__ import annotations

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


def _title(key: str) -> str:
    if key == "rsum":
        return "RSUM"
    d, _, metric = key.partition("_")
    if d in DIRECTIONS and metric:
        return f"{d.upper()} {TITLES.get(metric, metric)}"
    return key


def _table(results: dict[str, dict[str, float]], cols: list[str]) -> list[str]:
    head = "| protocol | " + " | ".join(_title(c) for c in cols) + " |"
    rule = "|---" * (len(cols) + 1) + "|"
    rows = [
        f"| {p} | " + " | ".join(f"{m[c]:.2f}" if c in m else "–" for c in cols) + " |"
        for p, m in results.items()
        if any(c in m for c in cols)
    ]
    return [head, rule, *rows]


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
